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


# Against the coco-caption toolkit's own scorers (pycocoevalcap, a test dependency). Its PTB tokenizer needs
# Java, so both sides get the same tokens: ours (text.tokenize), joined by spaces as coco-caption's scorers
# expect after tokenisation. Captions: written for this test in the style of Flickr8k, several references per
# image, repeated words (clipping), short and long hypotheses (brevity penalty, length penalty of CIDEr-D).
WRITTEN = [
    ("a black dog is running through the grass with a ball in its mouth",
     ["A black dog runs across a grassy field carrying a red ball .", "The dog is running on the grass with a ball .",
      "A black dog with a ball in its mouth runs through a field .", "a dog plays fetch in the park",
      "A black lab carries a ball across the lawn ."]),
    ("two children are playing in the water at the beach",
     ["Two kids splash in the waves at the beach .", "Two young children playing in the ocean .",
      "Children play in shallow water near the shore .", "Two little girls run into the sea ."]),
    ("a man in a red jacket is climbing a rock",
     ["A rock climber in a red jacket scales a cliff face .", "A man climbs a steep rock wall .",
      "A climber wearing red hangs from a rock .", "a man is rock climbing",
      "Someone in a red coat climbs up the side of a mountain ."]),
    ("a man",
     ["A man in a blue shirt stands on a street corner .", "A man waits to cross the street .",
      "A person standing near a road in the city ."]),
    ("a dog a dog a dog is running",
     ["A brown dog is running along the beach .", "A dog runs near the water .", "The brown dog is running ."]),
    ("a group of people are standing in front of a building",
     ["A crowd of people gathers outside a large building .", "People stand in front of a brick building .",
      "A group of tourists in front of an old church .", "Many people are standing outside ."]),
    ("a skier is skiing down a snowy mountain",
     ["A skier in a yellow jacket goes down a snowy slope .", "A person skiing down a mountain covered in snow .",
      "Someone skis down a steep hill .", "A skier jumps in the snow ."]),
    ("a boy in a blue shirt is jumping on a trampoline in the backyard of a house on a sunny day",
     ["A boy jumps on a trampoline .", "A young boy in blue bounces on a trampoline in a yard .",
      "A child jumping high on a trampoline ."]),
    ("a woman is sitting on a bench reading a book",
     ["A woman reads a book on a park bench .", "A lady sitting on a bench with a book .",
      "A woman in a hat sits reading outside .", "A woman sits on a wooden bench and reads ."]),
    ("a brown and white dog is catching a frisbee",
     ["A brown and white dog leaps to catch a frisbee .", "A dog jumps for a yellow frisbee .",
      "A collie catches a flying disc in mid air .", "The dog catches the frisbee in the park ."]),
]


def _coco(groups):
    """(our references, our hypotheses, coco-caption's gts, res) for (hypothesis, references) caption pairs."""
    references = [[tokenize(r) for r in refs] for _, refs in groups]
    hypotheses = [tokenize(h) for h, _ in groups]
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    return references, hypotheses, gts, res


def _flickr8k_groups(count: int = 40):
    """Real captions: per Flickr8k test image, its first caption as the hypothesis, the other four as references."""
    from captioner.data import load_flickr8k
    from conftest import SHARED_FLICKR8K

    if not SHARED_FLICKR8K.is_dir():
        pytest.skip("needs the real Flickr8k in ../shared/data/flickr8k")
    records = load_flickr8k(SHARED_FLICKR8K).split("test")[:count]
    return [(r.captions[0], r.captions[1:]) for r in records]


CAPTION_SETS = [pytest.param(lambda: WRITTEN, id="written"), pytest.param(_flickr8k_groups, id="flickr8k")]
# Tolerance: both compute in float64 with the same formulae; coco-caption's BLEU adds 1e-15 / 1e-9 to each
# precision's numerator / denominator, a relative change of about 1e-11 here.
TIGHT = 1e-9


def _coco_bleu(gts, res, nltk_short_hypotheses: bool = False) -> list[float]:
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    if nltk_short_hypotheses:  # nltk's modified_precision divides by max(1, n-grams): 1 for a caption under n words
        for cooked in scorer.ctest:
            cooked["guess"] = [max(1, guess) for guess in cooked["guess"]]
    return scorer.compute_score(option="closest")[0]  # what pycocoevalcap.bleu.bleu.Bleu runs


@pytest.mark.parametrize("groups", CAPTION_SETS)
def test_bleu_equals_coco_captions_corpus_bleu(groups):
    from pycocoevalcap.bleu.bleu import Bleu

    long_enough = [(h, refs) for h, refs in groups() if len(tokenize(h)) >= 4]  # shorter ones: the test below
    references, hypotheses, gts, res = _coco(long_enough)
    coco, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert coco == pytest.approx(_coco_bleu(gts, res), rel=TIGHT)
    ours = bleu_scores(references, hypotheses)
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(coco, rel=TIGHT)
    assert 0.05 < ours["bleu4"] < ours["bleu1"] < 1  # real partial matches, not a degenerate 0 or 1


def test_bleu_of_captions_under_four_words_follows_nltk_not_coco_caption():
    # One known difference: nltk (our BLEU, as README says) counts one n-gram in the denominator of a caption
    # with fewer than n words, coco-caption counts none, so a 2-word caption lowers our BLEU-3/4 a little.
    references, hypotheses, gts, res = _coco(WRITTEN)
    assert min(len(h) for h in hypotheses) == 2
    ours = [bleu_scores(references, hypotheses)[f"bleu{n}"] for n in range(1, 5)]
    coco = _coco_bleu(gts, res)
    assert ours[:2] == pytest.approx(coco[:2], rel=TIGHT)
    assert ours[2] < coco[2] - 1e-3 and ours[3] < coco[3] - 1e-3
    assert ours == pytest.approx(_coco_bleu(gts, res, nltk_short_hypotheses=True), rel=TIGHT)


@pytest.mark.parametrize("groups", CAPTION_SETS)
def test_cider_d_equals_coco_captions_cider(groups):
    # pycocoevalcap's `Cider` is CIDEr-D (Vedantam et al. 2015, sec. 5): tf-idf clipped by the reference's, a
    # Gaussian penalty on the length difference (sigma 6), the mean over n = 1..4 and references, x10, idf
    # from the references of the images scored. That is what metrics.cider_d claims to compute.
    from pycocoevalcap.cider.cider import Cider

    from captioner.metrics import cider_d

    references, hypotheses, gts, res = _coco(groups())
    coco, per_image = Cider().compute_score(gts, res)
    assert cider_d(references, hypotheses) == pytest.approx(coco, rel=TIGHT)
    assert 0.1 < coco < 3 and len(set(per_image.round(6))) == len(per_image)


@pytest.mark.parametrize("groups", CAPTION_SETS)
def test_rouge_l_equals_coco_captions_rouge(groups):
    from pycocoevalcap.rouge.rouge import Rouge

    from captioner.metrics import rouge_l

    references, hypotheses, gts, res = _coco(groups())
    coco, _ = Rouge().compute_score(gts, res)
    assert rouge_l(references, hypotheses) == pytest.approx(coco, rel=TIGHT)
    assert 0.2 < coco < 0.9
