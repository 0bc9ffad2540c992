"""Greedy and beam search: exactness on models whose probabilities the test sets, and the edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from captioner import search
from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder, build_decoder, select_state
from captioner.search import BOS_ID, EOS_ID, NEVER_EMITTED, Hypothesis, _mask, beam_search, greedy_search

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


class OneWordAfterEach:
    """A random decoder that may say any word first but then only one word (or <eos>) after each
    word: so few prefixes that a beam keeping all of them still has `beam_size` finished by step 2."""

    def __init__(self, decoder, vocab_size: int):
        self.decoder = decoder
        self.allowed = torch.zeros(vocab_size, vocab_size, dtype=torch.bool)
        self.allowed[BOS_ID, A:] = True
        for word in range(A, vocab_size):
            self.allowed[word, [EOS_ID, A + (word - A + 1) % (vocab_size - A)]] = True

    def init_state(self, features):
        return self.decoder.init_state(features)

    def step(self, tokens, state):
        log_probs, state = self.decoder.step(tokens, state)
        return log_probs.masked_fill(~self.allowed[tokens], -math.inf), state


@torch.inference_mode()
def exhaustive_captions(model, features, max_length: int, min_length: int = 1) -> list[tuple[float, list[int]]]:
    """(log-prob, words) of every caption a search could finish for one image ([1, D] features):
    min_length to max_length - 1 words and <eos>, a whole level of prefixes per model step."""
    state, last = model.init_state(features), torch.tensor([BOS_ID])
    prefixes, totals, captions = [[]], torch.zeros(1), []
    for length in range(max_length):
        log_probs, state = model.step(last, state)
        if length >= min_length:
            captions += [(t, p) for t, p in zip((totals + log_probs[:, EOS_ID]).tolist(), prefixes) if t > -math.inf]
        extended = totals.unsqueeze(1) + log_probs[:, A:]  # every word after the special tokens
        parent, column = torch.isfinite(extended).nonzero(as_tuple=True)
        prefixes = [prefixes[p] + [A + c] for p, c in zip(parent.tolist(), column.tolist())]
        totals, last, state = extended[parent, column], A + column, select_state(state, parent)
    return captions


def best_caption(captions, length_penalty: float) -> tuple[float, list[int]]:
    """The best (score, words) with lengths of words + 1, as the search scores them."""
    return max((total / (len(words) + 1) ** length_penalty, words) for total, words in captions)


@torch.inference_mode()
def old_beam_search(model, features, beam_size, max_length, min_length=1, no_repeat_ngram_size=0,
                    length_penalty=0.0, n_best=1, stop_early=True) -> list[list[Hypothesis]]:
    """beam_search before #15: an image stops once `beam_size` hypotheses have finished (with
    stop_early=False: only when every beam has ended or at max_length). Lengths are words + 1
    throughout, as now (before, a caption cut at max_length counted its words only)."""
    batch, k = features.size(0), beam_size
    n_best = min(n_best, k)
    state = select_state(model.init_state(features), torch.arange(batch).repeat_interleave(k))
    tokens = torch.full((batch * k, 1), BOS_ID, dtype=torch.long)
    scores = torch.full((batch, k), -math.inf)
    scores[:, 0] = 0.0
    alive, finished, positions = torch.arange(batch), [[] for _ in range(batch)], torch.arange(2 * k)

    def hypothesis(words, total, ended):
        return Hypothesis(words, total / (len(words) + 1) ** length_penalty, total, ended)

    for step in range(max_length):
        n = alive.numel()
        log_probs, state = model.step(tokens[:, -1], state)
        log_probs = _mask(log_probs, tokens[:, 1:], step, min_length, no_repeat_ngram_size)
        vocab = log_probs.size(1)
        top_scores, top_index = (scores.view(-1, 1) + log_probs).view(n, k * vocab).topk(2 * k, dim=1)
        origin, word = top_index // vocab, top_index % vocab
        ends = (word == EOS_ID) & torch.isfinite(top_scores)
        for i, j in ends[:, :k].nonzero().tolist():
            words = tokens[i * k + origin[i, j], 1:].tolist()
            finished[alive[i]].append(hypothesis(words, top_scores[i, j].item(), True))
        order = (ends.long() * (2 * k) + positions).argsort(dim=1)[:, :k]
        scores = top_scores.gather(1, order).masked_fill(ends.gather(1, order), -math.inf)
        rows = (torch.arange(n).unsqueeze(1) * k + origin.gather(1, order)).view(-1)
        tokens = torch.cat([tokens[rows], word.gather(1, order).view(-1, 1)], dim=1)
        state = select_state(state, rows)
        done = ~torch.isfinite(scores).any(1)
        if stop_early:
            done |= torch.tensor([len(finished[b]) >= k for b in alive.tolist()])
        if done.all():
            break
        keep = (~done).nonzero().squeeze(1)
        alive, scores = alive[keep], scores[keep]
        rows = (keep.unsqueeze(1) * k + torch.arange(k)).view(-1)
        tokens, state = tokens[rows], select_state(state, rows)
    else:
        for i, b in enumerate(alive.tolist()):
            if len(finished[b]) < n_best:
                finished[b] += [hypothesis(tokens[i * k + j, 1:].tolist(), scores[i, j].item(), False)
                                for j in range(k) if math.isfinite(scores[i, j].item())]
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]


def test_beam_finds_what_greedy_misses_and_matches_exhaustive():
    model = MarkovModel({BOS_ID: {A: 0.55, B: 0.45}, A: {EOS_ID: 0.4, A: 0.3, B: 0.3}, B: {EOS_ID: 0.9, A: 0.1}})
    features = torch.zeros(1, 4)
    assert greedy_search(model, features, max_length=5)[0].tokens == [A]
    best = beam_search(model, features, beam_size=2, max_length=5)[0][0]
    assert best.tokens == [B] and best.finished
    assert best.log_prob == pytest.approx(math.log(0.45 * 0.9), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    for seed in range(4):  # 4 words, captions of 1-4 words; 4**4 * 5 candidates at the last step: all kept
        model, features = random_decoder(8, seed), torch.randn(1, 16)
        best_score, best_words = best_caption(exhaustive_captions(model, features, max_length=5), length_penalty)
        found = beam_search(model, features, beam_size=1280, max_length=5, length_penalty=length_penalty)[0][0]
        assert found.tokens == best_words
        assert found.score == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.5, 1.0])
def test_wide_beam_that_fills_with_finished_captions_early_equals_exhaustive_search(length_penalty):
    """Every prefix stays in the beam, but `beam_size` captions have finished by step 2: stopping
    there (the rule before #15) missed longer captions that score better once normalised."""
    missed_before = 0
    for seed in range(8):
        model, features = OneWordAfterEach(random_decoder(8, seed), 8), torch.randn(1, 16)
        best_score, best_words = best_caption(exhaustive_captions(model, features, max_length=7), length_penalty)
        found = beam_search(model, features, beam_size=8, max_length=7, length_penalty=length_penalty)[0][0]
        assert found.tokens == best_words
        assert found.score == pytest.approx(best_score, abs=1e-4)
        before = old_beam_search(model, features, 8, 7, length_penalty=length_penalty)[0][0]
        missed_before += before.tokens != best_words
    assert missed_before > 0 if length_penalty == 1.0 else True  # at penalty 1 the old rule stops too early


@pytest.mark.parametrize("beam_size", [2, 3, 4])
@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_narrow_beam_returns_the_best_of_all_it_would_finish(beam_size, length_penalty):
    """Above penalty 0: exactly what running every beam to max_length returns, never worse than the
    rule before #15. At penalty 0: exactly the captions of the rule before #15."""
    model = random_decoder(9, beam_size)
    features = torch.randn(200, 16)
    options = dict(beam_size=beam_size, max_length=6, min_length=2, no_repeat_ngram_size=2,
                   length_penalty=length_penalty, n_best=2)
    found = beam_search(model, features, **options)
    before = old_beam_search(model, features, **options)
    expected = before if length_penalty == 0 else old_beam_search(model, features, stop_early=False, **options)
    better = 0
    for hyps, want, old in zip(found, expected, before):
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in want], abs=1e-5)
        assert hyps[0].score >= old[0].score - 1e-5
        better += hyps[0].score > old[0].score + 1e-5
    assert better > 0 if length_penalty == 1.0 else True  # at penalty 1 the old rule stops too early


def test_finished_and_cut_captions_are_both_normalised_by_words_plus_one():
    ends = MarkovModel({BOS_ID: {A: 0.6, B: 0.4}, A: {EOS_ID: 0.6, B: 0.4}, B: {EOS_ID: 0.3, B: 0.7}})
    never_ends = MarkovModel({BOS_ID: {A: 0.6, B: 0.4}, A: {A: 0.6, B: 0.4}, B: {A: 0.5, B: 0.5}})
    for model, words in ((ends, 1), (never_ends, 4)):
        greedy = greedy_search(model, torch.zeros(1, 4), max_length=4, length_penalty=1.0)[0]
        beam = beam_search(model, torch.zeros(1, 4), beam_size=2, max_length=4, length_penalty=1.0)[0][0]
        for found in (greedy, beam):
            assert len(found.tokens) == words and found.finished == (model is ends)
            assert found.score == pytest.approx(found.log_prob / (words + 1))


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


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
@pytest.mark.parametrize("ngram, min_length, max_length, all_best", [(0, 1, 12, False), (3, 1, 12, True),
                                                                      (2, 3, 5, False), (1, 6, 9, True)])
def test_one_image_search_equals_the_batched_search(beam_size, length_penalty, ngram, min_length, max_length,
                                                    all_best):
    """A single photo takes its own path (_one_image_search): the same captions, scores and finish flags as
    the batched search on the same image, with cut captions, dead ends (1-gram blocking and a long minimum
    leave no word) and early stops among the cases."""
    options = dict(beam_size=beam_size, max_length=max_length, min_length=min_length,
                   no_repeat_ngram_size=ngram, length_penalty=length_penalty, n_best=beam_size if all_best else 1)
    for seed, (cell, vocab) in enumerate([("gru", 9), ("lstm", 40), ("rnn", 15)]):
        model = random_decoder(vocab, seed, cell)
        for image in random_features(model, 10).split(1):
            alone = beam_search(model, image, **options)[0]
            with torch.inference_mode():
                batched = search._search(model, image, **options)[0]
            assert [(h.tokens, h.score, h.log_prob, h.finished) for h in alone] == \
                   [(h.tokens, h.score, h.log_prob, h.finished) for h in batched]


def test_at_penalty_zero_a_later_better_caption_is_kept_until_beam_size_have_finished():
    # "A" finishes first (0.6 * 0.5 = 0.30); "B C" still lives and finishes a step later, better (0.4 * 0.95).
    model = MarkovModel({BOS_ID: {A: 0.6, B: 0.4}, A: {EOS_ID: 0.5, A: 0.5}, B: {EOS_ID: 0.05, C: 0.95},
                         C: {EOS_ID: 1.0}})
    for images in (1, 2):  # the one-image path and the batched one
        for hyps in beam_search(model, torch.zeros(images, 4), beam_size=2, max_length=5):
            assert hyps[0].tokens == [B, C]


class RowCounter:
    """A model that counts the rows its steps decode."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def init_state(self, features):
        return self.model.init_state(features)

    def step(self, tokens, state):
        self.rows += len(tokens)
        return self.model.step(tokens, state)


def test_at_penalty_zero_an_image_stops_once_no_live_beam_can_beat_its_best_finished_caption():
    """Log-probs only fall, so once the n_best-th finished caption scores at least the best live beam, more
    steps cannot change the result: the captions of the rule before #15, for fewer decoder rows."""
    now, before = RowCounter(random_decoder(12, 5)), RowCounter(random_decoder(12, 5))
    features = torch.randn(40, 16)
    for images in [features, *features[:10].split(1)]:  # the batched search and the one-image path
        found = beam_search(now, images, beam_size=3, max_length=10, no_repeat_ngram_size=2)
        expected = old_beam_search(before, images, 3, 10, no_repeat_ngram_size=2)
        assert [(h[0].tokens, h[0].score) for h in found] == \
               [(h[0].tokens, pytest.approx(h[0].score, abs=1e-5)) for h in expected]
    assert now.rows < 0.97 * before.rows


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
    for decode in (lambda **k: greedy_search(**k)[0], lambda **k: beam_search(beam_size=3, **k)[0][0]):
        tokens = decode(model=model, features=torch.zeros(1, 4), max_length=8, no_repeat_ngram_size=2).tokens
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams)), tokens


def test_a_caption_with_every_word_blocked_ends_instead_of_emitting_a_special_token():
    # Three words, none may repeat (1-grams) and <eos> is barred before 5 words: after three words nothing
    # is left, and the caption must end there (at no cost) rather than emit <pad>, <bos> or <unk>.
    model = MarkovModel({prev: {A: 0.5, B: 0.3, C: 0.2} for prev in (BOS_ID, A, B, C)})
    options = dict(features=torch.zeros(2, 4), max_length=8, min_length=5, no_repeat_ngram_size=1)
    for hypothesis in greedy_search(model, **options) + [h for hyps in beam_search(model, beam_size=3, **options)
                                                          for h in hyps]:
        assert sorted(hypothesis.tokens) == [A, B, C] and hypothesis.finished
    assert greedy_search(model, **options)[0].log_prob == pytest.approx(math.log(0.5 * 0.3 * 0.2))


def test_no_images_give_no_captions():
    model = MarkovModel({BOS_ID: {A: 0.5, EOS_ID: 0.5}})
    assert greedy_search(model, torch.zeros(0, 4)) == [] and beam_search(model, torch.zeros(0, 4)) == []
