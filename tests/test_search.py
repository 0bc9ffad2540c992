"""Greedy and beam search: exactness on models whose probabilities the test sets, and the edge cases."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder, build_decoder
from captioner.search import BOS_ID, EOS_ID, NEVER_EMITTED, beam_search, greedy_search

A, B, C = 4, 5, 6  # word ids after <pad> <bos> <eos> <unk>


class MarkovModel:
    """Next-token probabilities depend only on the previous token: table[prev] is a distribution."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 7):
        self.log_probs = torch.full((vocab_size, vocab_size), -30.0)
        for prev, row in table.items():
            for token, p in row.items():
                self.log_probs[prev, token] = math.log(p)

    def init_state(self, features):
        return features.new_zeros(1, features.size(0), 1)

    def step(self, tokens, state):
        return self.log_probs[tokens].clone(), state


def random_decoder(vocab_size: int, seed: int, cell: str = "lstm", attention: bool = False) -> CaptionDecoder:
    torch.manual_seed(seed)
    config = DecoderConfig(cell=cell, embed_dim=8, hidden_dim=12, dropout=0.0, attention=attention, attention_dim=6)
    decoder = build_decoder(vocab_size, 16, config)
    with torch.no_grad():
        decoder.out.weight.mul_(8)  # peaky distributions, so search choices matter
    return decoder.eval()


def random_features(decoder, images: int) -> torch.Tensor:
    """Pooled [N, 16] features, or a 5-cell grid [N, 5, 16] for the attention decoder."""
    return torch.randn(images, 5, 16) if decoder.uses_grid else torch.randn(images, 16)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", [False, True])
def test_teacher_forcing_matches_step_by_step_decoding(cell, attention):
    model = random_decoder(20, 1, cell, attention)
    features, tokens = random_features(model, 3), torch.randint(4, 20, (3, 6))
    tokens[:, 0] = BOS_ID
    with torch.no_grad():
        forced = torch.log_softmax(model(features, tokens), dim=-1)
        state = model.init_state(features)
        for t in range(tokens.size(1)):
            log_probs, state = model.step(tokens[:, t], state)
            torch.testing.assert_close(log_probs, forced[:, t], rtol=1e-4, atol=1e-5)


def sequence_log_prob(model, features, words: list[int], finished: bool) -> float:
    state = model.init_state(features)
    total, previous = 0.0, BOS_ID
    for token in words + ([EOS_ID] if finished else []):
        log_probs, state = model.step(torch.tensor([previous]), state)
        total += log_probs[0, token].item()
        previous = token
    return total


def test_beam_finds_what_greedy_misses_and_matches_exhaustive():
    model = MarkovModel({BOS_ID: {A: 0.55, B: 0.45}, A: {EOS_ID: 0.4, A: 0.3, B: 0.3}, B: {EOS_ID: 0.9, A: 0.1}})
    features = torch.zeros(1, 4)
    assert greedy_search(model, features, max_length=5)[0].tokens == [A]
    best = beam_search(model, features, beam_size=2, max_length=5)[0][0]
    assert best.tokens == [B] and best.finished
    assert best.log_prob == pytest.approx(math.log(0.45 * 0.9), abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(seed, length_penalty):
    vocab_size, max_length = 7, 4
    model = random_decoder(vocab_size, seed)
    features = torch.randn(1, 16)
    words = (A, B, C)
    best_score, best_words = -math.inf, None
    for length in range(1, max_length):  # min_length=1: at least one word before <eos>
        for candidate in itertools.product(words, repeat=length):
            total = sequence_log_prob(model, features, list(candidate), finished=True)
            score = total / (length + 1) ** length_penalty if length_penalty else total
            if score > best_score:
                best_score, best_words = score, list(candidate)
    found = beam_search(model, features, beam_size=200, max_length=max_length, length_penalty=length_penalty)[0][0]
    assert found.tokens == best_words
    assert found.score == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("ngram", [0, 2, 3])
@pytest.mark.parametrize("attention", [False, True])
def test_beam_size_one_is_exactly_greedy(cell, ngram, attention):
    for seed in range(5):
        model = random_decoder(40, seed, cell, attention)
        features = random_features(model, 8)
        greedy = greedy_search(model, features, max_length=12, no_repeat_ngram_size=ngram)
        beam = beam_search(model, features, beam_size=1, max_length=12, no_repeat_ngram_size=ngram)
        assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]
        assert [g.finished for g in greedy] == [b[0].finished for b in beam]


@pytest.mark.parametrize("attention", [False, True])
def test_batched_beam_equals_one_image_at_a_time(attention):
    model = random_decoder(30, 7, attention=attention)
    features = random_features(model, 6)
    batched = beam_search(model, features, beam_size=4, max_length=10, no_repeat_ngram_size=2, n_best=3)
    for i in range(6):
        single = beam_search(model, features[i:i + 1], beam_size=4, max_length=10, no_repeat_ngram_size=2, n_best=3)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)


def test_n_best_are_distinct_and_sorted_by_score():
    model = random_decoder(30, 3)
    hypotheses = beam_search(model, torch.randn(2, 16), beam_size=5, max_length=8, n_best=5)
    for hyps in hypotheses:
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5


def test_never_emits_special_tokens_even_when_the_model_prefers_them():
    model = MarkovModel({BOS_ID: {0: 0.5, 3: 0.3, A: 0.2}, A: {1: 0.6, 3: 0.3, EOS_ID: 0.1}})
    for hyps in beam_search(model, torch.zeros(1, 4), beam_size=3, max_length=6, n_best=3):
        for h in hyps:
            assert not set(h.tokens) & set(NEVER_EMITTED)
    assert not set(greedy_search(model, torch.zeros(1, 4), max_length=6)[0].tokens) & set(NEVER_EMITTED)


def test_no_beam_ends_returns_best_unfinished_hypothesis():
    model = MarkovModel({BOS_ID: {A: 0.7, B: 0.3}, A: {A: 0.6, B: 0.4}, B: {A: 0.5, B: 0.5}})  # <eos> ~ never
    hyps = beam_search(model, torch.zeros(1, 4), beam_size=3, max_length=5, n_best=2)[0]
    assert len(hyps) == 2
    assert all(len(h.tokens) == 5 and not h.finished for h in hyps)
    assert hyps[0].tokens == [A, A, A, A, A]


def test_min_and_max_length():
    model = MarkovModel({BOS_ID: {EOS_ID: 0.9, A: 0.1}, A: {EOS_ID: 0.9, B: 0.1}, B: {EOS_ID: 0.9, A: 0.1}})
    for min_length in (0, 2, 3):
        greedy = greedy_search(model, torch.zeros(1, 4), max_length=6, min_length=min_length)[0]
        beam = beam_search(model, torch.zeros(1, 4), beam_size=3, max_length=6, min_length=min_length)[0][0]
        assert len(greedy.tokens) == min_length and len(beam.tokens) == min_length
    assert len(greedy_search(model, torch.zeros(1, 4), max_length=2, min_length=2)[0].tokens) == 2


def test_repeat_blocking_removes_repeated_ngrams():
    model = MarkovModel({BOS_ID: {A: 0.9, B: 0.1}, A: {A: 0.8, B: 0.15, EOS_ID: 0.05},
                         B: {A: 0.8, B: 0.15, EOS_ID: 0.05}})
    unblocked = greedy_search(model, torch.zeros(1, 4), max_length=6)[0].tokens
    assert unblocked == [A] * 6
    for search in (lambda **k: greedy_search(**k)[0], lambda **k: beam_search(beam_size=3, **k)[0][0]):
        tokens = search(model=model, features=torch.zeros(1, 4), max_length=8, no_repeat_ngram_size=2).tokens
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams)), tokens
