"""Training the fallback decoder (fallback.py): captions without photos in, a tags-to-caption GRU out.

    captioner train-fallback --captions coco-text/captions.tsv --out runs/fallback [--dev-data coco-ood-dev]

Read top to bottom: captions -> each caption's concept words (captions that name none are left
out: they could only teach the decoder a prior, "a man standing in a field") -> vocabulary ->
epochs, each with freshly drawn noisy tag vectors -> optional dev CIDEr-D on a folder of real
photos captioned from their real tags -> best.pt, a checkpoint like any other (decoder.inputs:
tags), which `captioner export MODEL OUT --fallback best.pt` puts inside a model.
"""
from __future__ import annotations

import json
import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import Config, DecoderConfig, EncoderConfig, TrainConfig
from .concepts import default_concept_words
from .data import DatasetError, load_refs_folder
from .decoder import build_decoder
from .encoder import encoder_from_config
from .fallback import CaptionConcepts, TagDecoder, caption_tag_vector
from .features import cached_features
from .inference import decode_features
from .metrics import caption_scores, mentions_person
from .text import Vocabulary, tokenize
from .evaluate import readable
from .files import write_metrics
from .train import learning_rate_schedule


def read_caption_lines(path: str | Path) -> list[str]:
    """Captions from a text file: a TSV with a `caption` column (coco-text's captions.tsv), else the last
    tab-separated field of each line (Flickr8k.token.txt), else the whole line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"{path}: no captions")
    header = lines[0].split("\t")
    if "caption" in header:
        column = header.index("caption")
        return [fields[column] for fields in (line.split("\t") for line in lines[1:]) if len(fields) > column]
    return [line.rsplit("\t", 1)[-1] for line in lines]


def train_fallback(captions_file: str | Path, out_dir: str | Path, encoder_config: EncoderConfig | None = None,
                   epochs: int = 3,
                   batch_size: int = 128, lr: float = 5e-4, seed: int = 0, min_word_count: int = 5,
                   cache_dir: str = ".cache/features", dev_folder: str | Path | None = None,
                   without_people: bool = False, progress: bool = True) -> Path:
    """Train the fallback decoder on captions alone, for a model with the encoder `encoder_config`.

    Each epoch draws fresh tag vectors for every caption. With `dev_folder` (a refs.jsonl folder of
    photos unlike Flickr8k's) each epoch captions its photos from their real tags and keeps the best
    CIDEr-D as best.pt; without it, the last epoch is best.pt. `without_people` leaves out the captions
    that name a person too: nothing in the tags can tell whether one is there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = Config(encoder=encoder_config or EncoderConfig(), decoder=DecoderConfig(cell="gru", dropout=0.3, inputs="tags"),
                    train=TrainConfig(out_dir=str(out_dir), cache_dir=cache_dir, epochs=epochs, batch_size=batch_size,
                                      lr=lr, seed=seed))
    named = CaptionConcepts(default_concept_words())
    captions = [tokenize(c) for c in read_caption_lines(captions_file)]
    concepts = [named(c) for c in captions]
    kept = [i for i, found in enumerate(concepts) if found and not (without_people and mentions_person(captions[i]))]
    print(f"{len(kept)} of {len(captions)} captions name a concept word" + (" and no person" if without_people else "")
          + "; the others are left out", file=sys.stderr)
    if not kept:
        raise DatasetError(f"{captions_file}: no caption names any of the concept words")
    captions, concepts = [captions[i] for i in kept], [concepts[i] for i in kept]
    vocab = Vocabulary.build(captions, min_word_count)
    encoder = encoder_from_config(config.encoder)
    decoder = build_decoder(len(vocab), encoder.feature_dim, config.decoder)
    frequency = torch.ones(len(decoder.concept_words.words))
    for found in concepts:
        frequency[list(found)] += 1
    tokens = pad_sequence([torch.tensor([vocab.bos, *vocab.encode(caption)[:config.data.max_caption_length], vocab.eos])
                           for caption in captions], batch_first=True, padding_value=vocab.pad)
    dev = _dev_set(encoder, dev_folder, cache_dir, progress) if dev_folder else None
    print(f"{len(captions)} captions, vocabulary {len(vocab)} words, {len(frequency)} concept words", file=sys.stderr)

    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    steps = math.ceil(len(captions) / batch_size) * epochs
    scheduler = learning_rate_schedule(optimizer, config, steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=vocab.pad, label_smoothing=config.train.label_smoothing)
    encoder_info = {"name": encoder.name, "weights": config.encoder.weights, "fingerprint": encoder.fingerprint(),
                    "feature_dim": encoder.feature_dim}
    history, best = [], -1.0
    for epoch in range(1, epochs + 1):
        decoder.train()
        inputs = torch.stack([caption_tag_vector(found, len(frequency), frequency, rng) for found in concepts])
        order = torch.randperm(len(captions))
        total = 0.0
        for start in tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}/{epochs}", disable=not progress,
                          file=sys.stderr):
            batch = order[start:start + batch_size]
            caption_ids = tokens[batch][:, : int((tokens[batch] != vocab.pad).sum(1).max())]
            logits = decoder(inputs[batch], caption_ids[:, :-1])
            loss = loss_fn(logits.reshape(-1, logits.size(-1)), caption_ids[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(decoder.parameters(), config.train.grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        record = {"epoch": epoch, "train_loss": total / len(captions)}
        if dev is not None:
            record.update({f"dev_{k}": v for k, v in _score_dev(decoder, vocab, config, *dev).items()})
        history.append(record)
        print(json.dumps(record), file=sys.stderr)
        score = record.get("dev_cider_d", epoch)
        provenance = {"captions": str(captions_file), "caption_count": len(captions), "without_people": without_people,
                      "epoch": epoch, "dev": record, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "torch": str(torch.__version__)}
        if score > best:
            best = score
            save_checkpoint(out_dir / "best.pt", config, vocab, decoder, encoder_info, provenance)
        write_metrics(out_dir, history)
    return out_dir / "best.pt"


def _dev_set(encoder, folder, cache_dir: str, progress: bool):
    records = load_refs_folder(folder).split("test")
    table = cached_features(encoder, [r.path for r in records], cache_dir, 4, 0, "cpu", progress)
    records = readable(records, table)
    class_probs = encoder.classify(table.lookup([r.path for r in records]).float())
    return class_probs, [[tokenize(c) for c in r.captions] for r in records]


@torch.inference_mode()
def _score_dev(decoder: TagDecoder, vocab: Vocabulary, config: Config, class_probs, references) -> dict:
    decoder.eval()
    captions = decode_features(decoder, vocab, decoder.tag_vector(class_probs), config.decode)
    scores = caption_scores(references, [c[0].text.split() for c in captions])
    return {k: round(v, 5) for k, v in scores.items() if isinstance(v, float)}
