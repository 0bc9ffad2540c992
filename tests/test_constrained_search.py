"""bench/constrained_search.py: constrained beam search exact against exhaustive search on small random
models, beam search's captions for images without word sets, and what comes back when no caption can
satisfy them all."""
from __future__ import annotations


import pytest
import torch
from test_search import A, B, C, MarkovModel, best_caption, exhaustive_captions, random_decoder

from captioner.search import BOS_ID, EOS_ID, beam_search

import constrained_search  # bench/, on pytest's path (pyproject.toml)

constrained_beam_search = constrained_search.constrained_beam_search

D = 7


def satisfies(words: list[int], sets: list[list[int]]) -> bool:
    return all(set(words) & set(ids) for ids in sets)


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
def test_wide_beam_equals_the_best_exhaustive_caption_with_a_word_of_every_set(length_penalty):
    changed = 0
    for seed in range(4):  # 4 words, captions of 1-3 words; 4**3 * 5 candidates at the last step: all kept
        model, features = random_decoder(8, seed), torch.randn(1, 16)
        captions = exhaustive_captions(model, features, max_length=4)
        for sets in ([[A]], [[B, C]], [[A], [C, D]], [[D], [B]]):
            best_score, best_words = best_caption([c for c in captions if satisfies(c[1], sets)], length_penalty)
            found = constrained_beam_search(model, features, [sets], beam_size=320, max_length=4,
                                            length_penalty=length_penalty)[0][0]
            assert found.tokens == best_words and found.finished and found.satisfied == len(sets)
            assert found.score == pytest.approx(best_score, abs=1e-4)
            changed += best_words != best_caption(captions, length_penalty)[1]
    assert changed > 0  # the sets did rule out the unconstrained best caption


@pytest.mark.parametrize("length_penalty", [0.0, 0.5])
def test_images_without_sets_get_beam_search_captions_in_a_constrained_batch(length_penalty):
    model = random_decoder(30, 5)
    features = torch.randn(8, 16)
    constraints = [[], [[10, 11]], [], [[12], [13, 14]], [], [[20]], [], []]
    options = dict(beam_size=3, max_length=10, no_repeat_ngram_size=2, length_penalty=length_penalty, n_best=2)
    constrained = constrained_beam_search(model, features, constraints, **options)
    plain = beam_search(model, features, **options)
    for i, (sets, found) in enumerate(zip(constraints, constrained)):
        alone = constrained_beam_search(model, features[i:i + 1], [sets], **options)[0]
        assert [h.tokens for h in found] == [h.tokens for h in alone]  # batching changes nothing
        if sets:
            assert all(satisfies(h.tokens, sets) and h.satisfied == len(sets) for h in found)
        else:
            assert [h.tokens for h in found] == [h.tokens for h in plain[i]]
            assert [h.score for h in found] == pytest.approx([h.score for h in plain[i]], abs=1e-5)


def test_the_constraint_word_appears_in_every_returned_caption():
    model = random_decoder(30, 2)
    features = torch.randn(6, 16)
    plain = beam_search(model, features, beam_size=3, max_length=12, no_repeat_ngram_size=2)
    missing = [next(w for w in range(A, 30) if w not in hyps[0].tokens) for hyps in plain]
    found = constrained_beam_search(model, features, [[[w]] for w in missing], beam_size=3, max_length=12,
                                    no_repeat_ngram_size=2, n_best=3)
    for word, hyps in zip(missing, found):
        assert len(hyps) == 3 and len({tuple(h.tokens) for h in hyps}) == 3
        assert all(word in h.tokens and h.satisfied == 1 for h in hyps)  # cut at max_length or finished


def test_when_no_caption_can_satisfy_every_set_the_most_satisfied_come_back():
    model = MarkovModel({BOS_ID: {A: 0.5, B: 0.3, C: 0.2}, A: {EOS_ID: 0.9, C: 0.1}, B: {EOS_ID: 0.9, C: 0.1}})
    # one word at most: no caption holds both A and B, and the search cuts them unfinished
    hyps = constrained_beam_search(model, torch.zeros(1, 4), [[[A], [B]]], beam_size=2, max_length=1, n_best=2)[0]
    assert [h.tokens for h in hyps] == [[A], [B]]
    assert [h.satisfied for h in hyps] == [1, 1] and not any(h.finished for h in hyps)


def test_bad_constraints_are_refused():
    model, features = random_decoder(10, 0), torch.randn(1, 16)
    for constraints, message in (([[[A], [B], [C]]], "at most 2"), ([[[]]], "empty"), ([[[99]]], "lie in"), ([[[EOS_ID]]], "must be words"),
                                 ([[], []], "2 constraint lists")):
        with pytest.raises(ValueError, match=message):
            constrained_beam_search(model, features, constraints)
