"""`captioner export MODEL.pt DIR --format onnx`: a model that other runtimes run (onnxruntime in C#,
JavaScript, Java, mobile), with no Python and no torch.

    DIR/encoder.onnx        images [B, 3, S, S] float32 -> pooled [B, D], grid [B, D, h, w], class_probs [B, 1000]
    DIR/encoder-int8.onnx   the same CNN in int8, when `captioner calibrate-int8` has made one for this encoder
    DIR/decoder_init.onnx   features [B, D] (pooled; the grid for an attention decoder) -> the state: h [, c, ...]
    DIR/decoder_step.onnx   tokens [N] int64, the state -> log_probs [N, V], next_h [, next_c, ...]
    DIR/captioner.json      vocabulary, special ids, decoding defaults, the image transform, each graph's inputs
                            and outputs, and the class -> caption word map behind the tags

A caption (greedy): state = init(features); token = <bos>; repeat up to max_length: log_probs, state =
step(token, state); forbid <pad>, <bos>, <unk> (and <eos> before min_length, and any word that would repeat an
n-gram of no_repeat_ngram_size); token = argmax; stop at <eos>. tests/test_onnx.py does exactly this with
numpy and onnxruntime and gets the package's greedy captions. (Beam search, the familiarity profile behind
`confidence`, the tag decoder and the routing between decoders are not exported.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_cells, load_checkpoint
from .concepts import MIN_TAG_PROBABILITY, TOP_TAGS, default_concept_words
from .config import ConfigError, picked_cells, with_settings
from .encoder import EncoderError
from .onnx_runtime import (OPSET, EncoderGraph, encoder_from_config, export_decoder_step, export_encoder,
                           export_module, graph_path, state_names)
from .search import NEVER_EMITTED

FORMAT, VERSION = "captioner-onnx", 1


class _Init(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        if self.decoder.uses_grid:  # the encoder's grid [B, D, h, w] -> cells [B, h * w, D]
            features = features.flatten(2).transpose(1, 2)
        state = self.decoder.init_state(features)
        return tuple(state) if isinstance(state, tuple) else (state,)


def export_decoder(decoder, feature_shape: tuple[int, ...], out_dir: Path) -> dict:
    """decoder_init.onnx and decoder_step.onnx; returns their inputs and outputs for captioner.json."""
    names = state_names(decoder)
    features = torch.zeros(2, *feature_shape)
    export_module(_Init(decoder), (features,), out_dir / "decoder_init.onnx", ["features"], names,
                  {"features": 0, **{n: 1 for n in names}})
    with torch.no_grad():
        state = _Init(decoder)(features)
    step_outputs = export_decoder_step(decoder, state, out_dir / "decoder_step.onnx")
    return {"decoder_init": {"file": "decoder_init.onnx", "inputs": ["features"], "outputs": names},
            "decoder_step": {"file": "decoder_step.onnx", "inputs": ["tokens", *names], "outputs": step_outputs,
                             "state_batch_axis": 1}}


def chosen_decoder(checkpoint, config, decoder, payload) -> nn.Module:
    """The photo decoder the model's captions come from (decode.cells): the ONNX export holds one."""
    held = load_cells(payload, checkpoint, config, decoder)
    cells = picked_cells(config.decode.cells, config.decoder.cell, held)
    if len(cells) > 1:
        raise ConfigError(f"{checkpoint}: its captions come from several cells together ({config.decode.cells}); "
                          f"the ONNX export holds one decoder: choose one with --set decode.cells=CELL")
    return held[next(iter(cells))]


def export_onnx(checkpoint: str | Path, out_dir: str | Path, settings: list[str] = (),
                int8: bool | None = None) -> dict:
    """Write the ONNX model of a checkpoint to `out_dir`; returns captioner.json's content.

    `settings` change the config written to captioner.json, as `--set` does (config.with_settings).
    int8: True requires the int8 encoder (made by `captioner calibrate-int8`), False leaves it out, None adds it
    when there is one.
    """
    config, vocab, decoder, payload = load_checkpoint(checkpoint)
    if config.decoder.inputs != "features":
        raise ConfigError(f"{checkpoint}: a tag decoder alone cannot be exported; export the model that "
                          f"carries it")
    config = with_settings(config, list(settings), f"export of {checkpoint}")
    decoder = chosen_decoder(checkpoint, config, decoder, payload)
    config.decode.cells = ""
    config.encoder.runtime, config.encoder.precision = "torch", "fp32"  # the torch weights are what is exported
    encoder = encoder_from_config(config.encoder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_encoder(encoder, out / "encoder.onnx")
    encoder_io = {"inputs": ["images"], "outputs": list(EncoderGraph.OUTPUTS)}
    graphs = {"encoder": {"file": "encoder.onnx", **encoder_io}}
    int8_file = graph_path(encoder, "int8")
    if int8 and not int8_file.is_file():
        raise EncoderError(f"no int8 encoder for {encoder.name} ({encoder.fingerprint()}) yet: run "
                           f"`captioner calibrate-int8 --data-root FLICKR8K` first, or export without --int8")
    if int8 is not False and int8_file.is_file():
        shutil.copyfile(int8_file, out / "encoder-int8.onnx")
        graphs["encoder_int8"] = {"file": "encoder-int8.onnx", **encoder_io}
    with torch.no_grad():
        pooled, grid = encoder(torch.zeros(1, 3, encoder.transform.image_size, encoder.transform.image_size))
    graphs.update(export_decoder(decoder, tuple((grid if decoder.uses_grid else pooled).shape[1:]), out))
    concept_words = default_concept_words()
    manifest = {
        "format": FORMAT, "version": VERSION, "opset": OPSET, "graphs": graphs,
        "image": {"size": encoder.transform.image_size, "mean": list(encoder.transform.mean),
                  "std": list(encoder.transform.std), "channels": "RGB",
                  "steps": ["apply the EXIF orientation; convert to RGB (transparency onto white)",
                            "JPEG: decode at a reduced scale no smaller than size x size (Pillow's draft mode)",
                            "resize to size x size, bilinear, aspect ratio not kept",
                            "HWC uint8 -> CHW float32 / 255, then (x - mean) / std per channel"]},
        "encoder": {"name": encoder.name, "fingerprint": encoder.fingerprint(), "feature_dim": encoder.feature_dim},
        "decoder": {"cell": decoder.cell, "attention": config.decoder.attention,
                    "features": "grid" if decoder.uses_grid else "pooled", "state": state_names(decoder)},
        "vocab": list(vocab.words),
        "special_ids": {"pad": vocab.pad, "bos": vocab.bos, "eos": vocab.eos, "unk": vocab.unk},
        "never_emitted": list(NEVER_EMITTED),
        "decode": config.to_dict()["decode"],
        "tags": {"class_words": concept_words.class_words, "top": TOP_TAGS, "min_probability": MIN_TAG_PROBABILITY,
                 "rule": "a word's probability is the sum of class_probs over the classes mapped to it"},
        "provenance": {k: v for k, v in payload.get("provenance", {}).items()
                       if isinstance(v, (str, int, float, bool))},
    }
    (out / "captioner.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest

