"""The tag decoder's training data: captions without photos, each with tags drawn from its own words.

    caption file (data.annotations) -> the captions that name a concept word (the others could only
        teach a prior, "a man standing in a field"), without those naming a person if data.without_people
    -> vocabulary and token ids
    -> each epoch, every caption's tag vector drawn afresh, with the classifier's noise (fallback.py)
    dev (data.dev_folder): photos unlike the training ones, captioned from their real tags by the tag
        decoder as `captioner caption` writes them (describe.TagWriter: once-only words, borrowed words)

train.py trains on it with the same loop as the photo decoder (`data.format: captions`).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from .concepts import default_concept_words
from .config import Config, DecodeConfig
from .data import DatasetError, load_refs_folder
from .describe import TagWriter
from .evaluate import readable
from .features import cached_features
from .fallback import CaptionConcepts, caption_tag_vector
from .metrics import caption_scores
from .routing import mentions_person
from .text import Vocabulary, tokenize


def read_caption_lines(path: str | Path) -> list[str]:
    """Captions from a text file: a TSV with a `caption` column (coco-text's captions.tsv), else the last
    tab-separated field of each line (Flickr8k.token.txt), else the whole line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read captions from {path}: {error}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"{path}: no captions")
    header = lines[0].split("\t")
    if "caption" in header:
        column = header.index("caption")
        return [fields[column] for fields in (line.split("\t") for line in lines[1:]) if len(fields) > column]
    return [line.rsplit("\t", 1)[-1] for line in lines]


class TagCaptions:
    """The training captions, their concept words, and each epoch's tag vectors."""

    def __init__(self, config: Config, log=print):
        path, named = config.data.annotations, CaptionConcepts(default_concept_words())
        captions = [tokenize(c) for c in read_caption_lines(path)]
        concepts = [named(c) for c in captions]
        kept = [i for i, found in enumerate(concepts)
                if found and not (config.data.without_people and mentions_person(captions[i]))]
        log(f"{len(kept)} of {len(captions)} captions name a concept word"
            + (" and no person" if config.data.without_people else "") + "; the others are left out")
        if not kept:
            raise DatasetError(f"{path}: no caption names any of the concept words")
        self.captions, self.concepts = [captions[i] for i in kept], [concepts[i] for i in kept]
        self.size, self.seed = len(default_concept_words().words), config.train.seed
        self.frequency = torch.ones(self.size)  # how often each concept is named: wrong tags are drawn by it
        for found in self.concepts:
            self.frequency[list(found)] += 1
        self._epoch, self._vectors = None, None

    def tokens(self, vocab: Vocabulary, max_words: int) -> torch.Tensor:
        """Every caption, <bos> words <eos>, padded: [captions, longest]."""
        rows = [torch.tensor([vocab.bos, *vocab.encode(c)[:max_words], vocab.eos]) for c in self.captions]
        return pad_sequence(rows, batch_first=True, padding_value=vocab.pad)

    def __call__(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """The tag vectors [B, W] of captions `rows` in `epoch`: drawn once per epoch, from a seed of its own
        (so a resumed run draws what the uninterrupted one did)."""
        if self._epoch != epoch:
            rng = random.Random(self.seed * 1000 + epoch)
            self._vectors = torch.stack([caption_tag_vector(found, self.size, self.frequency, rng)
                                         for found in self.concepts])
            self._epoch = epoch
        return self._vectors[rows]


class TagDev:
    """Dev photos unlike the training ones, scored as the tag decoder captions them for users."""

    def __init__(self, folder: str, encoder, cache_dir: str, progress: bool):
        records = load_refs_folder(folder).split("test")
        table = cached_features(encoder, [r.path for r in records], cache_dir, 4, 0, "cpu", progress)
        records = readable(records, table)
        class_probs = encoder.classify(table.lookup([r.path for r in records]).float())
        self.tags = default_concept_words().tags(class_probs)
        self.class_weights = encoder.class_weights()
        self.references = [[tokenize(c) for c in r.captions] for r in records]
        print(f"dev: {len(records)} photos of {folder}", file=sys.stderr)

    @torch.inference_mode()
    def score(self, decoder, vocab: Vocabulary, decode: DecodeConfig) -> dict:
        decoder.eval()
        writer = TagWriter(vocab, decoder, self.class_weights, default_concept_words())
        captions = writer.write(self.tags, decode, device=next(decoder.parameters()).device)
        return caption_scores(self.references, [c[0].text.split() for c in captions])
