"""Score a checkpoint on a split: decode each image once (batched), BLEU-1..4 on all references.

Captions are made as `captioner caption` makes them (Captioner.describe), so a model with a fallback
decoder is scored with its unsure photos captioned from their tags; `unsure` and `from_tags` say how many.

Besides the scores of the whole split, the result has the person/dog hallucination rate and the
scores of the images whose references name neither (`without_person_dog`, None when there are none).
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, load_fallback
from .confidence import DomainProfile
from .config import Config, apply_override
from .data import load_dataset
from .encoder import encoder_from_config
from .inference import DECODE_BATCH, DEFAULT_CHECKPOINT, Captioner, resolve_device
from .metrics import caption_scores, overlap_scores, without_person_dog
from .text import tokenize
from .train import prepare_features, readable, write_text_atomic


def evaluate(checkpoint: str | Path | None = None, split: str = "test", overrides: list[str] | None = None,
             decode_options: dict | None = None, out: str | Path | None = None, device: str = "cpu",
             progress: bool = True) -> dict:
    """Scores of a checkpoint (default: the shipped model) on a split; `overrides` change its config."""
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
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
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    records = dataset.split(split)
    table, _ = prepare_features(config, replace(dataset, splits={split: records}), device, progress, encoder)
    records = readable(records, table)
    features = table.lookup([r.path for r in records])
    domain = DomainProfile.from_dict(payload["domain"]) if payload.get("domain") else None
    captioner = Captioner(config, vocab, decoder, encoder, str(device), domain, load_fallback(payload, checkpoint))
    described = []  # the path `captioner caption` takes: unsure photos are written from tags with a fallback
    for start in tqdm(range(0, len(features), DECODE_BATCH), desc="decoding", disable=not progress, file=sys.stderr):
        described += [c[0] for c in captioner.describe(features[start:start + DECODE_BATCH].to(device), config.decode)]
    captions = [c.text for c in described]
    references = [[tokenize(c) for c in r.captions] for r in records]
    scores = caption_scores(references, [c.split() for c in captions])
    subset = without_person_dog(references)
    subset_scores = overlap_scores([references[i] for i in subset], [captions[i].split() for i in subset]) \
        if subset else None
    result = {"checkpoint": str(checkpoint), "dataset": dataset.name, "split": split, "images": len(records),
              "beam_size": config.decode.beam_size, "max_length": config.decode.max_length,
              "length_penalty": config.decode.length_penalty,
              "no_repeat_ngram_size": config.decode.no_repeat_ngram_size, **scores,
              "without_person_dog": subset_scores,
              "unsure": sum(c.unsure for c in described) / len(described) if domain else None,
              "from_tags": sum(c.from_tags for c in described) / len(described)}
    if out:
        rows = [{"path": str(r.path), "caption": c, "references": r.captions} for r, c in zip(records, captions)]
        write_text_atomic(Path(out), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} captions to {out}", file=sys.stderr)
    return result
