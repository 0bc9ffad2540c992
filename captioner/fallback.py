"""When a photo is unlike anything the model learned from: a caption written from its tags.

The scene decoder learned Flickr8k's world of people and dogs from 6,000 photos, and writes that
world into any photo. For photos it is unsure of (confidence.py), a second, small decoder
captions from what the encoder's ImageNet head sees instead: the photo's tags (concepts.py), as
the initial state of a GRU (the "attributes into the LSTM" idea of LSTM-A, Yao et al. 2017). It
learns from captions alone, with no photos (as DCC and NOC taught novel objects from unpaired
text): each training caption's own words give its tags, with noise that mimics the classifier's
(missed objects, wrong extra tags, unsure probabilities).

    tag vector [W] = probability of each of the W concept words among the photo's top tags

No person input: ImageNet has no person class, and a probe trained on Flickr8k's photos (where
"no person" means "a dog") said "person" for half of the everyday photos without one.
"""
from __future__ import annotations

import random

import torch
from torch import nn

from .concepts import ConceptWords, default_concept_words
from .config import DecoderConfig
from .decoder import CaptionDecoder
from .metrics import mentions_dog


def singular(word: str) -> str:
    """A rough singular, enough to match caption words to concept words ("dogs" -> dog, "benches" -> bench)."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "oes")) and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


class CaptionConcepts:
    """Which concept words a tokenised caption names (one- and two-word ones, any number)."""

    def __init__(self, concept_words: ConceptWords):
        self.index = {" ".join(singular(t) for t in word.split()): i for i, word in enumerate(concept_words.words)}
        self.dog = self.index.get("dog")

    def __call__(self, tokens: list[str]) -> set[int]:
        words = [singular(t) for t in tokens]
        found = {self.index[w] for w in words if w in self.index}
        found |= {self.index[f"{a} {b}"] for a, b in zip(words, words[1:]) if f"{a} {b}" in self.index}
        if self.dog in found and not mentions_dog(tokens):  # "hot dog": food
            found.discard(self.dog)
        return found


def caption_tag_vector(concepts: set[int], size: int, frequency: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The tag vector a photo of this caption might get: each named concept kept with p 0.8 at a
    probability in [0.1, 0.95], up to two wrong tags at [0.05, 0.3], all scaled to sum at most 1."""
    vector = torch.zeros(size)
    for concept in concepts:
        if rng.random() < 0.8:
            vector[concept] = rng.uniform(0.1, 0.95)
    for _ in range(rng.choice((0, 0, 1, 2))):
        wrong = torch.multinomial(frequency, 1, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
        vector[int(wrong)] += rng.uniform(0.05, 0.3)
    total = float(vector.sum())
    return vector / total if total > 1 else vector  # a softmax's words share at most 1


class TagDecoder(CaptionDecoder):
    """A caption decoder whose initial state comes from a tag vector [W] instead of CNN features;
    `tag_vector` turns the encoder's class probabilities into it."""

    def __init__(self, vocab_size: int, feature_dim: int, config: DecoderConfig,
                 concept_words: ConceptWords | None = None):
        super().__init__(vocab_size, feature_dim, config)
        self.concept_words = concept_words or default_concept_words()
        size = len(self.concept_words.words)
        self.feature_norm = nn.Identity()  # probabilities: their size is the message
        self.feature_dropout = nn.Identity()  # the training noise already drops tags, as the classifier misses them
        self.init_h = nn.Linear(size, config.num_layers * config.hidden_dim)
        nn.init.normal_(self.init_h.weight, std=1.0)  # a tag is an embedding row, strong from the start
        self.init_c = nn.Linear(size, config.num_layers * config.hidden_dim) if config.cell == "lstm" else None

    def tag_vector(self, class_probs: torch.Tensor) -> torch.Tensor:
        """The encoder's class probabilities [B, 1000] -> tag vectors [B, W]: the top tags' probabilities."""
        vector = torch.zeros(len(class_probs), len(self.concept_words.words))
        position = {word: i for i, word in enumerate(self.concept_words.words)}
        for row, tags in enumerate(self.concept_words.tags(class_probs)):
            for word, probability in tags:
                vector[row, position[word]] = probability
        return vector.to(class_probs.device)

