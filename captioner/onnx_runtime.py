"""The CNN and the decoder's step on ONNX Runtime: the same numbers as PyTorch, faster on a CPU (bench/speed.py).

This module chooses the CNN's runtime on a CPU (`resolve_runtime`): onnx is the default when onnxruntime is
installed, as `pip install -e .` does. `encoder_from_config` (or `build_encoder`) builds the torch `Encoder`
(encoder.py) and, for onnx, attaches an `OnnxEncoderSession` that runs its CNN here. The graph is exported from
the encoder's own torch weights the first time it is needed; for the pretrained weights it is kept in the user
cache (`cache_dir()`, named by the encoder's name, weights fingerprint and transform), so later processes only
load it. fp32 features match PyTorch's to about 1e-5. int8 graphs are made by `captioner calibrate-int8`
(quantize.py) and found here (`int8_graph`), their file's hash naming the calibration in the feature cache's
key (`int8_digest`).

Graph: input `images` [B, 3, S, S] float32 (the transform's output); outputs `pooled` [B, D], `grid`
[B, D, H, W] and `class_probs` [B, 1000] (the CNN's own ImageNet head, for other runtimes: export_onnx.py).

The decoder's step (one word for every beam) runs here too when the encoder does (`DecoderSession`): a
step reads the whole decoder's weights for a handful of rows, where PyTorch eager adds its per-call
overhead to every layer. The graph of a CaptionDecoder's step is FoldedStep: the cell's equations with
the embedding and the first input projection folded into one table. Log-probabilities agree with
PyTorch's to about 1e-6. `init_state` stays in PyTorch: it runs once per batch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoder import Encoder, EncoderError, encoder_spec
from .files import write_atomic

OPSET = 17
GRAPH_VERSION = 2  # in cached graphs' names: a change to what EncoderGraph computes re-exports them
STEP_GRAPH_PREFIX = "decoder-step-"
STEP_GRAPHS_KEPT = 16  # decoder-step graphs in the cache, the most recently used


class OnnxRuntimeError(EncoderError):
    """ONNX Runtime is missing, or a graph cannot be built or found."""


def onnx_available() -> bool:
    """onnxruntime runs graphs; onnx (torch's exporter needs it) builds them."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_runtime(runtime: str = "auto", precision: str = "fp32") -> tuple[str, str]:
    """(runtime, precision) for a CPU: auto is ONNX Runtime when installed (int8 needs it), else torch."""
    if runtime not in ("auto", "torch", "onnx"):
        raise EncoderError(f"unknown runtime {runtime!r}; choose auto, torch or onnx")
    if precision not in ("fp32", "int8"):
        raise EncoderError(f"unknown precision {precision!r}; choose fp32 or int8")
    if runtime == "torch" and precision == "int8":
        raise EncoderError("int8 runs on ONNX Runtime: use runtime onnx (or auto)")
    if runtime == "auto":
        runtime = "onnx" if onnx_available() else "torch"
        if runtime == "torch" and precision == "int8":
            raise EncoderError("int8 needs ONNX Runtime: pip install onnxruntime onnx")
    elif runtime == "onnx" and not onnx_available():
        raise EncoderError("runtime onnx needs ONNX Runtime: pip install onnxruntime onnx")
    return runtime, precision


def build_encoder(name: str = "efficientnet_lite0", weights: str = "default", image_size: int = 224,
                  runtime: str = "auto", precision: str = "fp32") -> Encoder:
    """The encoder whose CNN runs on `runtime` (and `precision`) on a CPU: the torch Encoder, with an
    OnnxEncoderSession attached for onnx. A bad choice fails before the weights load (torchvision may download
    them); a missing int8 graph fails where it is first needed: the first CPU call, or the feature cache's key."""
    encoder_spec(name)  # an unknown encoder is named first, before a bad runtime
    runtime, precision = resolve_runtime(runtime, precision)
    encoder = Encoder(name, weights, image_size)
    if runtime == "onnx":
        encoder.session = OnnxEncoderSession(encoder, precision)
    return encoder


def encoder_from_config(config) -> Encoder:
    """build_encoder from an EncoderConfig: its name, weights, image size, runtime and precision."""
    return build_encoder(config.name, config.weights, config.image_size, config.runtime, config.precision)


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
    export_module(EncoderGraph(encoder), (torch.zeros(2, 3, size, size),), target, ["images"],
                  list(EncoderGraph.OUTPUTS), {name: 0 for name in ["images", *EncoderGraph.OUTPUTS]})


def write_graph(path: Path, data: bytes) -> None:
    """A graph file, whole or not at all (another process may be reading or writing the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temporary: temporary.write_bytes(data))


def encoder_graph(encoder, precision: str = "fp32") -> Path | bytes:
    """The encoder's graph: a file in the cache for the pretrained weights (exported now if missing), else bytes
    exported now (random weights, a weights file: a second or two per process, and no file left behind)."""
    if precision == "int8":
        return int8_graph(encoder)
    if encoder.weights != "default":
        buffer = io.BytesIO()
        export_encoder(encoder, buffer)
        return buffer.getvalue()
    return cached_graph(graph_path(encoder, "fp32"), lambda buffer: export_encoder(encoder, buffer))


def int8_graph(encoder) -> Path:
    """The int8 graph calibrated for this encoder (its weights, transform), or an error saying how to make one."""
    path = graph_path(encoder, "int8")
    if path.is_file():
        return path
    raise OnnxRuntimeError(f"no int8 graph for encoder {encoder.name} ({encoder.fingerprint()}) at "
                           f"{encoder.transform.image_size} px in {path.parent}; make one with "
                           f"`captioner calibrate-int8 --data-root FLICKR8K` or `--folder YOUR_PHOTOS` "
                           f"(or use precision fp32)")


def int8_digest(encoder) -> str:
    """A short hash of the int8 graph's file: names its calibration in the feature cache's key."""
    return hashlib.sha256(int8_graph(encoder).read_bytes()).hexdigest()[:10]


def cached_graph(path: Path, export) -> Path | bytes:
    """The graph file at `path` in the cache, made by export(buffer) when missing; where the cache cannot be
    written (a read-only home), the graph's bytes, with a warning: it is then exported in every process."""
    if path.is_file():
        return path
    buffer = io.BytesIO()
    export(buffer)
    try:
        write_graph(path, buffer.getvalue())
    except OSError as error:
        warnings.warn(f"cannot keep ONNX graphs in {path.parent} ({error}); set CAPTIONER_CACHE to a writable "
                      f"folder, or each process exports them again", stacklevel=2)
        return buffer.getvalue()
    return path


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle threads must not spin: between calls, beam search's bookkeeping (torch) runs on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def inference_session(graph: Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    source = str(graph) if isinstance(graph, Path) else graph
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def state_names(decoder) -> list[str]:
    """The decoder state's tensors, in the order init_state returns them."""
    names = ["h", "c"] if decoder.cell == "lstm" else ["h"]
    return names + (["memory", "keys"] if decoder.uses_grid else [])


class DecoderStep(nn.Module):
    """What a step graph computes: tokens [N] and the state's tensors -> log_probs [N, V] and the next state."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        log_probs, state = self.decoder.step(tokens, state if len(state) > 1 else state[0])
        return (log_probs, *(state if isinstance(state, tuple) else (state,)))


class FoldedStep(nn.Module):
    """DecoderStep for a CaptionDecoder, written out as its cell's equations (those of nn.GRU, nn.LSTM and
    nn.RNN) with the first layer's input projection folded into a table of one row per word
    (embed @ W_ih + b_ih). A step is bound by reading the weights, not by arithmetic: the table turns
    a third of them (W_ih) into a lookup of N rows (one photo 3-5 ms faster in bench/speed.py, results
    speed-folded-step*); log-probabilities agree with the torch decoder's to about 1e-6."""

    def __init__(self, decoder):
        super().__init__()
        rnn = decoder.rnn
        self.cell, self.layers = decoder.cell, rnn.num_layers
        self.activation = torch.relu if getattr(rnn, "nonlinearity", "tanh") == "relu" else torch.tanh
        with torch.no_grad():
            self.table = nn.Parameter(decoder.embed.weight.float() @ rnn.weight_ih_l0.float().T + rnn.bias_ih_l0)
        self.rnn, self.out = rnn, decoder.out

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        h, c = state[0], state[1] if self.cell == "lstm" else None
        below, hs, cs = None, [], []
        for layer in range(self.layers):
            weights = [getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
            projected = self.table[tokens] if layer == 0 else nn.functional.linear(below, weights[0], weights[1])
            recurrent = nn.functional.linear(h[layer], weights[2], weights[3])
            if self.cell == "gru":
                x_r, x_z, x_n = projected.chunk(3, 1)
                h_r, h_z, h_n = recurrent.chunk(3, 1)
                reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                below = (1 - update) * torch.tanh(x_n + reset * h_n) + update * h[layer]
            elif self.cell == "lstm":
                i, f, g, o = (projected + recurrent).chunk(4, 1)
                cs.append(torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g))
                below = torch.sigmoid(o) * torch.tanh(cs[-1])
            else:
                below = self.activation(projected + recurrent)
            hs.append(below)
        log_probs = torch.log_softmax(self.out(below).float(), dim=-1)
        return (log_probs, torch.stack(hs), *([torch.stack(cs)] if cs else []))


def folds(decoder) -> bool:
    """Whether `decoder`'s step graph is a FoldedStep (CaptionDecoder and its subclasses: a whole nn.GRU, nn.LSTM
    or nn.RNN) or a DecoderStep (the attention decoder, whose cell is an nn.*Cell)."""
    return isinstance(getattr(decoder, "rnn", None), (nn.GRU, nn.LSTM, nn.RNN))


def step_module(decoder) -> nn.Module:
    """What the step graph of `decoder` is exported from."""
    return FoldedStep(decoder) if folds(decoder) else DecoderStep(decoder)


def export_module(module: nn.Module, inputs: tuple, target: str | Path | io.BytesIO, input_names: list[str],
                  output_names: list[str], batch_axes: dict[str, int]) -> None:
    """A module (eval mode, no gradients) to an ONNX graph whose `batch_axes` are dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes (RNN batch sizes, its deprecation)
        torch.onnx.export(module.eval(), inputs, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes={k: {v: "batch"} for k, v in batch_axes.items()})
        outputs = module(*inputs)
    shapes = dict(zip(input_names, (tuple(t.shape) for t in inputs)))
    shapes.update(zip(output_names, (tuple(t.shape) for t in (outputs if isinstance(outputs, tuple) else (outputs,)))))
    data = declare_shapes(buffer.getvalue(), shapes, batch_axes)
    if isinstance(target, io.BytesIO):
        target.write(data)
    else:
        Path(target).write_bytes(data)


def declare_shapes(graph: bytes, shapes: dict[str, tuple[int, ...]], batch_axes: dict[str, int]) -> bytes:
    """The graph with its inputs' and outputs' shapes declared as they are: "batch" on each batch axis, sizes
    elsewhere. The exporter's own guesses can be wrong (the grid [batch, 1280, batch, Clipgrid_dim_3], the state
    [Transposeh_dim_0, batch, Transposeh_dim_2]), and runtimes that plan with declared shapes (ONNX Runtime's
    free dimension overrides, converters to other formats) read them. Inner shapes are inferred again from these."""
    import onnx

    model = onnx.load_from_string(graph)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shapes[value.name]):
            dim = dims.add()
            if axis == batch_axes.get(value.name):
                dim.dim_param = "batch"
            else:
                dim.dim_value = size
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def export_decoder_step(decoder, state: tuple[torch.Tensor, ...], target: str | Path | io.BytesIO) -> list[str]:
    """The decoder's step graph, traced on a state shaped like `state` (batch on dim 1); returns its outputs."""
    names = state_names(decoder)
    outputs = ["log_probs", *(f"next_{n}" for n in names)]
    with torch.inference_mode(False):  # fresh tensors: the caller's may be inference tensors
        example = tuple(torch.zeros(s.shape[0], 2, *s.shape[2:]) for s in state)
        export_module(step_module(decoder), (torch.ones(2, dtype=torch.long), *example), target,
                      ["tokens", *names], outputs, {"tokens": 0, "log_probs": 0, **{n: 1 for n in names},
                                                    **{f"next_{n}": 1 for n in names}})
    return outputs


def decoder_step_graph(decoder, state: tuple[torch.Tensor, ...]) -> Path | bytes:
    """The decoder's step graph, in the cache under a hash of its weights and state shapes (exported now if
    missing: 0.4 s for the shipped model, against 20 ms to hash it)."""
    digest = hashlib.sha256(f"{type(decoder).__name__} folded={folds(decoder)} "
                            f"{[tuple(s.shape[2:]) for s in state]}".encode())
    for key, tensor in sorted(decoder.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = cache_dir() / f"{STEP_GRAPH_PREFIX}{digest.hexdigest()[:16]}-v{GRAPH_VERSION}.onnx"
    graph = cached_graph(path, lambda buffer: export_decoder_step(decoder, state, buffer))
    if isinstance(graph, Path):
        forget_old_step_graphs(graph)
    return graph


def forget_old_step_graphs(used: Path, keep: int = STEP_GRAPHS_KEPT) -> None:
    """Every model captioned with on a CPU leaves a step graph in the cache (about 25 MB for the shipped one):
    keep the `keep` most recently used, so that evaluating checkpoint after checkpoint does not fill the disk."""
    try:
        os.utime(used)
        graphs = sorted(used.parent.glob(f"{STEP_GRAPH_PREFIX}*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in graphs[keep:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache, or another process forgetting the same files: the graphs stay, nothing breaks


class DecoderSession:
    """A decoder whose `step` runs on ONNX Runtime's CPU provider; `init_state` and everything else is the
    torch decoder's. Any search takes it in the decoder's place. The graph comes from the decoder's weights
    on the first step (decoder_step_graph), so train the decoder no further after that."""

    def __init__(self, decoder, threads: int | None = None):
        self.decoder, self.threads = decoder.eval(), threads
        self.names = state_names(decoder)
        self._session = None

    def __getattr__(self, name: str):  # uses_grid, cell, vocab_size...: the torch decoder's
        if name == "decoder":
            raise AttributeError(name)
        return getattr(self.decoder, name)

    def init_state(self, features: torch.Tensor):
        return self.decoder.init_state(features)

    def step(self, tokens: torch.Tensor, state):
        states = state if isinstance(state, tuple) else (state,)
        if self._session is None:
            self._session = inference_session(decoder_step_graph(self.decoder, states), self.threads)
        feeds = {"tokens": np.ascontiguousarray(tokens.cpu().numpy(), dtype=np.int64)}
        feeds.update({name: np.ascontiguousarray(s.detach().cpu().numpy(), dtype=np.float32)
                      for name, s in zip(self.names, states)})
        log_probs, *next_state = (torch.from_numpy(value) for value in self._session.run(None, feeds))
        return log_probs, tuple(next_state) if len(next_state) > 1 else next_state[0]


class EncoderSession:
    """An encoder graph on ONNX Runtime's CPU provider: torch images in, torch (pooled, grid) out."""

    def __init__(self, graph: Path | bytes, threads: int | None = None):
        self.session = inference_session(graph, threads)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.ascontiguousarray(images.detach().numpy(), dtype=np.float32)
        pooled, grid = self.session.run(["pooled", "grid"], {"images": pixels})
        return torch.from_numpy(pooled), torch.from_numpy(grid)


class OnnxEncoderSession:
    """An encoder's CNN on ONNX Runtime, attached as the encoder's `session` (build_encoder): Encoder.forward
    hands it CPU images. The graph is found or exported, and the EncoderSession opened, on the first call, so
    building an encoder stays cheap and a missing int8 graph is reported when it is first needed."""

    runtime = "onnx"

    def __init__(self, encoder: Encoder, precision: str = "fp32"):
        self.encoder, self.precision = encoder, precision
        self._session: EncoderSession | None = None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._session is None:
            self._session = EncoderSession(encoder_graph(self.encoder, self.precision))
        return self._session(images)

    def key(self) -> str:
        """The runtime's part of the feature cache's key; for int8, which calibration too (a new one, new features)."""
        if self.precision == "int8":
            return f"onnx-int8-{int8_digest(self.encoder)}"
        return f"onnx-{self.precision}"
