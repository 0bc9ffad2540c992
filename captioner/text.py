"""Tokenisation and the vocabulary: the one place captions become token ids and back."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import cache

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@cache
def _treebank():
    """nltk's rule-based Treebank tokenizer (no downloaded data), imported on first use: importing nltk
    takes 0.3 s, which captioning photos never needs."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Lowercase Treebank tokens, keeping only those with a letter or digit (drops '.', ',')."""
    return [token for token in _treebank().tokenize(caption.lower()) if any(ch.isalnum() for ch in token)]


class Vocabulary:
    """Word <-> id mapping; ids 0-3 are <pad> <bos> <eos> <unk>."""

    def __init__(self, words: Iterable[str]):
        self.words = list(words)
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.index = {word: i for i, word in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary has duplicate words")
        self.pad, self.bos, self.eos, self.unk = range(4)

    @classmethod
    def build(cls, tokenized_captions: Iterable[list[str]], min_count: int) -> "Vocabulary":
        counts = Counter(token for caption in tokenized_captions for token in caption)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(token, self.unk) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids to words, stopping at <eos> and leaving out the other special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i > self.unk:
                words.append(self.words[i])
        return words
