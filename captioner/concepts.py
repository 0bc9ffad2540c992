"""Visual concepts: the encoder's own ImageNet classifier, read as plain caption words.

The CNN that encodes a photo was trained to classify ImageNet's 1000 classes, and its head still
knows them ("Egyptian cat" 0.82, "espresso" 0.90) although Flickr8k's captions never name most
of them. `concept_words.tsv` (built by scripts/build_concept_words.py) maps each class to the
word a caption would use; a word's probability is the sum over its classes, so 118 dog breeds
at 0.05 each make "dog" 0.9. These are the `tags` every caption carries.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

CONCEPT_WORDS_FILE = Path(__file__).with_name("concept_words.tsv")
TOP_TAGS = 5
MIN_TAG_PROBABILITY = 0.05

Tag = tuple[str, float]


class ConceptWords:
    """ImageNet class probabilities [B, C] -> caption-word probabilities [B, W] and top tags."""

    def __init__(self, class_words: list[str]):
        self.class_words = list(class_words)  # per class, "" when no caption would name it
        self.words = sorted({w for w in self.class_words if w})
        position = {w: i for i, w in enumerate(self.words)}
        self.word_of_class = torch.tensor([position.get(w, -1) for w in self.class_words])

    @classmethod
    def load(cls, path: str | Path = CONCEPT_WORDS_FILE) -> "ConceptWords":
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if [int(r["index"]) for r in rows] != list(range(len(rows))):
            raise ValueError(f"{path}: rows must list the classes in order 0..{len(rows) - 1}")
        return cls([r["word"] for r in rows])

    def word_probabilities(self, class_probs: torch.Tensor) -> torch.Tensor:
        if class_probs.size(1) != len(self.class_words):
            raise ValueError(f"{class_probs.size(1)} class probabilities for a map of {len(self.class_words)} classes")
        named = self.word_of_class >= 0
        words = torch.zeros(class_probs.size(0), len(self.words), dtype=torch.float32)
        return words.index_add_(1, self.word_of_class[named], class_probs.float().cpu()[:, named])

    def tags(self, class_probs: torch.Tensor, top: int = TOP_TAGS,
             min_probability: float = MIN_TAG_PROBABILITY) -> list[list[Tag]]:
        """Per image, up to `top` (word, probability) pairs, most probable first, each >= min_probability."""
        return self.top_tags(self.word_probabilities(class_probs), top, min_probability)

    def top_tags(self, words: torch.Tensor, top: int = TOP_TAGS,
                 min_probability: float = MIN_TAG_PROBABILITY) -> list[list[Tag]]:
        """`tags` from word probabilities [B, W] already computed."""
        values, indices = words.topk(min(top, len(self.words)), dim=1)
        return [[(self.words[i], round(v, 3)) for v, i in zip(vs, idx) if v >= min_probability]
                for vs, idx in zip(values.tolist(), indices.tolist())]


_default: ConceptWords | None = None


def default_concept_words() -> ConceptWords:
    global _default
    if _default is None:
        _default = ConceptWords.load()
    return _default
