"""Constrained beam search (Anderson et al. 2017, nocaps' baseline): beam search whose captions must
contain a word of each of an image's word sets. Research code behind bench/constrained_tags.py.

A finite-state machine tracks which sets a hypothesis has satisfied (one state per subset), and each
state keeps its own beam; the search runs over images x states x beams. Scores, masking and stopping
are `captioner.search.beam_search`'s (see that module's docstring): an image without word sets gets
exactly beam_search's captions.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from captioner.decoder import select_state
from captioner.search import BOS_ID, EOS_ID, NEVER_EMITTED, PAD_ID, Hypothesis, _mask


def _normalised(log_prob: float, words: int, length_penalty: float) -> float:
    """A hypothesis's score, as captioner.search ranks it: log_prob / (words + 1)**length_penalty."""
    return log_prob / (words + 1) ** length_penalty if length_penalty else log_prob


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
            for hyps, satisfied in _state_machine_search(model, features, word_bits, goal, beam_size, max_length,
                                                         min_length, no_repeat_ngram_size, length_penalty, n_best)]


def _state_machine_search(model, features, word_bits: dict, goal: torch.Tensor, beam_size, max_length, min_length,
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
            # origin: a row of the image's block
            origin, word = top_index.div(vocab, rounding_mode="floor"), top_index.remainder(vocab)
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
