"""How far back a trained decoder remembers: the measurements behind the RNN / LSTM / GRU claim
(bench/cell_memory.py runs them on trained decoders).

All three run a CaptionDecoder one token at a time under teacher forcing (eval mode, no dropout)
on captions given as a [N, T] tensor of ids that starts with <bos>. Step j reads token j with the
state s_j and predicts token j + 1; s_0 is the image's initial state.

- gradient_through_time: the norm of d(loss of the last token) / d s_j for every j, per caption,
  averaged. A plain RNN's norm shrinks by roughly the same factor each step back (vanishing
  gradients); the LSTM's cell state and the GRU's update gate are meant to keep it from shrinking.
- image_influence: per step, KL(p(. | own photo) || p(. | another photo)) of the next-word
  distribution with the same words fed in: how much the initial state still matters.
- accuracy_by_position: teacher-forced word accuracy at each word position.
"""
from __future__ import annotations

import torch
from torch import nn

from captioner.decoder import CaptionDecoder, State


def _check(decoder: nn.Module) -> None:
    if not isinstance(decoder, CaptionDecoder):
        raise ValueError(f"memory measurements need a CaptionDecoder (image -> initial state), "
                         f"not {type(decoder).__name__}")


def _parts(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _norms(gradients: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """State parts' gradients, each [layers, N, hidden] -> one norm per caption [N]."""
    return torch.sqrt(sum(g.pow(2).sum((0, 2)) for g in gradients))


def gradient_through_time(decoder: CaptionDecoder, features: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """features [N, D], tokens [N, T] without padding -> for each state s_0 .. s_{T-2}, the mean over
    captions of the norm of the gradient of the cross-entropy of the last token (tokens[:, T-1],
    predicted at step T-2).

    "state" is the whole recurrent state (h; for an LSTM h and c together); an LSTM also gets "h"
    alone. Entry j is the state fed to step j: the last entry is 0 steps back from the last word,
    the first is the image's initial state, T-2 steps back.
    """
    _check(decoder)
    decoder.eval()
    with torch.enable_grad():
        state = decoder.init_state(features.float())
        states = []
        for j in range(tokens.size(1) - 1):
            states.append(_parts(state))
            log_probs, state = decoder.step(tokens[:, j], state)
        # summed: each caption's loss depends only on its own states, so each gets its own gradient
        loss = nn.functional.nll_loss(log_probs, tokens[:, -1], reduction="sum")
        flat = [p for parts in states for p in parts]
        gradients = torch.autograd.grad(loss, flat)
    width = len(states[0])
    per_state = [gradients[i:i + width] for i in range(0, len(gradients), width)]
    result = {"state": torch.stack([_norms(g) for g in per_state]).mean(1)}
    if width > 1:
        result["h"] = torch.stack([_norms(g[:1]) for g in per_state]).mean(1)
    return result


@torch.no_grad()
def _teacher_forced(decoder: CaptionDecoder, state: State, tokens: torch.Tensor) -> torch.Tensor:
    """log-probabilities [N, T-1, V] of every next token, reading tokens[:, :-1] from `state`."""
    steps = []
    for j in range(tokens.size(1) - 1):
        log_probs, state = decoder.step(tokens[:, j], state)
        steps.append(log_probs)
    return torch.stack(steps, dim=1)


@torch.no_grad()
def image_influence(decoder: CaptionDecoder, features: torch.Tensor, other_features: torch.Tensor,
                    tokens: torch.Tensor) -> torch.Tensor:
    """Per step [T-1], the mean over captions of KL(p(next | own photo) || p(next | other photo)),
    both fed the same words tokens[:, :-1] (nats). features and other_features are [N, D]."""
    _check(decoder)
    decoder.eval()
    own = _teacher_forced(decoder, decoder.init_state(features.float()), tokens)
    other = _teacher_forced(decoder, decoder.init_state(other_features.float()), tokens)
    return (own.exp() * (own - other)).sum(-1).mean(0)


@torch.no_grad()
def accuracy_by_position(decoder: CaptionDecoder, features: torch.Tensor, tokens: torch.Tensor,
                         pad: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced word accuracy at word positions 1 .. T-1 (the argmax is the reference word),
    over padded captions [N, T] (<bos> words <eos> <pad>...): (accuracy [T-1], count [T-1]).
    <eos> and padding are not words; a position no caption reaches has accuracy nan."""
    _check(decoder)
    decoder.eval()
    state, predicted = decoder.init_state(features.float()), []
    for j in range(tokens.size(1) - 1):
        log_probs, state = decoder.step(tokens[:, j], state)
        predicted.append(log_probs.argmax(-1))
    targets = tokens[:, 1:]
    words = (targets != pad) & (targets != eos)
    correct = (torch.stack(predicted, dim=1) == targets) & words
    count = words.sum(0)
    return correct.sum(0) / count.float().masked_fill(count == 0, float("nan")), count
