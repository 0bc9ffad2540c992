"""When a photo is unlike anything the model learned from: a caption written from its tags.

The photo decoder learned Flickr8k's world of people and dogs from 6,000 photos, and writes that
world into any photo. For photos it does not know (routing.py), a second, small decoder
captions from what the encoder's ImageNet head sees instead: the photo's tags (concepts.py), as
the initial state of a GRU (the "attributes into the LSTM" idea of LSTM-A, Yao et al. 2017). It
learns from captions alone, with no photos (as DCC and NOC taught novel objects from unpaired
text): each training caption's own words give its tags, with noise that mimics the classifier's
(missed objects, wrong extra tags, unsure probabilities).

    tag vector [W] = probability of each of the W concept words among the photo's top tags

No person input: ImageNet has no person class, and a probe trained on Flickr8k's photos (where
"no person" means "a dog") said "person" for half of the everyday photos without one.

Words the captions never taught (a quarter of the concept words: lion, owl, rocket, camel...)
are borrowed, as DCC's "direct transfer" borrows a similar known word's weights: a photo tagged
"rocket" is captioned as if it were tagged with the sayable concept word whose ImageNet classes
the encoder's head sees as most alike ("plane", by the cosine of their classifier weights), and
that word is then written as "rocket" ("a rocket flying in the sky").
"""
from __future__ import annotations

import random

import torch
from torch import nn

from .concepts import ConceptWords
from .decoder import CaptionDecoder
from .routing import PERSON_WORDS, mentions_dog
from .text import Vocabulary

BORROW_MIN_SIMILARITY = 0.2  # below it the nearest sayable word is no stand-in (gun -> vest 0.14)


def singular(word: str) -> str:
    """A rough singular, enough to match caption words to concept words ("dogs" -> dog, "benches" -> bench)."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "oes")) and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


class WordBorrowing:
    """Concept words the fallback cannot say, each captioned through a sayable stand-in."""

    def __init__(self, concept_words: ConceptWords, vocab: Vocabulary, class_weights: torch.Tensor,
                 min_similarity: float = BORROW_MIN_SIMILARITY):
        self.words = concept_words.words
        rows = nn.functional.normalize(class_weights.detach().float().cpu(), dim=1)
        word_of_class = concept_words.word_of_class
        directions = torch.stack([nn.functional.normalize(rows[word_of_class == i].mean(0), dim=0)
                                  for i in range(len(self.words))])
        sayable = torch.tensor([all(t in vocab.index for t in w.split()) for w in self.words])
        similarity = (directions @ directions.T).masked_fill(~sayable, -2.0)
        best, stand_in = similarity.max(dim=1)
        self.stand_in = {i: int(stand_in[i]) for i, w in enumerate(self.words)
                         if not sayable[i] and best[i] >= min_similarity and not set(w.split()) & PERSON_WORDS}

    def lend(self, tag_vectors: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, str]]]:
        """Tag vectors [B, W] -> the vectors with each unsayable tag's probability moved to its stand-in
        (where the tag outweighs the stand-in's own), and per row {stand-in word: word to write}."""
        vectors, strongest = tag_vectors.clone(), [{} for _ in range(len(tag_vectors))]
        for word, stand_in in self.stand_in.items():
            for row in (tag_vectors[:, word] > tag_vectors[:, stand_in]).nonzero().flatten().tolist():
                probability, name = float(tag_vectors[row, word]), self.words[stand_in]
                if name not in strongest[row] or probability > strongest[row][name][1]:  # the strongest names it
                    strongest[row][name] = (self.words[word], probability)
                vectors[row, stand_in] += vectors[row, word]
                vectors[row, word] = 0.0
        renames = [{name: word for name, (word, _) in row.items()} for row in strongest]
        return vectors, renames

    @staticmethod
    def rename(text: str, renames: dict[str, str]) -> str:
        """Write each stand-in word of a caption as the word it stands for, keeping the number."""
        tokens = text.split()
        for stand_in, word in renames.items():
            width, out, i = len(stand_in.split()), [], 0
            while i < len(tokens):
                span = tokens[i:i + width]
                if len(span) == width and [singular(t) for t in span] == [singular(t) for t in stand_in.split()]:
                    number_plural = singular(span[-1]) != span[-1] and singular(stand_in.split()[-1]) == stand_in.split()[-1]
                    named = word.split()
                    out += named[:-1] + [plural(named[-1]) if number_plural else named[-1]]
                    i += width
                else:
                    out.append(tokens[i])
                    i += 1
            tokens = out
        return " ".join(tokens)


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
    probability in [0.1, 0.95], up to two wrong tags at [0.05, 0.3], then scaled to sum to 1 as
    `TagDecoder.tag_vector` scales a photo's."""
    vector = torch.zeros(size)
    for concept in concepts:
        if rng.random() < 0.8:
            vector[concept] = rng.uniform(0.1, 0.95)
    for _ in range(rng.choice((0, 0, 1, 2))):
        wrong = torch.multinomial(frequency, 1, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
        vector[int(wrong)] += rng.uniform(0.05, 0.3)
    total = float(vector.sum())
    return vector / total if total > 0 else vector


# Words a caption may repeat; any other word a fallback caption writes at most once.
FUNCTION_WORDS = frozenset("""
    a an the of and or with on in at to for from by into onto over under near next top front side up down
    is are was were be being has have its it his her their that this there some two three four several many
    other another while as out off
""".split())


class OnceOnlyWords:
    """A decoder under which each word outside FUNCTION_WORDS is written at most once. A caption from a
    few strong tags otherwise repeats its nouns ("a refrigerator refrigerator freezer and refrigerator",
    "a white and white cat"). The state carries which words were written, so any search can use it."""

    def __init__(self, decoder: CaptionDecoder, vocab: Vocabulary):
        self.decoder = decoder
        self.once_only = torch.tensor([w not in FUNCTION_WORDS and i >= 4 for i, w in enumerate(vocab.words)])

    def init_state(self, features: torch.Tensor):
        written = torch.zeros(1, len(features), len(self.once_only), dtype=torch.bool, device=features.device)
        return self.decoder.init_state(features), written

    def step(self, tokens: torch.Tensor, state):
        inner, written = state
        log_probs, inner = self.decoder.step(tokens, inner)
        written = written.clone()
        written[0, torch.arange(len(tokens), device=tokens.device), tokens] = True
        once_only = self.once_only.to(written.device)
        return log_probs.masked_fill(written[0] & once_only, float("-inf")), (inner, written)
