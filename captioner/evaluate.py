"""Score a checkpoint on a split: decode each image once (batched), BLEU-1..4 on all references."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, apply_override
from .data import load_dataset
from .encoder import encoder_from_config
from .inference import resolve_device
from .train import evaluate_features, prepare_features, readable, write_text_atomic


def evaluate(checkpoint: str | Path, split: str = "test", overrides: list[str] | None = None,
             decode_options: dict | None = None, out: str | Path | None = None, device: str = "cpu",
             progress: bool = True) -> dict:
    config, vocab, decoder, payload = load_checkpoint(checkpoint)
    values = config.to_dict()
    for override in overrides or []:
        apply_override(values, override)
    for key, value in (decode_options or {}).items():
        if value is not None:
            values["decode"][key] = value
    config = Config.from_dict(values, source=f"{checkpoint} with overrides")
    device = resolve_device(device)
    encoder = encoder_from_config(config.encoder)
    if encoder.fingerprint() != payload["encoder"].get("fingerprint"):
        raise CheckpointError(f"{checkpoint}: trained on features of {payload['encoder'].get('name')} "
                              f"(fingerprint {payload['encoder'].get('fingerprint')}), but the encoder here is "
                              f"{encoder.name} ({encoder.fingerprint()})")
    dataset = load_dataset(config.data)
    table, _ = prepare_features(config, dataset, device, progress, encoder)
    records = readable(dataset.split(split), table)
    features = table.lookup([r.path for r in records])
    scores, captions = evaluate_features(decoder.to(device), vocab, features, records, config.decode, device,
                                         progress=progress)
    result = {"checkpoint": str(checkpoint), "dataset": dataset.name, "split": split, "images": len(records),
              "beam_size": config.decode.beam_size, "max_length": config.decode.max_length,
              "length_penalty": config.decode.length_penalty,
              "no_repeat_ngram_size": config.decode.no_repeat_ngram_size, **scores}
    if out:
        rows = [{"path": str(r.path), "caption": c, "references": r.captions} for r, c in zip(records, captions)]
        write_text_atomic(Path(out), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} captions to {out}", file=sys.stderr)
    return result
