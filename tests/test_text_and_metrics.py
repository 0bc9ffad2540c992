import pytest

from captioner.metrics import bleu_scores
from captioner.text import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A dog's ball , on the Grass .") == ["a", "dog", "'s", "ball", "on", "the", "grass"]


def test_vocabulary_from_training_captions_with_min_count():
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]], min_count=2)
    assert vocab.words[:4] == list(SPECIALS)
    assert vocab.words[4:] == ["a", "dog"]
    assert vocab.encode(["a", "cat"]) == [4, vocab.unk]
    assert vocab.decode([4, 5, vocab.unk, vocab.eos, 4]) == ["a", "dog"]


def test_vocabulary_rejects_a_list_without_specials():
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


def test_bleu_perfect_and_hand_computed():
    refs = [[["a", "dog", "runs", "on", "grass"]]]
    assert bleu_scores(refs, [["a", "dog", "runs", "on", "grass"]])["bleu4"] == pytest.approx(1.0)
    # hypothesis "a dog runs fast": unigram precision 3/4, bigram 2/3; BP = exp(1 - 5/4)
    scores = bleu_scores(refs, [["a", "dog", "runs", "fast"]])
    bp = pytest.approx
    import math
    assert scores["bleu1"] == bp(math.exp(1 - 5 / 4) * 3 / 4)
    assert scores["bleu2"] == bp(math.exp(1 - 5 / 4) * math.sqrt(3 / 4 * 2 / 3))


def test_bleu_uses_all_references_and_checks_lengths():
    refs = [[["a", "cat"], ["a", "small", "dog"]]]
    assert bleu_scores(refs, [["a", "small", "dog"]])["bleu3"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bleu_scores(refs, [])


def test_cider_d_matches_hand_computed_values():
    from captioner.metrics import cider_d

    refs = [[["a", "b"]], [["c", "d"]]]
    # exact match: unigram and bigram cosine 1, no tri/4-grams -> mean([1, 1, 0, 0]) * 10
    assert cider_d(refs, [["a", "b"], ["c", "d"]]) == pytest.approx(5.0)
    # "a a" vs "a b": unigram tf-idf cosine (2*1) / (2 * sqrt(2)) with equal idf, bigram 0 -> 10 * 0.35355 / 4
    import math
    assert cider_d(refs, [["a", "a"], ["c", "d"]]) == pytest.approx((10 / (2 * math.sqrt(2)) / 4 + 5.0) / 2)


def test_rouge_l_matches_hand_computed_value():
    from captioner.metrics import rouge_l

    # LCS("a b c d", "a c d e f") = 3: precision 3/4, recall 3/5, beta 1.2
    p, r, b2 = 3 / 4, 3 / 5, 1.2 ** 2
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert rouge_l([[["a", "c", "d", "e", "f"]]], [["a", "b", "c", "d"]]) == pytest.approx(expected)
    assert rouge_l([[["x"], ["a", "b"]]], [["a", "b"]]) == pytest.approx(1.0)  # best reference counts
    assert rouge_l([[["x"]]], [[]]) == 0.0


def test_sentence_bleu_reward_matches_nltk_smoothed_bleu():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    from captioner.metrics import SentenceBleu

    refs = [["a", "dog", "runs", "on", "the", "grass"], ["the", "dog", "is", "running"]]
    bleu = SentenceBleu([refs, [["a", "cat"]]])
    for hypothesis in (["a", "dog", "runs", "on", "grass"], ["the", "dog", "is", "running", "on", "the", "grass", "and", "the", "dog"]):
        expected = sentence_bleu(refs, hypothesis, smoothing_function=SmoothingFunction().method2)
        assert bleu.score(0, hypothesis) == pytest.approx(expected)
    assert bleu.score(0, refs[0]) == pytest.approx(1.0)
    # a short caption with no 4-gram match still scores by its other n-grams, and the brevity penalty shows
    assert 0 < bleu.score(0, ["a", "dog"]) < bleu.score(0, ["a", "dog", "runs"]) < 1
    assert bleu.score(0, ["a", "cat"]) < bleu.score(1, ["a", "cat"]) == pytest.approx(1.0)
    assert bleu.score(0, []) == 0.0 and bleu.score(0, ["zebra"]) == 0.0
