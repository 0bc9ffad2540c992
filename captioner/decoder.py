"""The recurrent decoder: the image feature becomes the initial hidden state, words go in, words come out.

`cell` picks nn.LSTM, nn.GRU or nn.RNN; all three use the fused cuDNN/oneDNN kernels for
teacher forcing, and `step` advances one token at a time for greedy and beam search.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DecoderConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h, or (h, c) for an LSTM; each [layers, batch, hidden]


class CaptionDecoder(nn.Module):
    def __init__(self, vocab_size: int, feature_dim: int, config: DecoderConfig):
        super().__init__()
        self.cell = config.cell
        self.num_layers, self.hidden_dim = config.num_layers, config.hidden_dim
        self.feature_dim, self.vocab_size = feature_dim, vocab_size
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.feature_dropout = nn.Dropout(config.dropout)
        self.init_h = nn.Linear(feature_dim, config.num_layers * config.hidden_dim)
        self.init_c = nn.Linear(feature_dim, config.num_layers * config.hidden_dim) if config.cell == "lstm" else None
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=0)
        self.rnn = CELLS[config.cell](config.embed_dim, config.hidden_dim, config.num_layers, batch_first=True,
                                      dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        x = self.feature_dropout(self.feature_norm(features.float()))

        def layers(linear: nn.Linear) -> torch.Tensor:
            return linear(x).view(-1, self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()

        h = layers(self.init_h)
        return (h, layers(self.init_c)) if self.init_c is not None else h

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: features [B, D], input tokens [B, T] (starting with <bos>) -> logits [B, T, V]."""
        outputs, _ = self.rnn(self.dropout(self.embed(tokens)), self.init_state(features))
        return self.out(self.dropout(outputs))

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step: last tokens [N] -> log-probabilities [N, V] and the next state."""
        output, state = self.rnn(self.embed(tokens).unsqueeze(1), state)
        return torch.log_softmax(self.out(output.squeeze(1)).float(), dim=-1), state


def select_state(state: State, index: torch.Tensor) -> State:
    """Reorder or repeat the batch dimension of a decoder state."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)
