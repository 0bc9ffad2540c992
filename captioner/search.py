"""Decoding: greedy and beam search, both batched over images (beam search over images x beams).

A model here is anything with `init_state(features) -> state` and
`step(last_tokens [N], state) -> (log_probs [N, V], state)`, the state's batch on dim 1.
Neither path ever emits <pad>, <bos> or <unk>; both block repeated n-grams and respect a
minimum length; when no beam ends by `max_length`, the best unfinished hypothesis is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .decoder import select_state

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEVER_EMITTED = (PAD_ID, BOS_ID, UNK_ID)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <bos> and <eos>
    score: float  # log_prob / length**length_penalty; what hypotheses are ranked by
    log_prob: float
    finished: bool  # ended with <eos> (False: cut at max_length)


def _normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / (max(length, 1) ** length_penalty) if length_penalty else log_prob


def _mask(log_probs: torch.Tensor, generated: torch.Tensor | None, step: int, min_length: int,
          no_repeat_ngram_size: int) -> torch.Tensor:
    """Forbid special tokens, an early <eos>, and any token that would repeat an n-gram of `generated`."""
    log_probs[:, NEVER_EMITTED] = -math.inf
    if step < min_length:
        log_probs[:, EOS_ID] = -math.inf
    n = no_repeat_ngram_size
    if n and generated.size(1) >= n:
        grams = generated.unfold(1, n, 1)  # [N, G, n]
        prefix = generated[:, generated.size(1) - n + 1:]
        rows, positions = (grams[:, :, :-1] == prefix.unsqueeze(1)).all(-1).nonzero(as_tuple=True)
        log_probs[rows, grams[rows, positions, -1]] = -math.inf
    dead_end = torch.isinf(log_probs).all(dim=1)  # everything blocked: end rather than emit garbage
    log_probs[dead_end, EOS_ID] = 0.0
    return log_probs


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, max_length: int = 20, min_length: int = 1,
                  no_repeat_ngram_size: int = 0, length_penalty: float = 0.0) -> list[Hypothesis]:
    batch = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=features.device)
    log_prob = torch.zeros(batch, device=features.device)
    done = torch.zeros(batch, dtype=torch.bool, device=features.device)
    for step in range(max_length):
        log_probs, state = model.step(tokens[:, -1], state)
        log_probs = _mask(log_probs, tokens[:, 1:], step, min_length, no_repeat_ngram_size)
        best, word = log_probs.max(dim=1)
        word = word.masked_fill(done, PAD_ID)
        log_prob += best.masked_fill(done, 0.0)
        tokens = torch.cat([tokens, word.unsqueeze(1)], dim=1)
        done |= word == EOS_ID
        if done.all():
            break
    hypotheses = []
    for row, total in zip(tokens[:, 1:].tolist(), log_prob.tolist()):
        finished = EOS_ID in row
        words = row[:row.index(EOS_ID)] if finished else row
        length = len(words) + finished
        hypotheses.append(Hypothesis(words, _normalised(total, length, length_penalty), total, finished))
    return hypotheses


@torch.no_grad()
def sample_captions(model, features: torch.Tensor, max_length: int = 20, min_length: int = 1) -> torch.Tensor:
    """One caption per row of features, drawn word by word from the model's distribution (for
    self-critical training): ids [N, T <= max_length], <eos> and then <pad> once a caption ends."""
    state = model.init_state(features)
    word = torch.full((features.size(0),), BOS_ID, dtype=torch.long, device=features.device)
    done = torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
    words = []
    for step in range(max_length):
        log_probs, state = model.step(word, state)
        log_probs = _mask(log_probs, None, step, min_length, no_repeat_ngram_size=0)
        word = torch.multinomial(log_probs.exp(), 1).squeeze(1).masked_fill(done, PAD_ID)
        words.append(word)
        done |= word == EOS_ID
        if done.all():
            break
    return torch.stack(words, dim=1)


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, beam_size: int = 3, max_length: int = 20, min_length: int = 1,
                no_repeat_ngram_size: int = 0, length_penalty: float = 0.0,
                n_best: int = 1) -> list[list[Hypothesis]]:
    """The `n_best` (<= beam_size) best hypotheses per image, best first.

    A hypothesis is finished when <eos> ranks among the top `beam_size` candidates of a step;
    an image is done when it has `beam_size` finished hypotheses or reaches `max_length`.
    """
    batch, k, device = features.size(0), beam_size, features.device
    n_best = min(n_best, k)
    state = select_state(model.init_state(features), torch.arange(batch, device=device).repeat_interleave(k))
    tokens = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    alive = torch.arange(batch)  # which image each row block belongs to
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    positions = torch.arange(2 * k, device=device)

    for step in range(max_length):
        n = alive.numel()
        log_probs, state = model.step(tokens[:, -1], state)
        log_probs = _mask(log_probs, tokens[:, 1:], step, min_length, no_repeat_ngram_size)
        vocab = log_probs.size(1)
        candidates = (scores.view(-1, 1) + log_probs).view(n, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)
        origin, word = top_index // vocab, top_index % vocab
        ends = (word == EOS_ID) & torch.isfinite(top_scores)

        for i, j in ends[:, :k].nonzero().tolist():
            words = tokens[i * k + origin[i, j], 1:].tolist()
            total = top_scores[i, j].item()
            finished[alive[i]].append(Hypothesis(words, _normalised(total, len(words) + 1, length_penalty), total, True))

        order = (ends.long() * (2 * k) + positions[: ends.size(1)]).argsort(dim=1)[:, :k]  # first k that go on
        scores = top_scores.gather(1, order).masked_fill(ends.gather(1, order), -math.inf)
        rows = (torch.arange(n, device=device).unsqueeze(1) * k + origin.gather(1, order)).view(-1)
        tokens = torch.cat([tokens[rows], word.gather(1, order).view(-1, 1)], dim=1)
        state = select_state(state, rows)

        done = torch.tensor([len(finished[b]) >= k for b in alive.tolist()]) | ~torch.isfinite(scores).any(1).cpu()
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            alive = alive[keep]
            keep = keep.to(device)
            scores = scores[keep]
            rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            tokens, state = tokens[rows], select_state(state, rows)
    else:
        for i, b in enumerate(alive.tolist()):  # reached max_length: unfinished beams fill in
            if len(finished[b]) < n_best:
                for j in range(k):
                    total = scores[i, j].item()
                    if math.isfinite(total):
                        words = tokens[i * k + j, 1:].tolist()
                        finished[b].append(Hypothesis(words, _normalised(total, len(words), length_penalty), total, False))
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]
