"""The recurrent decoders: the image becomes the initial hidden state, words go in, words come out.

CaptionDecoder (the default) sees only the pooled feature vector [B, D]. `cell` picks nn.LSTM,
nn.GRU or nn.RNN; all three use the fused cuDNN/oneDNN kernels for teacher forcing, and `step`
advances one token at a time for greedy and beam search.

AttentionDecoder (decoder.attention: true) is Show, Attend and Tell's soft attention: it sees
the encoder's grid [B, L, D] (L = H * W cells) and at every word looks again at the cells.

Ensemble mixes several trained decoders' next-word distributions (decode.cells with weights).

TagDecoder (decoder.inputs: tags) is a CaptionDecoder started from the photo's tags instead of its
features: the tag decoder that writes the captions of photos the photo decoder does not know
(routing.py; how it is trained and helped along: fallback.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .concepts import ConceptWords, Tag, default_concept_words
from .config import DecoderConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h, or (h, c) for an LSTM; each [layers, batch, hidden]


class CaptionDecoder(nn.Module):
    uses_grid = False

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


class AttentionDecoder(nn.Module):
    """Attention over the grid cells (scaled dot-product, SAT's gate); the state carries the projected cells."""

    uses_grid = True
    CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}

    def __init__(self, vocab_size: int, feature_dim: int, config: DecoderConfig):
        super().__init__()
        self.cell, self.hidden_dim = config.cell, config.hidden_dim
        self.feature_dim, self.vocab_size = feature_dim, vocab_size
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.feature_dropout = nn.Dropout(config.dropout)
        self.memory = nn.Linear(feature_dim, config.hidden_dim)
        self.keys = nn.Linear(config.hidden_dim, config.attention_dim)
        self.query = nn.Linear(config.hidden_dim, config.attention_dim)
        self.gate = nn.Linear(config.hidden_dim, config.hidden_dim)  # SAT's beta: how much to look this step
        self.init_h = nn.Linear(feature_dim, config.hidden_dim)
        self.init_c = nn.Linear(feature_dim, config.hidden_dim) if config.cell == "lstm" else None
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=0)
        self.rnn = self.CELLS[config.cell](config.embed_dim + config.hidden_dim, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(2 * config.hidden_dim, vocab_size)

    def init_state(self, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """grid [B, L, D] -> (h, [c,] memory [1, B, L, H], keys [1, B, L, A]): the batch on dim 1 throughout."""
        cells = self.feature_dropout(self.feature_norm(grid.float()))
        pooled = cells.mean(1)
        memory = self.memory(cells)
        keys = self.keys(memory) / self.keys.out_features ** 0.5
        hidden = [self.init_h(pooled)] + ([self.init_c(pooled)] if self.init_c is not None else [])
        return (*(h.unsqueeze(0) for h in hidden), memory.unsqueeze(0), keys.unsqueeze(0))

    def _advance(self, embedded: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        *hidden, memory, keys = state
        h = hidden[0][0]
        weights = torch.softmax(torch.bmm(keys[0], self.query(h).unsqueeze(2)), dim=1)  # [B, L, 1]
        context = torch.sigmoid(self.gate(h)) * torch.bmm(weights.transpose(1, 2), memory[0]).squeeze(1)
        step_input = torch.cat([embedded, context], dim=1)
        if self.init_c is not None:
            h, c = self.rnn(step_input, (h, hidden[1][0]))
            hidden = [h.unsqueeze(0), c.unsqueeze(0)]
        else:
            h = self.rnn(step_input, h)
            hidden = [h.unsqueeze(0)]
        return torch.cat([h, context], dim=1), (*hidden, memory, keys)

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: grid [B, L, D], input tokens [B, T] (starting with <bos>) -> logits [B, T, V]."""
        state = self.init_state(grid)
        embedded = self.dropout(self.embed(tokens))
        outputs = []
        for t in range(tokens.size(1)):
            output, state = self._advance(embedded[:, t], state)
            outputs.append(output)
        return self.out(self.dropout(torch.stack(outputs, dim=1)))

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        output, state = self._advance(self.embed(tokens), state)
        return torch.log_softmax(self.out(output).float(), dim=-1), state


class TagDecoder(CaptionDecoder):
    """A caption decoder whose initial state comes from a tag vector [W] instead of CNN features;
    `tag_vector` turns the encoder's class probabilities into it."""

    def __init__(self, vocab_size: int, feature_dim: int, config: DecoderConfig,
                 concept_words: ConceptWords | None = None):
        super().__init__(vocab_size, feature_dim, config)
        self.concept_words = concept_words or default_concept_words()
        size = len(self.concept_words.words)
        self.feature_norm = nn.Identity()  # probabilities: their size is the message
        self.feature_dropout = nn.Identity()  # the training noise already drops tags, as the classifier misses them
        self.init_h = nn.Linear(size, config.num_layers * config.hidden_dim)
        nn.init.normal_(self.init_h.weight, std=1.0)  # a tag is an embedding row, strong from the start
        self.init_c = nn.Linear(size, config.num_layers * config.hidden_dim) if config.cell == "lstm" else None

    def tag_vector(self, class_probs: torch.Tensor) -> torch.Tensor:
        """The encoder's class probabilities [B, 1000] -> tag vectors [B, W]: the top tags' probabilities,
        scaled to sum to 1. On a strange photo the head spreads itself over classes no caption word names
        (bears at 0.2), and the unscaled weak tags read as "no tag": "a cat sitting on a wooden bench".
        Scaled, the photo is what the head can name of it: "a polar bear walking in the grass"."""
        return self.tag_vectors(self.concept_words.tags(class_probs)).to(class_probs.device)

    def tag_vectors(self, tags: list[list[Tag]]) -> torch.Tensor:
        """Each image's tags (ConceptWords.tags) -> its tag vector [W], as `tag_vector` makes it; on the CPU."""
        vector = torch.zeros(len(tags), len(self.concept_words.words))
        position = {word: i for i, word in enumerate(self.concept_words.words)}
        for row, image_tags in enumerate(tags):
            for word, probability in image_tags:
                vector[row, position[word]] = probability
        return vector / vector.sum(1, keepdim=True).clamp_min(1e-6)


class Ensemble:
    """Several photo decoders as one for the searches: each cell starts from its own state built from the same
    features, and each step's next-word distribution is their weighted mixture, log sum_i w_i p_i(word), a
    distribution itself (so scores stay log-probabilities). The state is the tuple of the members' states."""

    uses_grid = False

    def __init__(self, members: dict[str, object], weights: dict[str, float]):
        if set(members) != set(weights) or not members:
            raise ValueError(f"an ensemble needs a weight per member: {sorted(members)} vs {sorted(weights)}")
        if any(getattr(m, "uses_grid", False) for m in members.values()):
            raise ValueError("an ensemble's members read pooled features: attention decoders cannot take part")
        if len({m.vocab_size for m in members.values()}) != 1:
            raise ValueError("an ensemble's members must share their vocabulary")
        self.members, self.weights = members, weights
        self.vocab_size = next(iter(members.values())).vocab_size
        self._log_weights = torch.tensor([weights[name] for name in members]).log().view(-1, 1, 1)

    def init_state(self, features: torch.Tensor) -> tuple:
        return tuple(member.init_state(features) for member in self.members.values())

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        steps = [member.step(tokens, s) for member, s in zip(self.members.values(), state)]
        log_probs = torch.stack([lp.float() for lp, _ in steps])  # [members, N, V]
        mixed = torch.logsumexp(log_probs + self._log_weights.to(log_probs.device), dim=0)
        return mixed, tuple(s for _, s in steps)


def build_decoder(vocab_size: int, feature_dim: int, config: DecoderConfig) -> nn.Module:
    if config.inputs == "tags":
        return TagDecoder(vocab_size, feature_dim, config)
    return (AttentionDecoder if config.attention else CaptionDecoder)(vocab_size, feature_dim, config)


def select_state(state: State, index: torch.Tensor) -> State:
    """Reorder or repeat the batch dimension of a decoder state."""
    if isinstance(state, tuple):
        return tuple(select_state(s, index) for s in state)
    return state.index_select(1, index)
