"""Features -> captions: the photo decoder, the tag decoder, and the routing between them.

    features [B, D] -> signals (tags, familiarity, person, dog; routing.py)
                    -> route: the photo decoder writes the photo's caption, or the tag decoder writes it from
                       the tags (a photo unlike the training photos)
                    -> the dog and person checks read the photo decoder's words; a caption that fails them
                       is unsure and written again from the tags (the only second pass)
                    -> Caption(text, score, tags, confidence, unsure, from_tags)

A decoder here is anything search.py can search (`init_state`, `step`): the torch decoder, or its
steps on ONNX Runtime (onnx_runtime.DecoderSession), which the caller chooses through `stepper`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .concepts import ConceptWords, Tag
from .config import DecodeConfig, RoutingConfig, picked_cells
from .confidence import DomainProfile
from .decoder import Ensemble, TagDecoder
from .fallback import OnceOnlyWords, WordBorrowing
from .routing import PHOTO, TAGS, batch_signals, route
from .search import beam_search, greedy_search, word_log_probs
from .text import Vocabulary


@dataclass
class Caption:
    text: str
    score: float  # log-probability / (words + 1)**length_penalty
    finished: bool  # False when cut at max_length
    tags: list[Tag] = field(default_factory=list)  # what the encoder's ImageNet head sees, as caption words
    confidence: float | None = None  # how familiar the photo is to the model, in [0, 1] (None: not known)
    unsure: bool = False  # the photo is unfamiliar, or the caption names a person or dog not seen (routing.py)
    from_tags: bool = False  # written by the tag decoder from the tags, not by the photo decoder
    word_probs: list[float] | None = None  # each word's probability given the words before it (on request)


def decode_features(decoder, vocab: Vocabulary, features: torch.Tensor, options: DecodeConfig,
                    n_best: int = 1, word_probs: bool = False) -> list[list[Caption]]:
    """Features [B, D] -> the n best captions per image, batched; with `word_probs`, each word's probability."""
    common = dict(max_length=options.max_length, min_length=options.min_length,
                  no_repeat_ngram_size=options.no_repeat_ngram_size, length_penalty=options.length_penalty)
    if options.beam_size == 1 and n_best == 1:
        results = [[h] for h in greedy_search(decoder, features, **common)]
    else:
        results = beam_search(decoder, features, beam_size=max(options.beam_size, n_best), n_best=n_best, **common)
    captions = [[Caption(" ".join(vocab.decode(h.tokens)), h.score, h.finished) for h in hyps] for hyps in results]
    if word_probs:
        rows = torch.tensor([image for image, hyps in enumerate(results) for _ in hyps], device=features.device)
        scored = iter(word_log_probs(decoder, features[rows], [h.tokens for hyps in results for h in hyps]))
        for caption in (c for image_captions in captions for c in image_captions):
            caption.word_probs = [math.exp(value) for value in next(scored)]
    return captions


def unchanged(decoder):
    """The stepper that searches a decoder as it is (in PyTorch)."""
    return decoder


class TagWriter:
    """Captions from tags: the tag decoder, each content word written once, unsayable tags borrowed (fallback.py)."""

    def __init__(self, vocab: Vocabulary, decoder: TagDecoder, class_weights: torch.Tensor,
                 concept_words: ConceptWords, stepper: Callable = unchanged):
        self.vocab, self.decoder = vocab, decoder
        self.searched = OnceOnlyWords(stepper(decoder), vocab)
        self.borrowing = WordBorrowing(concept_words, vocab, class_weights)

    def write(self, tags: list[list[Tag]], decode: DecodeConfig, n_best: int = 1,
              device: torch.device | str = "cpu") -> list[list[Caption]]:
        vectors, renames = self.borrowing.lend(self.decoder.tag_vectors(tags))  # [B, W]
        captions = decode_features(self.searched, self.vocab, vectors.to(device), decode, n_best)
        return [[replace(c, text=self.borrowing.rename(c.text, image_renames), from_tags=True) for c in image_captions]
                for image_captions, image_renames in zip(captions, renames)]


class CaptionWriter:
    """Features of a batch -> captions, each written by the decoder the routing picks (routing.py).

    `decoders` are the model's photo decoders by cell, its own first; decode.cells picks one, or several that
    write together (decoder.Ensemble)."""

    def __init__(self, vocab: Vocabulary, decoders: dict, classify: Callable, concept_words: ConceptWords,
                 domain: DomainProfile | None = None, tag_writer: TagWriter | None = None,
                 stepper: Callable = unchanged):
        self.vocab, self.decoders = vocab, decoders
        self.decoder = next(iter(decoders.values()))  # the model's own
        self.stepped = {cell: stepper(decoder) for cell, decoder in decoders.items()}
        self.classify = classify  # pooled features [B, D] -> the ImageNet head's class probabilities [B, 1000]
        self.concept_words, self.domain, self.tag_writer = concept_words, domain, tag_writer

    @property
    def searched(self):
        """The model's own cell, as the searches step it."""
        return self.stepped[self.decoder.cell]

    def searcher(self, cells: str):
        """What the searches step for decode.cells: one cell's decoder, or the ensemble of several."""
        weights = picked_cells(cells, self.decoder.cell, self.decoders)
        if len(weights) == 1:
            return self.stepped[next(iter(weights))]
        return Ensemble({cell: self.stepped[cell] for cell in weights}, weights)

    @torch.inference_mode()
    def describe(self, features: torch.Tensor, decode: DecodeConfig, routing: RoutingConfig,
                 n_best: int = 1, word_probs: bool = False) -> list[list[Caption]]:
        """Features [B, D] (or grid cells [B, L, D]) -> the n best captions per image; with `word_probs`, the
        photo decoder's captions carry each word's probability."""
        pooled = features.float().mean(1) if self.decoder.uses_grid else features
        signals = batch_signals(pooled, self.classify(pooled), self.concept_words, self.domain)
        has_tags = self.tag_writer is not None
        routes = [route(s, routing, has_tags) for s in signals]
        captions: list[list[Caption]] = [[] for _ in signals]
        from_photo = [i for i, r in enumerate(routes) if r.writer == PHOTO]
        if from_photo:
            rows = torch.tensor(from_photo, device=features.device)
            written = decode_features(self.searcher(decode.cells), self.vocab, features[rows], decode, n_best,
                                      word_probs)
            for i, image_captions in zip(from_photo, written):
                captions[i] = image_captions
                # The second look: the dog and person checks read the words the photo decoder wrote.
                routes[i] = route(signals[i], routing, has_tags, image_captions[0].text.split())
        from_tags = [i for i, r in enumerate(routes) if r.writer == TAGS]
        if from_tags:
            written = self.tag_writer.write([signals[i].tags for i in from_tags], decode, n_best, features.device)
            for i, image_captions in zip(from_tags, written):
                captions[i] = image_captions
        for image_captions, image_signals, image_route in zip(captions, signals, routes):
            for caption in image_captions:
                caption.tags, caption.confidence = image_signals.tags, image_signals.familiarity
                caption.unsure = image_route.unsure
        return captions
