"""bench/memory.py and bench/cell_memory.py: how far back a decoder remembers, on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder

import cell_memory  # bench/, on pytest's path (pyproject.toml)
import memory



VOCAB, FEATURES, HIDDEN = 12, 6, 8


def tiny_decoder(cell: str, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(VOCAB, FEATURES, DecoderConfig(cell=cell, embed_dim=5, hidden_dim=HIDDEN, dropout=0.5)).eval()


def captions(n: int = 4, words: int = 7) -> torch.Tensor:
    return torch.cat([torch.full((n, 1), 1), torch.randint(4, VOCAB, (n, words))], dim=1)  # <bos> w1 .. w7


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_measurements_have_one_value_per_step(cell):
    decoder, tokens, features = tiny_decoder(cell), captions(), torch.randn(4, FEATURES)
    gradient = memory.gradient_through_time(decoder, features, tokens)
    assert gradient["state"].shape == (7,) and (gradient["state"] > 0).all()
    assert ("h" in gradient) == (cell == "lstm")
    assert memory.image_influence(decoder, features, features.roll(1, 0), tokens).shape == (7,)
    accuracy, count = memory.accuracy_by_position(decoder, features, tokens, pad=0, eos=2)
    assert accuracy.shape == count.shape == (7,) and count.tolist() == [4] * 7
    assert all(p.grad is None for p in decoder.parameters())  # measuring leaves the model's gradients alone


def test_a_plain_rnn_with_small_recurrent_weights_loses_the_gradient_geometrically():
    decoder, scale = tiny_decoder("rnn"), 0.3
    with torch.no_grad():
        orthogonal, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN))
        decoder.rnn.weight_hh_l0.copy_(scale * orthogonal)  # keeps a vector's norm, times the scale
        decoder.embed.weight.zero_()  # no input: the state stays small, where tanh is the identity
        decoder.rnn.bias_ih_l0.zero_()
        decoder.rnn.bias_hh_l0.zero_()
        decoder.init_h.weight.mul_(0.01)
        decoder.init_h.bias.zero_()
    norms = memory.gradient_through_time(decoder, torch.randn(5, FEATURES), captions(5, 8))["state"]
    ratios = norms[:-1] / norms[1:]  # one step further back / this step
    assert ratios == pytest.approx(torch.full_like(ratios, scale), rel=1e-3)


def test_an_lstm_whose_forget_gate_is_held_open_keeps_the_gradient():
    decoder = tiny_decoder("lstm")
    with torch.no_grad():
        decoder.rnn.weight_hh_l0.zero_()
        decoder.rnn.bias_ih_l0.zero_()
        decoder.rnn.bias_ih_l0[:HIDDEN] = -30.0  # input gate shut (gates: input, forget, cell, output)
        decoder.rnn.bias_ih_l0[HIDDEN:2 * HIDDEN] = 30.0  # forget gate open: c carries over unchanged
    gradient = memory.gradient_through_time(decoder, torch.randn(5, FEATURES), captions(5, 8))
    assert gradient["state"] == pytest.approx(torch.full((8,), float(gradient["state"][-1])), rel=1e-4)
    assert gradient["h"].abs().max() < 1e-6  # no recurrent weights: the gradient goes through c alone


def test_the_photo_matters_only_when_it_differs():
    decoder, tokens, features = tiny_decoder("gru"), captions(), torch.randn(4, FEATURES)
    assert memory.image_influence(decoder, features, features, tokens).abs().max() < 1e-6
    assert (memory.image_influence(decoder, features, features.roll(1, 0), tokens) > 0).all()


def test_accuracy_by_position_counts_words_not_eos_or_padding():
    decoder = tiny_decoder("rnn")
    with torch.no_grad():
        decoder.out.weight.zero_()
        decoder.out.bias.zero_()
        decoder.out.bias[5] = 1.0  # always says word 5
    tokens = torch.tensor([[1, 5, 6, 5, 2, 0],
                           [1, 5, 5, 2, 0, 0],
                           [1, 7, 2, 0, 0, 0]])
    accuracy, count = memory.accuracy_by_position(decoder, torch.randn(3, FEATURES), tokens, pad=0, eos=2)
    assert count.tolist() == [3, 2, 1, 0, 0]
    assert accuracy[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert accuracy[3:].isnan().all()


def test_bench_writes_plot_numbers_and_table_for_a_trained_run(trained, tmp_path):
    _, run = trained
    assert cell_memory.main(["--runs", str(run), "--length", "7", "--out", str(tmp_path), "--name", "m"]) == 0
    results = json.loads((tmp_path / "m.json").read_text())
    lstm = results["cells"][0]
    assert lstm["cell"] == "lstm" and lstm["captions"] >= 4
    assert len(lstm["gradient_relative_by_steps_back"]) == 7 and lstm["gradient_relative_by_steps_back"][0] == 1.0
    assert len(lstm["kl_by_word"]) == 7 and min(lstm["kl_by_word"]) >= 0
    assert (tmp_path / "m.png").stat().st_size > 0
    assert "| lstm |" in (tmp_path / "m.md").read_text()
    with pytest.raises(SystemExit, match="no dev caption has 30 words"):
        cell_memory.main(["--runs", str(run), "--length", "30", "--out", str(tmp_path)])
