"""The CNN on ONNX Runtime: the same features as PyTorch, faster on a CPU (bench/speed.py).

`Encoder` (encoder.py) runs its backbone here when its runtime is onnx (the default on a CPU when
onnxruntime is installed, as `pip install -e .` does). The graph is exported from the encoder's own torch
weights the first time it is needed; for the pretrained weights it is kept in the user cache (`cache_dir()`,
named by the encoder's name, weights fingerprint and transform), so later processes only load it. fp32 features match
PyTorch's to about 1e-5. int8 graphs are made by `captioner calibrate-int8` (quantize.py) and found here.

Graph: input `images` [B, 3, S, S] float32 (the transform's output); outputs `pooled` [B, D], `grid`
[B, D, H, W] and `class_probs` [B, 1000] (the CNN's own ImageNet head, for other runtimes: export_onnx.py).
"""
from __future__ import annotations

import importlib.util
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoder import EncoderError
from .files import write_atomic

OPSET = 17
GRAPH_VERSION = 2  # in cached graphs' names: a change to what EncoderGraph computes re-exports them


class OnnxRuntimeError(EncoderError):
    """ONNX Runtime is missing, or a graph cannot be built or found."""


def onnx_available() -> bool:
    """onnxruntime runs graphs; onnx (torch's exporter needs it) builds them."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def cache_dir() -> Path:
    """Where exported graphs are kept: $CAPTIONER_CACHE, else $XDG_CACHE_HOME/captioner, else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioner" / "onnx"


def graph_path(encoder, precision: str) -> Path:
    return cache_dir() / f"{encoder.graph_key()}-v{GRAPH_VERSION}-{precision}.onnx"


class EncoderGraph(nn.Module):
    """What the ONNX graph computes: images -> pooled features, the grid, and the ImageNet class probabilities."""

    OUTPUTS = ("pooled", "grid", "class_probs")

    def __init__(self, encoder):
        super().__init__()
        self.backbone, self.head = encoder.backbone, encoder.head

    def forward(self, images: torch.Tensor):
        grid = self.backbone(images)
        pooled = grid.mean(dim=(2, 3))
        return pooled, grid, torch.softmax(self.head(pooled), dim=1)


def export_encoder(encoder, target: str | Path | io.BytesIO) -> None:
    """Export the encoder's CNN (fp32, dynamic batch, fixed image size) to an ONNX file or buffer."""
    if importlib.util.find_spec("onnx") is None:
        raise OnnxRuntimeError("exporting to ONNX needs the onnx package: pip install onnx")
    if next(encoder.backbone.parameters()).device.type != "cpu":
        raise OnnxRuntimeError("export the encoder from the CPU")
    size = encoder.transform.image_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on constant folding and its deprecation
        torch.onnx.export(EncoderGraph(encoder).eval(), (torch.zeros(2, 3, size, size),), target,
                          dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=list(EncoderGraph.OUTPUTS),
                          dynamic_axes={name: {0: "batch"} for name in ["images", *EncoderGraph.OUTPUTS]})


def write_graph(path: Path, data: bytes) -> None:
    """A graph file, whole or not at all (another process may be reading or writing the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temporary: temporary.write_bytes(data))


def encoder_graph(encoder, precision: str = "fp32") -> Path | bytes:
    """The encoder's graph: a file in the cache for the pretrained weights (exported now if missing), else bytes
    exported now (random weights, a weights file: a second or two per process, and no file left behind)."""
    if precision == "int8":
        from .quantize import int8_graph

        return int8_graph(encoder)
    if encoder.weights != "default":
        buffer = io.BytesIO()
        export_encoder(encoder, buffer)
        return buffer.getvalue()
    path = graph_path(encoder, "fp32")
    if not path.is_file():
        buffer = io.BytesIO()
        export_encoder(encoder, buffer)
        write_graph(path, buffer.getvalue())
    return path


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle threads must not spin: between CNN calls the decoder runs on the same cores, in torch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def inference_session(graph: Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    source = str(graph) if isinstance(graph, Path) else graph
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


class EncoderSession:
    """An encoder graph on ONNX Runtime's CPU provider: torch images in, torch (pooled, grid) out."""

    def __init__(self, graph: Path | bytes, threads: int | None = None):
        self.session = inference_session(graph, threads)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)
        pooled, grid = self.session.run(["pooled", "grid"], {"images": pixels})
        return torch.from_numpy(pooled), torch.from_numpy(grid)
