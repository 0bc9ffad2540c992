"""Decoding: greedy, beam and constrained beam search, all batched (beam search over images x beams,
constrained beam search over images x constraint states x beams; beam search of a single image keeps
its few beams' bookkeeping in numpy, where torch's per-op cost would match the decoder step's).

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
    return [hyps for hyps, _ in _search(model, features, None, torch.zeros(features.size(0), dtype=torch.long),
                                        beam_size, max_length, min_length, no_repeat_ngram_size,
                                        length_penalty, n_best)]


def _one_image_search(model, features, beam_size, max_length, min_length, no_repeat_ngram_size,
                      length_penalty, n_best) -> list[Hypothesis]:
    """`_search` without word sets for one image, its bookkeeping on numpy arrays and lists of a few beams.

    The same captions and scores (tests/test_search.py compares the two on random decoders). A torch op
    on a few rows costs 5-15 us whatever its size, and `_search` spends about 30 of them a step: for one
    photo on a CPU that is as long as the decoder step itself. Here the search is 1.5x faster, and one photo
    34 -> 30 ms in bench/speed.py (results speed-one-image-search)."""
    k, n, device = beam_size, no_repeat_ngram_size, features.device
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
        log_probs[:, NEVER_EMITTED] = -np.inf
        if step < min_length:
            log_probs[:, EOS_ID] = -np.inf
        if n and step >= n:
            for row, generated in enumerate(words):
                prefix = generated[step - n + 1:]
                blocked = [generated[i + n - 1] for i in range(step - n + 1) if generated[i:i + n - 1] == prefix]
                log_probs[row, blocked] = -np.inf
        log_probs[log_probs.max(1) == -np.inf, EOS_ID] = 0.0  # every word blocked: end rather than emit garbage
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


@dataclass
class ConstrainedHypothesis(Hypothesis):
    satisfied: int  # how many of the image's word sets the caption contains


MAX_WORD_SETS = 2  # states, and so the decoding cost, grow as 2**sets


@torch.inference_mode()
def constrained_beam_search(model, features: torch.Tensor, constraints: list[list[list[int]]], beam_size: int = 3,
                            max_length: int = 20, min_length: int = 1, no_repeat_ngram_size: int = 0,
                            length_penalty: float = 0.0, n_best: int = 1) -> list[list[ConstrainedHypothesis]]:
    """Beam search whose captions must contain a word of each set (Anderson et al. 2017, nocaps' baseline).

    `constraints[i]` lists image i's word sets (at most two), each a list of token ids (forms of one
    word, e.g. "dog" and "dogs"); a caption satisfies a set when it contains any of its ids. An
    image without sets gets exactly `beam_search`'s captions. A finite-state machine tracks which
    sets a hypothesis has satisfied (one state per subset) and each state keeps its own beam of
    `beam_size`; hypotheses may end in any state, but the image is decoded, ranked and stopped
    like `beam_search` on the all-satisfied state's finished hypotheses alone. When that state has
    fewer than `n_best` finished by `max_length`, its unfinished ones fill in; when it has none at
    all, the best hypotheses of the most-satisfied state that has any are returned instead
    (`satisfied` says how many sets they contain).
    """
    if len(constraints) != features.size(0):
        raise ValueError(f"{len(constraints)} constraint lists for {features.size(0)} images")
    if any(len(sets) > MAX_WORD_SETS for sets in constraints):
        raise ValueError(f"at most {MAX_WORD_SETS} word sets per image")
    if any(not ids for sets in constraints for ids in sets):
        raise ValueError("an empty word set can never be satisfied")
    if any(token in (*NEVER_EMITTED, EOS_ID) for sets in constraints for ids in sets for token in ids):
        raise ValueError("constraint ids must be words, not <pad>, <bos>, <eos> or <unk>")
    word_bits: dict[tuple[int, int], int] = {}  # (image, token id) -> the sets it satisfies, one bit each
    for image, sets in enumerate(constraints):
        for bit, ids in enumerate(sets):
            for token in ids:
                word_bits[image, int(token)] = word_bits.get((image, int(token)), 0) | 1 << bit
    goal = torch.tensor([(1 << len(sets)) - 1 for sets in constraints], dtype=torch.long)
    return [[ConstrainedHypothesis(h.tokens, h.score, h.log_prob, h.finished, satisfied) for h in hyps]
            for hyps, satisfied in _search(model, features, word_bits, goal, beam_size, max_length, min_length,
                                           no_repeat_ngram_size, length_penalty, n_best)]


def _search(model, features, word_bits: dict | None, goal: torch.Tensor, beam_size, max_length, min_length,
            no_repeat_ngram_size, length_penalty, n_best) -> list[tuple[list[Hypothesis], int]]:
    """Beam search over images x states x beams: a word moves a hypothesis from state s to
    s | word_bits[image, word] (a bit per word set), and each state keeps the best `beam_size`
    that reach it. `goal[i]` is image i's all-satisfied state. Per image: the hypotheses, and how
    many sets they satisfy. With no word sets there is one state and this is plain beam search."""
    batch, k, device = features.size(0), beam_size, features.device
    if not batch:
        return []
    n_best = min(n_best, k)
    goals = goal.tolist()
    n_states = 1 << max(goals, default=0).bit_length()
    width = n_states * k  # rows per image
    state = select_state(model.init_state(features), torch.arange(batch, device=device).repeat_interleave(width))
    tokens = torch.full((batch * width, 1), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((batch, n_states, k), -math.inf, device=device)
    scores[:, 0, 0] = 0.0  # all beams start identical in the empty state: expand only the first
    alive = torch.arange(batch)  # which image each row block belongs to
    finished = [[[] for _ in range(n_states)] for _ in range(batch)]  # per image, per state
    goal_finished = torch.zeros(batch, dtype=torch.long)
    kept_worst = torch.full((batch,), -math.inf)  # n_best-th best finished score in the goal state
    longest = max_length ** length_penalty  # a finished caption's length is at most max_length
    cut = [[[] for _ in range(n_states)] for _ in range(batch)]  # per image, per state: unfinished at max_length
    bits = None  # [batch, V]: word_bits as a table, once the vocabulary size is known
    columns = None  # [batch, C]: each image's constraint ids, padded with <pad>

    for step in range(max_length):
        n = alive.numel()
        log_probs, state = model.step(tokens[:, -1], state)
        log_probs = _mask(log_probs, tokens[:, 1:], step, min_length, no_repeat_ngram_size)
        vocab = log_probs.size(1)
        if bits is None and n_states > 1:
            bits, columns = (t.to(device) for t in _bits_table(word_bits, batch, vocab))
        total = (scores.view(-1, 1) + log_probs).view(n, n_states, k, vocab)
        if n_states == 1:
            top_scores, top_index = total.view(n, 1, k * vocab).topk(min(2 * k, k * vocab), dim=2)  # [n, 1, 2k]
            origin, word = top_index.div(vocab, rounding_mode="floor"), top_index.remainder(vocab)  # origin: a row of the image's block
        else:
            top_scores, origin, word = _constrained_top(total, bits[alive.to(device)], columns[alive.to(device)], 2 * k)
        ends = (word == EOS_ID) & torch.isfinite(top_scores)

        ended = ends[:, :, :k].nonzero()
        if ended.numel():
            row, to, j = ended.unbind(1)
            sequences = tokens[row * width + origin[row, to, j], 1:].tolist()
            reached = set()
            for image, s, total_lp, words in zip(alive[row.cpu()].tolist(), to.tolist(),
                                                 top_scores[row, to, j].tolist(), sequences):
                finished[image][s].append(Hypothesis(words, _normalised(total_lp, len(words), length_penalty),
                                                     total_lp, True))
                if s == goals[image]:
                    goal_finished[image] += 1
                    reached.add(image)
            for image in reached:
                if goal_finished[image] >= n_best:
                    kept_worst[image] = heapq.nlargest(n_best, (h.score for h in finished[image][goals[image]]))[-1]

        order = ends.to(torch.uint8).sort(dim=2, stable=True).indices[:, :, :k]  # the first k that go on
        scores = top_scores.gather(2, order).masked_fill(ends.gather(2, order), -math.inf)
        first_rows = torch.arange(0, n * width, width, device=device).view(n, 1, 1)  # of each image's block
        rows = (first_rows + origin.gather(2, order)).view(-1)
        tokens = torch.cat([tokens[rows], word.gather(2, order).view(-1, 1)], dim=1)
        state = select_state(state, rows)

        best_live = scores.view(n, -1).amax(1).cpu()
        done = (goal_finished[alive] >= n_best) & (kept_worst[alive] >= best_live / longest)
        if not length_penalty:
            done |= goal_finished[alive] >= k
        done |= best_live == -math.inf
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            alive = alive[keep]
            keep = keep.to(device)
            scores = scores[keep]
            rows = (keep.unsqueeze(1) * width + torch.arange(width, device=device)).view(-1)
            tokens, state = tokens[rows], select_state(state, rows)
    else:  # reached max_length: the live beams are the unfinished hypotheses
        for i, image in enumerate(alive.tolist()):
            for r, (total_lp, words) in enumerate(zip(scores[i].view(-1).tolist(),
                                                      tokens[i * width:(i + 1) * width, 1:].tolist())):
                if math.isfinite(total_lp):
                    cut[image][r // k].append(Hypothesis(words, _normalised(total_lp, len(words), length_penalty),
                                                         total_lp, False))

    results = []
    for image, target in enumerate(goals):
        pool = finished[image][target] + (cut[image][target] if len(finished[image][target]) < n_best else [])
        satisfied = bin(target).count("1")
        while not pool and satisfied:  # goal never reached: the most-satisfied states that have anything
            satisfied -= 1
            pool = [h for s in range(n_states) if s & target == s and bin(s).count("1") == satisfied
                    for h in finished[image][s] + cut[image][s]]
        results.append((sorted(pool, key=lambda h: h.score, reverse=True)[:n_best], satisfied))
    return results


def _constrained_top(total: torch.Tensor, bits: torch.Tensor, columns: torch.Tensor, count: int):
    """The best `count` moves into each state, from total [n, states, k, V] (log-prob of every beam
    and next word) -> scores, origin (a row of the image's states x k block) and word, each [n, states, count].

    A word moves a beam from state s to s | bits[word]. Most words leave it where it is: those
    candidates are the state's own k x V block, masked where the word would move it on; the few
    that move it (the image's constraint ids, `columns`) are gathered from every state."""
    n, n_states, k, vocab = total.shape
    states = torch.arange(n_states, device=total.device).view(1, n_states, 1)
    stays = (states | bits.unsqueeze(1)) == states  # [n, state, V]
    same = total.masked_fill(~stays.unsqueeze(2), -math.inf).view(n, n_states, k * vocab)
    moves = total.gather(3, columns.view(n, 1, 1, -1).expand(n, n_states, k, -1))  # [n, from, k, C]
    target = states | bits.gather(1, columns).unsqueeze(1)  # [n, from, C]
    lands = (target.unsqueeze(1) == states.unsqueeze(3)) & (target != states).unsqueeze(1)  # [n, to, from, C]
    cross = moves.unsqueeze(1).masked_fill(~lands.unsqueeze(3), -math.inf).view(n, n_states, -1)
    candidates = torch.cat([same, cross], dim=2)
    top_scores, index = candidates.topk(min(count, candidates.size(2)), dim=2)
    own = index < k * vocab
    moved = (index - k * vocab).clamp(min=0)  # from * k * C + beam * C + column
    width = columns.size(1)
    origin = torch.where(own, states * k + index // vocab, moved // width)
    word = torch.where(own, index % vocab, columns.gather(1, (moved % width).view(n, -1)).view_as(moved))
    return top_scores, origin, word


def _bits_table(word_bits: dict[tuple[int, int], int], batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, V]: the bits of the sets each token id satisfies; [batch, C]: each image's constraint
    ids, padded with <pad> (no bits, never emitted)."""
    if any(not 0 <= token < vocab for _, token in word_bits):
        raise ValueError(f"constraint token ids must lie in [0, {vocab})")
    table = torch.zeros(batch, vocab, dtype=torch.long)
    ids: list[list[int]] = [[] for _ in range(batch)]
    for (image, token), bit in word_bits.items():
        table[image, token] = bit
        ids[image].append(token)
    columns = torch.full((batch, max(map(len, ids))), PAD_ID, dtype=torch.long)
    for image, tokens in enumerate(ids):
        columns[image, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return table, columns
