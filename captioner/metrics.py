"""Caption metrics, Java-free: BLEU-1..4, CIDEr-D, ROUGE-L and a person/dog hallucination rate.

BLEU is nltk's `corpus_bleu`: corpus-level n-gram precisions with the standard brevity penalty,
no smoothing, over the same tokens training uses (`text.tokenize`: lowercase Treebank tokens,
punctuation dropped), with all reference captions of each image. Scores are in [0, 1].

The hallucination rate is a CHAIR-style measure (Rohrbach et al., 2018) for the two things a
Flickr8k-trained model sees everywhere: of the images whose references name neither a person
nor a dog, the share whose caption names one.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

from .routing import mentions_dog, mentions_person

BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


def bleu_scores(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 for tokenised hypotheses, one per image, against that image's tokenised references."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    from nltk.translate.bleu_score import corpus_bleu  # here: importing nltk takes 0.3 s that captioning never needs

    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match; a 0 score says it
        warnings.simplefilter("ignore")
        scores = corpus_bleu(references, hypotheses, weights=list(BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(BLEU_WEIGHTS, scores)}


def _ngrams(tokens: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D of single captions against fixed reference sets, as coco-caption's CiderD computes it
    (idf from these references, x10). Built once, it scores one caption in microseconds: the
    self-critical reward uses it over the training references, `cider_d` over a test split's."""

    def __init__(self, references: list[list[list[str]]], sigma: float = 6.0):
        if not references:
            raise ValueError("no references to score against")
        self.sigma = sigma
        counts = [[_ngrams(r) for r in refs] for refs in references]
        self.document_frequency: Counter = Counter()
        for image_counts in counts:
            self.document_frequency.update(set(g for c in image_counts for g in c))
        self.log_images = math.log(float(len(references)))
        self.references = [[self._vector(c) for c in image_counts] for image_counts in counts]

    def _vector(self, counts: Counter):
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for gram, frequency in counts.items():
            n = len(gram) - 1
            vec[n][gram] = frequency * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:  # coco-caption measures length in bigrams; kept for comparable numbers
                length += frequency
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: int, hypothesis: list[str]) -> float:
        """CIDEr-D of one tokenised caption against the references of image number `image`."""
        vec_h, norm_h, length_h = self._vector(_ngrams(hypothesis))
        refs = self.references[image]
        score = [0.0] * 4
        for vec_r, norm_r, length_r in refs:
            penalty = math.exp(-((length_h - length_r) ** 2) / (2 * self.sigma ** 2))
            for n in range(4):
                value = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, v in vec_h[n].items())
                if norm_h[n] and norm_r[n]:
                    value /= norm_h[n] * norm_r[n]
                score[n] += value * penalty
        return sum(score) / 4 / len(refs) * 10.0


class SentenceBleu:
    """Smoothed BLEU-4 of single captions against fixed reference sets, for the self-critical reward.

    Clipped n-gram precisions and the brevity penalty to the closest reference length, as corpus
    BLEU has them, over one caption; precisions of 2-4-grams get add-one smoothing (Lin and Och,
    2004), since a short caption often has no 4-gram match and unsmoothed BLEU-4 would then be 0
    whatever its other words. The reported BLEU stays nltk's unsmoothed corpus BLEU."""

    def __init__(self, references: list[list[list[str]]]):
        if not references:
            raise ValueError("no references to score against")
        self.clip: list[Counter] = []
        for refs in references:
            clip: Counter = Counter()
            for ref in refs:
                clip |= _ngrams(ref)  # | keeps each n-gram's largest count over the references
            self.clip.append(clip)
        self.lengths = [sorted({len(r) for r in refs}) for refs in references]

    def score(self, image: int, hypothesis: list[str]) -> float:
        if not hypothesis:
            return 0.0
        counts, clip = _ngrams(hypothesis), self.clip[image]
        matches, totals = [0] * 4, [max(0, len(hypothesis) - n) for n in range(4)]
        for gram, count in counts.items():
            matches[len(gram) - 1] += min(count, clip[gram])
        if matches[0] == 0:
            return 0.0
        log_precision = math.log(matches[0] / totals[0]) + sum(
            math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, 4))
        closest = min(self.lengths[image], key=lambda r: (abs(r - len(hypothesis)), r))
        brevity = min(0.0, 1.0 - closest / len(hypothesis))
        return math.exp(log_precision / 4 + brevity)


def cider_d(references: list[list[list[str]]], hypotheses: list[list[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of each caption's CIDEr-D, idf from this corpus's references."""
    scorer = CiderD(references, sigma)
    return sum(scorer.score(i, h) for i, h in enumerate(hypotheses)) / len(hypotheses)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(references: list[list[list[str]]], hypotheses: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L as coco-caption computes it: best LCS precision and recall over the references, F-beta."""
    total = 0.0
    for hypothesis, refs in zip(hypotheses, references):
        lcs = [_lcs(r, hypothesis) for r in refs]
        precision = max((l / len(hypothesis) if hypothesis else 0.0) for l in lcs)
        recall = max((l / len(r) if r else 0.0) for l, r in zip(lcs, refs))
        if precision and recall:
            total += (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    return total / len(hypotheses)


def without_person_dog(references: list[list[list[str]]]) -> list[int]:
    """Indices of the images none of whose references names a person or a dog."""
    return [i for i, refs in enumerate(references)
            if not any(mentions_person(r) or mentions_dog(r) for r in refs)]


def hallucination(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict:
    """Share of the images without a person or dog in their references whose caption names one
    (None when there is no such image), and how many such images there are."""
    images = without_person_dog(references)
    named = sum(mentions_person(hypotheses[i]) or mentions_dog(hypotheses[i]) for i in images)
    return {"person_dog_hallucination": named / len(images) if images else None,
            "images_without_person_dog": len(images)}


def overlap_scores(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and ROUGE-L of a corpus."""
    return {**bleu_scores(references, hypotheses), "cider_d": cider_d(references, hypotheses),
            "rouge_l": rouge_l(references, hypotheses)}


def caption_scores(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict:
    """BLEU-1..4, CIDEr-D, ROUGE-L and the person/dog hallucination rate of a corpus."""
    return {**overlap_scores(references, hypotheses), **hallucination(references, hypotheses)}
