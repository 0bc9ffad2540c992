"""The one checkpoint format: a single file of plain tensors, strings and numbers.

    {"format": "captioner", "version": 1,
     "config": Config.to_dict(), "vocab": [words...], "decoder": state_dict,
     "encoder": {"name", "weights", "fingerprint", "feature_dim"},
     "provenance": {"dataset", "train_split", "epoch", "dev": {...}, "created", "torch"},
     "domain": {"centroids", "dev_similarity",     # optional: how familiar photos are (confidence.py)
                "person_weight", "person_bias"},  # optional within it: the person probe
     "fallback": {"config", "vocab", "decoder"},   # optional: the tag decoder (decoder.TagDecoder, routing.py)
     "cells": {cell: {"config", "decoder", "provenance"}},  # optional: more photo decoders, other cells on the
                                                           # same vocabulary and encoder (decode.cells picks)
     "training": {...}   # optimizer/scheduler/RNG state; only in last.pt, for --resume}

It loads with `torch.load(path, weights_only=True)`: no pickled classes, nothing executable.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .confidence import DomainProfile
from .config import Config, ConfigError, picked_cells, upgraded, with_settings
from .decoder import build_decoder
from .files import atomic_save
from .text import Vocabulary

FORMAT, VERSION = "captioner", 1


class CheckpointError(ValueError):
    """A file that is not a captioner checkpoint, is damaged, or does not fit the model."""


def save_checkpoint(path: str | Path, config: Config, vocab: Vocabulary, decoder: nn.Module,
                    encoder_info: dict, provenance: dict, training: dict | None = None,
                    half: bool = False, domain: dict | None = None, fallback: dict | None = None,
                    cells: dict | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "vocab": list(vocab.words),
               "decoder": weights_of(decoder, half), "encoder": dict(encoder_info), "provenance": dict(provenance)}
    if domain is not None:
        payload["domain"] = dict(domain)
    if fallback is not None:
        payload["fallback"] = dict(fallback)
    if cells:
        payload["cells"] = dict(cells)
    if training is not None:
        payload["training"] = training
    # A GPU run's optimizer state lives on the GPU; saved there, the file would not load on a CPU-only machine
    # without map_location. Resuming moves the state back to the parameters' device (Optimizer.load_state_dict).
    atomic_save(on_cpu(payload), path)


def weights_of(decoder: nn.Module, half: bool) -> dict:
    return {k: v.half() if half and v.is_floating_point() else v for k, v in decoder.state_dict().items()}


def on_cpu(value):
    """`value` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, checked for shape; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; weights_only would call a text file "unsafe code"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a file torch.save wrote)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load: it holds Python objects that could run code, "
                              f"not a captioner checkpoint ({str(error).splitlines()[0][:200]})") from None
    except Exception as error:  # torch raises many types for damaged files (struct.error, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file?): "
                              f"{str(error).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a torch file, but not a captioner checkpoint (no 'format': 'captioner')")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (this is {VERSION})")
    missing = {"config", "vocab", "decoder", "encoder"} - set(payload)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(sorted(missing))}")
    return payload


def load_checkpoint(path: str | Path, payload: dict | None = None,
                    what: str = "checkpoint") -> tuple[Config, Vocabulary, nn.Module, dict]:
    """Config, vocabulary, decoder (eval mode, CPU, fp32) and the raw payload of a checkpoint (or of
    `payload`, an entry read from it: `what` names it in errors)."""
    payload = read_checkpoint(path) if payload is None else payload
    if what != "checkpoint":
        path = f"{path} ({what})"
    try:
        config = Config.from_dict(upgraded(payload["config"]), source=f"{path} (config)")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    try:
        vocab = Vocabulary(payload["vocab"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: bad vocabulary: {error}") from None
    decoder = build_decoder(len(vocab), int(payload["encoder"]["feature_dim"]), config.decoder)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in payload["decoder"].items()}
    try:
        decoder.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes "
                              f"(vocabulary {len(vocab)} words, cell {config.decoder.cell}): {str(error)[:400]}") from None
    return config, vocab, decoder.eval(), payload


def load_domain(payload: dict, path: str | Path) -> DomainProfile | None:
    """The familiarity profile and person probe a checkpoint carries (confidence.py), or None."""
    if not payload.get("domain"):
        return None
    values, feature_dim = payload["domain"], int(payload["encoder"]["feature_dim"])
    try:
        domain = DomainProfile.from_dict(values)
    except (KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{path}: bad familiarity profile ('domain'): {error!r}") from None
    sizes = [("centroids", domain.centroids.shape[-1])] + ([("person_weight", domain.person.weight.shape[-1])]
                                                           if domain.person else [])
    for name, size in sizes:
        if size != feature_dim:
            raise CheckpointError(f"{path}: its 'domain' {name} has {size} values per photo, but its encoder's "
                                  f"features have {feature_dim}")
    return domain


def load_fallback(payload: dict, path: str | Path) -> tuple[Vocabulary, nn.Module] | None:
    """The tag decoder a checkpoint carries (decoder.TagDecoder), or None."""
    if not payload.get("fallback"):
        return None
    inner = payload["fallback"]
    _, vocab, decoder, _ = load_checkpoint(path, {"format": FORMAT, "version": VERSION, "encoder": payload["encoder"],
                                                  **inner}, what="tag decoder")
    return vocab, decoder


def load_cells(payload: dict, path: str | Path, config: Config, decoder: nn.Module) -> dict[str, nn.Module]:
    """Every photo decoder a checkpoint holds, by cell: its own (`decoder`, of `config`) and those of "cells"."""
    cells = {config.decoder.cell: decoder}
    for cell, inner in (payload.get("cells") or {}).items():
        entry = {"format": FORMAT, "version": VERSION, "encoder": payload["encoder"], "vocab": payload["vocab"], **inner}
        cell_config, _, cells[cell], _ = load_checkpoint(path, entry, what=f"{cell} decoder")
        if cell_config.decoder.cell != cell or cell_config.decoder.inputs != "features":
            raise CheckpointError(f"{path}: its '{cell}' decoder is a {cell_config.decoder.cell} "
                                  f"({cell_config.decoder.inputs}) decoder")
    return cells


def check_same_encoder(path: str | Path, trained_on: dict, encoder_info: dict) -> None:
    """A decoder to ship inside a model must have learnt from the model's encoder's features."""
    if trained_on.get("fingerprint") != encoder_info.get("fingerprint"):
        raise CheckpointError(f"{path}: trained with encoder {trained_on.get('name')} ({trained_on.get('fingerprint')}), "
                              f"the model's is {encoder_info.get('name')} ({encoder_info.get('fingerprint')})")


def cell_entries(paths: list[str | Path], vocab: Vocabulary, encoder_info: dict, taken: set[str],
                 half: bool = True) -> dict:
    """Trained photo decoders of other cells (checkpoints) as the "cells" entry of a checkpoint with this
    vocabulary and encoder; `taken` are the cells it already holds."""
    entries = {}
    for path in paths:
        config, cell_vocab, decoder, payload = load_checkpoint(path)
        cell = config.decoder.cell
        if config.decoder.inputs != "features" or config.decoder.attention:
            raise CheckpointError(f"{path}: not a photo decoder on pooled features (a tag or attention decoder)")
        if cell in taken or cell in entries:
            raise CheckpointError(f"{path}: the model already has a {cell} decoder")
        if list(cell_vocab.words) != list(vocab.words):
            raise CheckpointError(f"{path}: its vocabulary ({len(cell_vocab)} words) is not the model's "
                                  f"({len(vocab)} words): train it on the same data and data settings")
        check_same_encoder(path, payload["encoder"], encoder_info)
        provenance = dict(payload.get("provenance", {}), exported_from=str(path), fp16=half)
        entries[cell] = {"config": config.to_dict(), "decoder": weights_of(decoder, half), "provenance": provenance}
    return entries


def fallback_payload(path: str | Path, encoder_info: dict, image_size: int, half: bool = True) -> dict:
    """A trained fallback checkpoint as the entry another checkpoint carries; its encoder must be the same."""
    config, vocab, decoder, payload = load_checkpoint(path)
    if config.decoder.inputs != "tags":
        raise CheckpointError(f"{path}: not a tag decoder (decoder.inputs is {config.decoder.inputs}, not tags)")
    check_same_encoder(path, payload["encoder"], encoder_info)
    if config.encoder.image_size != image_size:
        raise CheckpointError(f"{path}: its tags came from {config.encoder.image_size} px images, the model's are "
                              f"{image_size} px (train it with the model's encoder settings)")
    return {"config": config.to_dict(), "vocab": list(vocab.words), "decoder": weights_of(decoder, half)}


def export_checkpoint(source: str | Path, target: str | Path, half: bool = True, settings: list[str] = (),
                      domain: dict | None = None, fallback: str | Path | None = None,
                      cells: list[str | Path] = ()) -> dict:
    """Copy a checkpoint for shipping: no optimizer state, fp16 weights by default. Returns its provenance.

    `settings` ("decode.beam_size=5", "routing.unsure_below=0.1", "data.root=DIR", ...) change the config
    stored with the model, e.g. to decoding settings chosen on dev by bench/tune_decoding.py; what describes
    the model itself cannot change (config.with_settings). `domain` replaces the familiarity profile
    (confidence.py), `fallback` (a tag decoder's checkpoint, configs/tag-decoder.yaml) the tag decoder;
    without them the source's, if any, are kept. `cells` (checkpoints of photo decoders of other cells, on the
    same vocabulary and encoder) are added to the source's.
    """
    config, vocab, decoder, payload = load_checkpoint(source)
    config = with_settings(config, list(settings), f"export of {source}")
    provenance = dict(payload.get("provenance", {}), fp16=half)
    provenance.setdefault("exported_from", Path(source).name)  # re-exporting an export keeps the training file's name
    if settings:
        provenance["settings"] = [*provenance.get("settings", []), *settings]
    if fallback:
        provenance["fallback_from"] = str(fallback)
    fallback_entry = fallback_payload(fallback, payload["encoder"], config.encoder.image_size, half) if fallback \
        else payload.get("fallback")
    kept_cells = dict(payload.get("cells") or {})
    if cells and config.decoder.attention:
        raise CheckpointError(f"{source}: an attention decoder reads the grid, other cells the pooled features: "
                              f"export a pooled-feature decoder with --add-cell instead")
    added = cell_entries(list(cells), vocab, payload["encoder"], {config.decoder.cell, *kept_cells}, half)
    picked_cells(config.decode.cells, config.decoder.cell, [config.decoder.cell, *kept_cells, *added])
    save_checkpoint(target, config, vocab, decoder, payload["encoder"], provenance, half=half,
                    domain=domain if domain is not None else payload.get("domain"), fallback=fallback_entry,
                    cells={**kept_cells, **added})
    return provenance
