"""Self-critical sequence training (Rennie et al., 2017): the stage after cross-entropy.

Cross-entropy teaches the decoder to predict the next word of a reference caption; at test time it
writes whole captions from its own words. Self-critical training closes that gap: the decoder
samples K captions per image, each is scored with CIDEr-D against the image's references, and the
log-probability of every caption is pushed up or down by how much it beat the mean of its K-1
siblings (the baseline of Luo, 2020: no extra greedy decode, no learned critic).

CIDEr-D and BLEU pay for n-grams the references share, not for sentences: a decoder trained on them
learns "a man is playing in the ball" (the ball, playing in: both pay). With `unseen_trigram_penalty`
each word triple that no training caption has costs that much of the reward.
"""
from __future__ import annotations

import math

import torch

from .metrics import CiderD, SentenceBleu
from .search import BOS_ID, EOS_ID, NEVER_EMITTED, PAD_ID, sample_captions
from .text import EOS, Vocabulary


def trigrams(words: list[str]) -> list[tuple[str, ...]]:
    """A caption's word triples, its start included ("<s> <s> a", "<s> a dog", ...)."""
    padded = ["<s>", "<s>", *words]
    return list(zip(padded, padded[1:], padded[2:]))


class SelfCriticalLoss:
    def __init__(self, references: list[list[list[str]]], vocab: Vocabulary, samples_per_image: int,
                 max_length: int, min_length: int = 1, bleu_weight: float = 0.0, unseen_trigram_penalty: float = 0.0):
        # idf from the training references, as in the paper. <eos> counts as a word, in the references and
        # in finished samples: otherwise a caption cut short ("a dog runs in the") loses nothing by ending
        # there, and the model learns to stop mid-phrase (SCST's known "bad endings").
        references = [[[*r, EOS] for r in refs] for refs in references]
        self.cider = CiderD(references)
        self.bleu = SentenceBleu(references) if bleu_weight else None
        self.bleu_weight = bleu_weight
        self.trigram_penalty = unseen_trigram_penalty
        self.trigrams = {t for refs in references for r in refs for t in trigrams(r)} if unseen_trigram_penalty else set()
        self.name = "CIDEr-D" + (f" + {bleu_weight:g} x BLEU-4" if bleu_weight else "") \
            + (f" - {unseen_trigram_penalty:g} x unseen trigrams" if unseen_trigram_penalty else "")
        self.vocab, self.samples = vocab, samples_per_image
        self.max_length, self.min_length = max_length, max(1, min_length)

    def score(self, image: int, ids: list[int]) -> float:
        """The reward of one sampled caption (ids as sampled) for image number `image`."""
        words = self.vocab.decode(ids)
        words = [*words, EOS] if EOS_ID in ids else words
        reward = self.cider.score(image, words)
        if self.bleu is not None:
            reward += self.bleu_weight * self.bleu.score(image, words)
        if self.trigram_penalty:
            reward -= self.trigram_penalty * sum(t not in self.trigrams for t in trigrams(words))
        return reward

    def __call__(self, model, decoder, features: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Summed policy-gradient loss over the images' K samples each, and their mean reward.

        `model` is what gets the gradient (DDP-wrapped under torchrun), `decoder` the bare module
        that samples; `images` are the rows of `features` in the reference list.
        """
        k = self.samples
        features = features.repeat_interleave(k, dim=0)
        sampled = sample_captions(decoder, features, self.max_length, self.min_length)  # [B*K, T]
        rewards = torch.tensor([self.score(int(images[i // k]), row) for i, row in enumerate(sampled.tolist())])
        rewards = rewards.view(-1, k)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
        advantage = (rewards - baseline).view(-1, 1).to(features.device)
        inputs = torch.cat([torch.full_like(sampled[:, :1], BOS_ID), sampled[:, :-1]], dim=1)
        logits = model(features, inputs).float()
        # The words sample_captions never draws (<pad> <bos> <unk>, an early <eos>) are left out here too: otherwise
        # pushing down a poor caption's words would pile probability onto them unchecked, and training collapses.
        logits[:, :, NEVER_EMITTED] = -math.inf
        logits[:, : self.min_length, EOS_ID] = -math.inf
        log_probs = logits.log_softmax(-1).gather(2, sampled.unsqueeze(2)).squeeze(2)
        log_probs = torch.where(sampled != PAD_ID, log_probs, 0.0)  # after <eos>: nothing was sampled
        summed = -(advantage * log_probs).sum()
        return summed, float(rewards.mean())
