"""Decoding: greedy and beam search, both batched (beam search over images x beams; beam search of a
single image keeps its few beams' bookkeeping in numpy, where torch's per-op cost would match the decoder
step's).

A model here is anything with `init_state(features) -> state` and
`step(last_tokens [N], state) -> (log_probs [N, V], state)`, the state's batch on dim 1.
No path ever emits <pad>, <bos> or <unk>; all block repeated n-grams and respect a minimum
length; when no beam ends by `max_length`, the best unfinished hypothesis is returned.

Scores. A hypothesis's length is its number of words + 1, finished or not: the <eos> a finished
caption emitted, or the one a caption cut at `max_length` still lacks. It is ranked by
`log_prob / length**length_penalty` (the log-probability alone at penalty 0).

When beam search stops. An image stops once it has `n_best` finished hypotheses and no live beam
can still beat the worst of them: the longest caption that can still finish has length `max_length`,
and log-probs only fall, so a live beam's best reachable score is its log-prob /
max_length**length_penalty (the bound of Hugging Face's `early_stopping=False`); the result is then
exactly what running every beam to `max_length` would return. At penalty 0 that bound is the live
beam's log-prob itself, and an image also stops once `beam_size` hypotheses have finished (the rule
this module always had; a live beam can still be better than a finished one then, so it is not exact,
but captions at penalty 0 are kept as they were). The first rule ends an image earlier where its
best caption is clear, with the same result: 6-10% fewer decoder rows at beam 3 on Flickr8k dev.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .decoder import select_state

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEVER_EMITTED = (PAD_ID, BOS_ID, UNK_ID)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <bos> and <eos>
    score: float  # log_prob / (words + 1)**length_penalty; what hypotheses are ranked by
    log_prob: float
    finished: bool  # ended with <eos> (False: cut at max_length)


def _normalised(log_prob: float, words: int, length_penalty: float) -> float:
    return log_prob / (words + 1) ** length_penalty if length_penalty else log_prob


def _mask(log_probs: torch.Tensor, generated: torch.Tensor | None, step: int, min_length: int,
          no_repeat_ngram_size: int) -> torch.Tensor:
    """Forbid special tokens, an early <eos>, and any token that would repeat an n-gram of `generated`."""
    log_probs.index_fill_(1, _never_emitted(log_probs.device), -math.inf)
    if step < min_length:
        log_probs[:, EOS_ID] = -math.inf
    n = no_repeat_ngram_size
    if n and generated.size(1) >= n:
        grams = generated.unfold(1, n, 1)  # [N, G, n]
        prefix = generated[:, generated.size(1) - n + 1:]
        rows, positions = (grams[:, :, :-1] == prefix.unsqueeze(1)).all(-1).nonzero(as_tuple=True)
        log_probs[rows, grams[rows, positions, -1]] = -math.inf
    dead_end = log_probs.amax(dim=1) == -math.inf  # everything blocked: end rather than emit garbage
    if dead_end.any():
        log_probs[dead_end, EOS_ID] = 0.0
    return log_probs


@functools.cache
def _never_emitted(device: torch.device) -> torch.Tensor:
    return torch.tensor(NEVER_EMITTED, device=device)


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, max_length: int = 20, min_length: int = 1,
                  no_repeat_ngram_size: int = 0, length_penalty: float = 0.0) -> list[Hypothesis]:
    batch = features.size(0)
    if not batch:
        return []
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
        hypotheses.append(Hypothesis(words, _normalised(total, len(words), length_penalty), total, finished))
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
def word_log_probs(model, features: torch.Tensor, sequences: list[list[int]]) -> list[list[float]]:
    """Each sequence's log-probability per token under `model`, each token given those before it (teacher
    forced) and the features of its row: for a caption's words and its <eos>, they sum to the log-probability
    the search gave it (masking only ever removes other words)."""
    if not sequences:
        return []
    targets = torch.full((len(sequences), max(map(len, sequences))), PAD_ID, dtype=torch.long, device=features.device)
    for row, tokens in enumerate(sequences):
        targets[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    state, last, picked = model.init_state(features), torch.full_like(targets[:, 0], BOS_ID), []
    for step in range(targets.size(1)):
        log_probs, state = model.step(last, state)
        picked.append(log_probs.gather(1, targets[:, step:step + 1]).squeeze(1))
        last = targets[:, step]
    values = torch.stack(picked, dim=1).tolist()
    return [row[:len(tokens)] for row, tokens in zip(values, sequences)]


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, beam_size: int = 3, max_length: int = 20, min_length: int = 1,
                no_repeat_ngram_size: int = 0, length_penalty: float = 0.0,
                n_best: int = 1) -> list[list[Hypothesis]]:
    """The `n_best` (<= beam_size) best hypotheses per image, best first.

    A hypothesis is finished when <eos> ranks among the top `beam_size` candidates of a step; when
    an image stops is in the module docstring.
    """
    if features.size(0) == 1:
        return [_one_image_search(model, features, beam_size, max_length, min_length, no_repeat_ngram_size,
                                  length_penalty, n_best)]
    return _search(model, features, beam_size, max_length, min_length, no_repeat_ngram_size, length_penalty, n_best)


class _Candidates(NamedTuple):
    """The best (beam, next word) pairs of each image at one step, best first; each [n, 2k]."""
    scores: torch.Tensor  # the beam's log-prob plus the word's
    beam: torch.Tensor  # the beam the word extends: a row of the image's block of k rows
    word: torch.Tensor
    ends: torch.Tensor  # the word is <eos> and the candidate possible (a finite score)


@dataclass
class _Finished:
    """The hypotheses each image of the batch has finished, and what the stopping rule reads of them."""
    hypotheses: list[list[Hypothesis]]  # per image, in the order they finished
    count: torch.Tensor  # [batch]: how many each image has finished
    kept_worst: torch.Tensor  # [batch]: the n_best-th best finished score, -inf until there are n_best


def _search(model, features, beam_size, max_length, min_length, no_repeat_ngram_size, length_penalty,
            n_best) -> list[list[Hypothesis]]:
    """Beam search over images x beams: each image's `n_best` best hypotheses, best first.

    The i-th image still searching owns rows i*k .. i*k + k-1 of `tokens` and of the model's state.
    An image that stops leaves the batch, so later steps decode only the images still searching."""
    batch, k, device = features.size(0), beam_size, features.device
    if not batch:
        return []
    n_best = min(n_best, k)
    state = select_state(model.init_state(features), torch.arange(batch, device=device).repeat_interleave(k))
    tokens = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)  # [n * k, 1 + words so far]
    scores = torch.full((batch, k), -math.inf, device=device)  # [n, k]: each beam's log-prob
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    alive = torch.arange(batch)  # [n]: the image of each block of k rows
    finished = _Finished([[] for _ in range(batch)], torch.zeros(batch, dtype=torch.long),
                         torch.full((batch,), -math.inf))
    for step in range(max_length):
        log_probs, state = model.step(tokens[:, -1], state)
        log_probs = _mask(log_probs, tokens[:, 1:], step, min_length, no_repeat_ngram_size)  # [n * k, V]
        candidates = _beam_step(scores, log_probs)  # [n, 2k] each
        _record_finished(finished, candidates, tokens, alive, n_best, length_penalty)  # <eos> in the top k
        scores, rows, words = _next_beams(candidates, k)  # the k best that do not end go on
        tokens = torch.cat([tokens[rows], words], dim=1)  # [n * k, 2 + step]
        state = select_state(state, rows)
        done = _stopped(finished, alive, scores, n_best, max_length, length_penalty)
        if done.all():
            break
        if done.any():
            alive, scores, tokens, state = _without_stopped(done, alive, scores, tokens, state)
    else:  # reached max_length: the live beams are the unfinished hypotheses
        _add_unfinished(finished, alive, scores, tokens, n_best, length_penalty)
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished.hypotheses]


def _beam_step(scores: torch.Tensor, log_probs: torch.Tensor) -> _Candidates:
    """The 2k best candidates of each image from its beams' scores [n, k] and next-word log-probs
    [n * k, V]: twice the beam, so that k go on even when k of them end."""
    n, k = scores.shape
    vocab = log_probs.size(1)
    total = (scores.view(-1, 1) + log_probs).view(n, k * vocab)  # [n, k * V]: every beam and next word
    top_scores, top_index = total.topk(min(2 * k, k * vocab), dim=1)  # [n, 2k]
    beam, word = top_index.div(vocab, rounding_mode="floor"), top_index.remainder(vocab)  # [n, 2k]
    return _Candidates(top_scores, beam, word, (word == EOS_ID) & torch.isfinite(top_scores))


def _record_finished(finished: _Finished, candidates: _Candidates, tokens: torch.Tensor, alive: torch.Tensor,
                     n_best: int, length_penalty: float) -> None:
    """Candidates that end with <eos> among an image's top k become its finished hypotheses."""
    k = tokens.size(0) // alive.numel()  # rows per image
    block, rank = candidates.ends[:, :k].nonzero().unbind(1)  # [m] each: the ending candidates
    if not block.numel():
        return
    sequences = tokens[block * k + candidates.beam[block, rank], 1:].tolist()  # their words, without <bos>
    images = alive[block.cpu()].tolist()
    for image, log_prob, words in zip(images, candidates.scores[block, rank].tolist(), sequences):
        finished.hypotheses[image].append(Hypothesis(words, _normalised(log_prob, len(words), length_penalty),
                                                     log_prob, True))
    for image in set(images):
        finished.count[image] = len(finished.hypotheses[image])
        if len(finished.hypotheses[image]) >= n_best:
            scores = (h.score for h in finished.hypotheses[image])
            finished.kept_worst[image] = heapq.nlargest(n_best, scores)[-1]  # stored in float32, as compared


def _next_beams(candidates: _Candidates, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first k candidates of each image that do not end go on: their scores [n, k] (-inf where
    fewer than k are left), the rows they extend [n * k] and their words [n * k, 1]."""
    n = candidates.scores.size(0)
    # a stable sort of the end flags puts the candidates that go on first, still best first
    order = candidates.ends.to(torch.uint8).sort(dim=1, stable=True).indices[:, :k]  # [n, k]
    scores = candidates.scores.gather(1, order).masked_fill(candidates.ends.gather(1, order), -math.inf)
    first_rows = torch.arange(0, n * k, k, device=order.device).view(n, 1)  # [n, 1]: each image's block
    rows = (first_rows + candidates.beam.gather(1, order)).view(-1)  # [n * k]
    return scores, rows, candidates.word.gather(1, order).view(-1, 1)


def _stopped(finished: _Finished, alive: torch.Tensor, scores: torch.Tensor, n_best: int, max_length: int,
             length_penalty: float) -> torch.Tensor:
    """[n] bool: the images whose result no further step can change (the rules in the module
    docstring), and those with no live beam left."""
    k = scores.size(1)
    best_live = scores.amax(1).cpu()  # [n]
    count = finished.count[alive]  # [n]
    # a live beam can at best keep its log-prob and finish at max_length
    done = (count >= n_best) & (finished.kept_worst[alive] >= best_live / max_length ** length_penalty)
    if not length_penalty:
        done |= count >= k
    return done | (best_live == -math.inf)


def _without_stopped(done: torch.Tensor, alive: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor,
                     state) -> tuple:
    """alive [n'], scores [n', k], tokens and state [n' * k] of the images still searching."""
    k = scores.size(1)
    keep = (~done).nonzero().squeeze(1)  # [n'], on the CPU like `alive`
    alive = alive[keep]
    keep = keep.to(scores.device)
    rows = (keep.unsqueeze(1) * k + torch.arange(k, device=scores.device)).view(-1)  # [n' * k]
    return alive, scores[keep], tokens[rows], select_state(state, rows)


def _add_unfinished(finished: _Finished, alive: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor,
                    n_best: int, length_penalty: float) -> None:
    """At max_length, an image with fewer than `n_best` finished takes its live beams as unfinished
    hypotheses (cut where they are)."""
    k = scores.size(1)
    for block, image in enumerate(alive.tolist()):
        if len(finished.hypotheses[image]) >= n_best:
            continue
        beams = zip(scores[block].tolist(), tokens[block * k:(block + 1) * k, 1:].tolist())
        finished.hypotheses[image] += [Hypothesis(words, _normalised(log_prob, len(words), length_penalty),
                                                  log_prob, False)
                                       for log_prob, words in beams if math.isfinite(log_prob)]


def _one_image_search(model, features, beam_size, max_length, min_length, no_repeat_ngram_size,
                      length_penalty, n_best) -> list[Hypothesis]:
    """`_search` for one image, its bookkeeping on numpy arrays and lists of a few beams.

    The same captions and scores (tests/test_search.py compares the two on random decoders). A torch op
    on a few rows costs 5-15 us whatever its size, and `_search` spends about 30 of them a step: for one
    photo on a CPU that is as long as the decoder step itself. Here the search is 1.5x faster, and one photo
    34 -> 30 ms in bench/speed.py (results speed-one-image-search)."""
    k, device = beam_size, features.device
    n_best = min(n_best, k)
    state = select_state(model.init_state(features), torch.zeros(k, dtype=torch.long, device=device))
    tokens = torch.full((k,), BOS_ID, dtype=torch.long, device=device)
    words: list[list[int]] = [[] for _ in range(k)]  # each beam's words so far, without <bos>
    scores = np.full(k, -np.inf, dtype=np.float32)
    scores[0] = 0.0  # all beams start identical: expand only the first
    finished: list[Hypothesis] = []
    longest = max_length ** length_penalty
    for step in range(max_length):
        log_probs, state = model.step(tokens, state)
        log_probs = log_probs.float().cpu().numpy()  # [k, V]; writable: the step's own output
        vocab = log_probs.shape[1]
        _mask_numpy(log_probs, words, step, min_length, no_repeat_ngram_size)
        total = (scores[:, None] + log_probs).ravel()
        count = min(2 * k, total.size)
        top = np.argpartition(-total, count - 1)[:count]
        top = top[np.argsort(-total[top], kind="stable")]
        live = []  # (score, beam, word) of the candidates that go on, best first
        for rank, index in enumerate(top.tolist()):
            score, (beam, word) = float(total[index]), divmod(index, vocab)
            if word == EOS_ID and score != -math.inf:
                if rank < k:
                    finished.append(Hypothesis(words[beam], _normalised(score, len(words[beam]), length_penalty),
                                               score, True))
            elif len(live) < k:
                live.append((score, beam, word))
        words = [words[beam] + [word] for _, beam, word in live]
        scores = np.array([score for score, _, _ in live], dtype=np.float32)
        tokens = torch.tensor([word for _, _, word in live], dtype=torch.long, device=device)
        state = select_state(state, torch.tensor([beam for _, beam, _ in live], device=device))
        best_live = scores.max()
        done = len(finished) >= n_best and (np.float32(heapq.nlargest(n_best, (h.score for h in finished))[-1])
                                            >= best_live / np.float32(longest))  # in float32, as _search compares
        if not length_penalty:
            done = done or len(finished) >= k
        if done or best_live == -math.inf:
            break
    else:  # reached max_length: the live beams are the unfinished hypotheses
        if len(finished) < n_best:
            finished += [Hypothesis(w, _normalised(float(s), len(w), length_penalty), float(s), False)
                         for s, w in zip(scores.tolist(), words) if math.isfinite(s)]
    return sorted(finished, key=lambda h: h.score, reverse=True)[:n_best]


def _mask_numpy(log_probs: np.ndarray, words: list[list[int]], step: int, min_length: int,
                no_repeat_ngram_size: int) -> None:
    """`_mask` in place on numpy log-probs [k, V], for beams whose words so far are `words`."""
    n = no_repeat_ngram_size
    log_probs[:, NEVER_EMITTED] = -np.inf
    if step < min_length:
        log_probs[:, EOS_ID] = -np.inf
    if n and step >= n:
        for row, generated in enumerate(words):
            prefix = generated[step - n + 1:]
            blocked = [generated[i + n - 1] for i in range(step - n + 1) if generated[i:i + n - 1] == prefix]
            log_probs[row, blocked] = -np.inf
    log_probs[log_probs.max(1) == -np.inf, EOS_ID] = 0.0  # every word blocked: end rather than emit garbage
