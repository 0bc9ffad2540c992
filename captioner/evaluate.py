"""Score a checkpoint on a split: decode each image once (batched), BLEU-1..4 on all references.

Captions are made as `captioner caption` makes them (Captioner.describe), so a model with a fallback
decoder is scored with its unsure photos captioned from their tags; `unsure` and `from_tags` say how many.

Besides the scores of the whole split, the result has the person/dog hallucination rate and the
scores of the images whose references name neither (`without_person_dog`, None when there are none).

Training scores dev the same way after each epoch, with the decoder alone: prepare_features,
readable and evaluate_features below are shared with train.py and the benches.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from .config import Config
from .data import CaptionDataset, ImageRecord, load_dataset
from .describe import decode_features
from .distributed import SINGLE, Ranks, shard, unshard, unshard_features
from .encoder import Encoder
from .features import FeatureTable, cached_features
from .files import write_text_atomic
from .inference import DECODE_BATCH, DEFAULT_CHECKPOINT, Captioner
from .onnx_runtime import encoder_from_config
from .metrics import caption_scores, overlap_scores, without_person_dog
from .text import Vocabulary, tokenize


def prepare_features(config: Config, dataset: CaptionDataset, device, progress: bool = True,
                     encoder: Encoder | None = None, ranks: Ranks = SINGLE) -> tuple[FeatureTable, dict]:
    """Encode every image of every split once (or read the cache); returns the table and encoder info.

    Under torchrun each rank encodes (and caches) its shard of the images, then all ranks
    exchange them, so a rerun with the same number of processes reads its shard from the cache.
    """
    encoder = encoder or encoder_from_config(config.encoder)
    paths = shard(sorted({str(r.path) for records in dataset.splits.values() for r in records}), ranks)
    table = cached_features(encoder, paths, config.train.cache_dir, config.encoder.batch_size,
                            config.encoder.num_workers, device, progress and ranks.is_main,
                            grid=config.decoder.attention)
    table = unshard_features(table, ranks) if ranks.distributed else table
    for reason in table.failed.values() if ranks.is_main else ():
        print(f"warning: left out (unreadable image): {reason}", file=sys.stderr)
    return table, encoder_info(encoder, config)


def encoder_info(encoder: Encoder, config: Config) -> dict:
    """What a checkpoint records of the encoder its decoder learnt from (checked when it is loaded)."""
    return {"name": encoder.name, "weights": config.encoder.weights, "fingerprint": encoder.fingerprint(),
            "feature_dim": encoder.feature_dim}


def readable(records: list[ImageRecord], table: FeatureTable) -> list[ImageRecord]:
    """The records whose image could be read (the others are left out of training and scoring)."""
    return [r for r in records if str(r.path) not in table.failed]


@torch.inference_mode()
def evaluate_features(decoder, vocab: Vocabulary, features: torch.Tensor, records: list[ImageRecord], decode,
                      device, batch_size: int = 256, progress: bool = False,
                      ranks: Ranks = SINGLE) -> tuple[dict[str, float], list[str]]:
    """Decode every image once, batched, and score it (BLEU-1..4, CIDEr-D, ROUGE-L) against all its references.

    Under torchrun each rank decodes a shard and every rank scores the gathered captions.
    """
    decoder.eval()
    mine = shard(features, ranks)
    captions = []
    for start in tqdm(range(0, len(mine), batch_size), desc="decoding", disable=not progress, file=sys.stderr):
        batch = mine[start:start + batch_size].to(device)
        captions += [hyps[0].text for hyps in decode_features(decoder, vocab, batch, decode)]
    captions = unshard(captions, ranks)
    references = [[tokenize(c) for c in r.captions] for r in records]
    return caption_scores(references, [c.split() for c in captions]), captions


def evaluate(checkpoint: str | Path | None = None, split: str = "test", settings: list[str] | None = None,
             decode_options: dict | None = None, out: str | Path | None = None, device: str = "cpu",
             progress: bool = True) -> dict:
    """Scores of a checkpoint (default: the shipped model) on a split; `settings` change its config."""
    decode = [f"decode.{key}={value}" for key, value in (decode_options or {}).items() if value is not None]
    captioner = Captioner.from_checkpoint(checkpoint, device, [*(settings or []), *decode])
    config = captioner.config
    dataset = load_dataset(config.data)
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    records = dataset.split(split)
    table, _ = prepare_features(config, replace(dataset, splits={split: records}), captioner.device, progress,
                                captioner.encoder)
    records = readable(records, table)
    features = table.lookup([r.path for r in records])
    scored, described = describe_and_score(captioner, features, records, progress=progress)
    captions = [c.text for c in described]
    result = {"checkpoint": str(checkpoint or DEFAULT_CHECKPOINT), "dataset": dataset.name, "split": split,
              "images": len(records), "cells": config.decode.cells or config.decoder.cell,
              "beam_size": config.decode.beam_size, "max_length": config.decode.max_length,
              "length_penalty": config.decode.length_penalty,
              "no_repeat_ngram_size": config.decode.no_repeat_ngram_size, **scored}
    if out:
        rows = [{"path": str(r.path), "caption": c, "references": r.captions} for r, c in zip(records, captions)]
        write_text_atomic(Path(out), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} captions to {out}", file=sys.stderr)
    return result


@torch.inference_mode()
def describe_and_score(captioner: Captioner, features: torch.Tensor, records: list[ImageRecord],
                       decode=None, progress: bool = False) -> tuple[dict, list]:
    """Caption features as `captioner caption` does (routing, tag decoder and all) under `decode` (default: the
    model's) and score them: the scores, the person/dog hallucination and the scores of the images whose
    references name neither, the shares unsure and from tags; and the captions."""
    described = []
    for start in tqdm(range(0, len(features), DECODE_BATCH), desc="decoding", disable=not progress, file=sys.stderr):
        described += [c[0] for c in captioner.describe(features[start:start + DECODE_BATCH].to(captioner.device),
                                                       decode)]
    captions = [c.text for c in described]
    references = [[tokenize(c) for c in r.captions] for r in records]
    scores = caption_scores(references, [c.split() for c in captions])
    subset = without_person_dog(references)
    subset_scores = overlap_scores([references[i] for i in subset], [captions[i].split() for i in subset]) \
        if subset else None
    return {**scores, "without_person_dog": subset_scores,
            "unsure": sum(c.unsure for c in described) / len(described) if captioner.writer.domain else None,
            "from_tags": sum(c.from_tags for c in described) / len(described)}, described


def scores_text(result: dict) -> str:
    """evaluate's result as the line the command prints."""
    def scores(values: dict) -> str:
        return (", ".join(f"BLEU-{n} {values[f'bleu{n}']:.4f}" for n in range(1, 5))
                + f", CIDEr-D {values['cider_d']:.4f}, ROUGE-L {values['rouge_l']:.4f}")

    line = f"{result['dataset']} {result['split']} ({result['images']} images), {result['cells']}, " \
           f"beam {result['beam_size']}: "
    if result["person_dog_hallucination"] is None:
        return line + scores(result) + "; person/dog hallucination n/a (every image's references name a person " \
                                       "or a dog)"
    return (line + scores(result) + f"; person/dog hallucination {result['person_dog_hallucination']:.4f} on the "
            f"{result['images_without_person_dog']} images whose references name neither, there "
            + scores(result["without_person_dog"]))
