"""Caption metrics, Java-free.

BLEU is nltk's `corpus_bleu`: corpus-level n-gram precisions with the standard brevity penalty,
no smoothing, over the same tokens training uses (`text.tokenize`: lowercase Treebank tokens,
punctuation dropped), with all reference captions of each image. Scores are in [0, 1].
"""
from __future__ import annotations

import warnings

from nltk.translate.bleu_score import corpus_bleu

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
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match; a 0 score says it
        warnings.simplefilter("ignore")
        scores = corpus_bleu(references, hypotheses, weights=list(BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(BLEU_WEIGHTS, scores)}
