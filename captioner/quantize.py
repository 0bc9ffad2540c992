"""int8 for the CNN: ONNX Runtime's static quantization, calibrated on real photos.

    captioner calibrate-int8 --data-root data/flickr8k      # 256 Flickr8k train photos; a minute or two on a CPU
    captioner calibrate-int8 --folder my-photos/            # or 256 of your own

The fp32 graph (onnx_runtime.py) gets QuantizeLinear/DequantizeLinear pairs (QDQ): int8 weights per output
channel (7 bits where a convolution runs as a matrix product, 8 in the depthwise convolutions), uint8 activations
with ranges measured (min/max) on the calibration photos. EfficientNet-Lite was
designed for this (ReLU6, no squeeze-excite). The pooling, the ImageNet head and its softmax stay in float, so
the pooled features the decoder reads are averages of the int8 grid, not rounded again. The result is kept in
the user cache next to the fp32 graph, where onnx_runtime.int8_graph finds it for `--precision int8`
(encoder.precision: int8).
"""
from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .onnx_runtime import OnnxRuntimeError, encoder_graph, graph_path, write_graph

CALIBRATION_IMAGES = 256
FLOAT_OPS = ("ReduceMean", "Gemm", "MatMul", "Softmax", "Flatten")  # pooling and the head stay fp32


def calibration_sample(paths: Sequence[str], count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[str]:
    """A fixed random sample of the photos (sorted first, so the same folder gives the same sample)."""
    ordered = sorted(str(p) for p in paths)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))))


class _PhotoBatches:
    """onnxruntime's CalibrationDataReader, in strides of one batch (CalibStridedMinMax): ranges are merged batch
    by batch instead of holding every activation of every photo in memory (gigabytes for a few hundred)."""

    def __init__(self, paths: Sequence[str], transform, batch_size: int, progress: bool):
        self.batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
        self.transform, self.todo = transform, iter(self.batches)  # all of them, unless set_range narrows it
        self.read: set[str] = set()  # the photos that calibrated something
        self.bar = tqdm(total=len(paths), desc="calibrating int8", unit="img", disable=not progress, file=sys.stderr)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.todo = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict | None:
        from .transform import ImageLoadError

        for batch in self.todo:
            images = []
            for path in batch:
                try:
                    images.append(self.transform.load(path).numpy())
                    self.read.add(path)
                except ImageLoadError:
                    pass  # an unreadable photo calibrates nothing
            self.bar.update(len(batch))
            if images:
                return {"images": np.ascontiguousarray(np.stack(images), dtype=np.float32)}
        return None


def quantize_graph(fp32: Path | bytes, target: Path, paths: Sequence[str], transform, batch_size: int = 8,
                   progress: bool = True, metadata: dict | None = None, method: str = "MinMax",
                   float_convolutions: int = 3, float_last_convolutions: int = 0, weight_bits: int = 7,
                   depthwise_weight_bits: int = 8, unsigned_weights: bool = False) -> int:
    """Statically quantize an fp32 encoder graph, calibrated on `paths` (unreadable files left out), and write it
    to `target`. Returns how many photos calibrated it; none readable is an OnnxRuntimeError.

    The defaults are the ones `captioner calibrate-int8` uses; the others are for bench/int8_variants.py."""
    if weight_bits not in (7, 8) or depthwise_weight_bits not in (7, 8):
        raise ValueError(f"weight bits must be 7 or 8, not {weight_bits} and {depthwise_weight_bits}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="captioner-int8-") as work:
        exported, source = Path(work) / "exported.onnx", Path(work) / "fp32.onnx"
        exported.write_bytes(fp32 if isinstance(fp32, bytes) else Path(fp32).read_bytes())
        # Shape inference and constant folding first, as onnxruntime advises: the exporter leaves each
        # asymmetric pad as a small subgraph that would otherwise sit between quantized convolutions.
        quant_pre_process(str(exported), str(source))
        model = onnx.load(str(source))
        convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
        keep_float = [node.name for node in model.graph.node if node.op_type in FLOAT_OPS] + \
            convolutions[:float_convolutions] + convolutions[len(convolutions) - float_last_convolutions:]
        # Depthwise convolutions have ONNX Runtime kernels of their own, which widen both operands before they
        # multiply: no int16 pair sums to saturate, so their weights keep all 8 bits (the pooled features' cosine
        # to fp32 on coco-ood-dev: 0.986 with 7 bits, 0.991 with 8; the fused kernels agree with the unfused QDQ
        # arithmetic as closely as with 7: tests/test_onnx.py checks it).
        overrides = {weights: [{"reduce_range": depthwise_weight_bits == 7, "axis": 0}]
                     for weights in depthwise_weights(model)}
        quantized = Path(work) / "int8.onnx"
        batches = _PhotoBatches(paths, transform, batch_size, progress)
        # reduce_range: 7-bit weights. Without VNNI (as on this repo's AVX2 machine), 8-bit weights saturate the
        # int16 sums of x86's u8 x s8 instruction: the pooled features' cosine to fp32 fell to 0.90 (0.98 with 7
        # bits). 7-bit weights cannot saturate, so a graph gives the same numbers on every x86 CPU.
        try:
            quantize_static(str(source), str(quantized), batches, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8,
                            nodes_to_exclude=keep_float, calibrate_method=getattr(CalibrationMethod, method),
                            extra_options={"TensorQuantOverrides": overrides,
                                           **({"CalibStridedMinMax": 1} if method == "MinMax" else {})})
        except ValueError:  # onnxruntime's "No data is collected."
            if batches.read:
                raise
            raise OnnxRuntimeError(f"none of the {len(paths)} photos could be read as an image, e.g. {paths[0]}") \
                from None
        finally:
            batches.bar.close()
        result = onnx.load(str(quantized))
        facts = {"calibration_images": len(batches.read), "weight_bits": weight_bits,
                 "depthwise_weight_bits": depthwise_weight_bits}
        for key, value in {**(metadata or {}), **facts}.items():
            entry = result.metadata_props.add()
            entry.key, entry.value = key, str(value)
        write_graph(target, result.SerializeToString())
        return len(batches.read)


def depthwise_weights(model) -> list[str]:
    """The weight tensors of a graph's depthwise convolutions: one input channel per group, weights [C, 1, k, k]."""
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    return [node.input[1] for node in model.graph.node if node.op_type == "Conv"
            and any(attribute.name == "group" and attribute.i > 1 for attribute in node.attribute)
            and shapes.get(node.input[1], [0, 0])[1:2] == [1]]


def calibrate_int8(encoder, paths: Sequence[str], out: str | Path | None = None, count: int = CALIBRATION_IMAGES,
                   progress: bool = True, method: str = "MinMax", float_convolutions: int = 3,
                   depthwise_weight_bits: int = 8) -> tuple[Path, int]:
    """Quantize `encoder`'s CNN to int8 on a sample of `count` of `paths` (unreadable files left out); saved where
    precision int8 finds it (or to `out`). Returns the file written and how many photos calibrated it."""
    sample = calibration_sample(paths, count)
    if not sample:
        raise OnnxRuntimeError("no photos to calibrate int8 on")
    target = Path(out) if out else graph_path(encoder, "int8")
    used = quantize_graph(encoder_graph(encoder, "fp32"), target, sample, encoder.transform, progress=progress,
                          metadata={"captioner_encoder": encoder.graph_key(), "calibration_method": method,
                                    "float_convolutions": float_convolutions},
                          method=method, float_convolutions=float_convolutions,
                          depthwise_weight_bits=depthwise_weight_bits)
    return target, used

