"""Self-critical fine-tuning (train.objective: scst): sampling, the reward, and the run it makes."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from captioner.cli import main
from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder
from captioner.metrics import CiderD, cider_d
from captioner.scst import SelfCriticalLoss
from captioner.search import BOS_ID, EOS_ID, PAD_ID, UNK_ID, greedy_search, sample_captions
from captioner.text import EOS, SPECIALS, Vocabulary
from conftest import tiny_config


def test_sampled_captions_end_once_and_never_hold_special_words():
    torch.manual_seed(0)
    decoder = CaptionDecoder(12, 8, DecoderConfig(embed_dim=8, hidden_dim=8, dropout=0.0)).eval()
    sampled = sample_captions(decoder, torch.randn(200, 8), max_length=6, min_length=2)
    assert sampled.shape[0] == 200 and sampled.shape[1] <= 6
    for row in sampled.tolist():
        ended = row.index(EOS_ID) if EOS_ID in row else len(row)
        assert ended >= 2, row  # min_length words before <eos>
        assert not {PAD_ID, BOS_ID, UNK_ID} & set(row[:ended]), row
        assert set(row[ended + 1:]) <= {PAD_ID}, row
    torch.manual_seed(1)
    first = sample_captions(decoder, torch.ones(3, 8), max_length=6)
    torch.manual_seed(1)
    assert torch.equal(first, sample_captions(decoder, torch.ones(3, 8), max_length=6))


def test_the_reward_scorer_gives_each_caption_coco_captions_cider_d():
    # The reward scores one caption at a time against fixed references; coco-caption's Cider (CIDEr-D) scores
    # the same captions as a corpus. Each caption's score must be the toolkit's score for that image.
    from pycocoevalcap.cider.cider import Cider

    from captioner.text import tokenize

    captions = [  # (a sampled caption, the image's references), as in Flickr8k
        ("a dog is running through the grass", ["A brown dog runs through the tall grass .", "A dog is running .",
                                                "The dog runs across a green field ."]),
        ("a man is riding a bike on a dirt road", ["A man rides his bicycle down a dirt path .",
                                                  "A cyclist on a dirt road .", "A man riding a mountain bike ."]),
        ("two girls are playing in the sand", ["Two little girls play in the sand at the beach .",
                                              "Two children dig in the sand .", "Kids playing on the beach ."]),
        ("a dog a dog", ["A white dog jumps over a log .", "A dog leaps in the woods ."]),
    ]
    references = [[tokenize(r) for r in refs] for _, refs in captions]
    hypotheses = [tokenize(h) for h, _ in captions]
    _, coco = Cider().compute_score({i: [" ".join(r) for r in refs] for i, refs in enumerate(references)},
                                    {i: [" ".join(h)] for i, h in enumerate(hypotheses)})
    scorer = CiderD(references)
    assert [scorer.score(i, h) for i, h in enumerate(hypotheses)] == pytest.approx(list(coco), rel=1e-9)
    assert scorer.score(0, hypotheses[0]) > scorer.score(0, ["dog"]) > 0 == scorer.score(0, ["two", "cats"])
    assert cider_d(references, hypotheses) == pytest.approx(coco.mean(), rel=1e-9)


def test_self_critical_gradient_never_feeds_the_words_sampling_cannot_draw():
    # Pushing down a poor caption's words must not pile probability onto <pad>/<bos>/<unk>: nothing ever
    # pushes those back, and such training collapses (it did, before they were masked in the loss).
    torch.manual_seed(0)
    vocab = Vocabulary([*SPECIALS, "a", "dog", "cat", "runs", "sleeps"])
    decoder = CaptionDecoder(len(vocab), 8, DecoderConfig(embed_dim=8, hidden_dim=8, dropout=0.0))
    references = [[["a", "dog", "runs"]], [["a", "cat", "sleeps"]]]
    loss = SelfCriticalLoss(references, vocab, samples_per_image=4, max_length=5)
    summed, reward = loss(decoder, decoder, torch.randn(2, 8), torch.tensor([0, 1]))
    summed.backward()
    assert torch.isfinite(summed) and 0.0 <= reward
    never = [PAD_ID, BOS_ID, UNK_ID]
    assert decoder.out.bias.grad[never].abs().max() == 0 and decoder.out.weight.grad[never].abs().max() == 0
    assert decoder.out.weight.grad[4:].abs().max() > 0


def test_the_reward_counts_the_end_of_a_caption():
    # Without <eos> among the n-grams, stopping mid-phrase costs nothing and self-critical training learns
    # to write "a dog runs in the"; with it, the finished caption scores higher than the same words cut off.
    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs", "in", "the", "grass", "cat"])
    references = [[["a", "dog", "runs", "in", "the", "grass"], ["a", "dog", "runs"]], [["a", "cat"]]]
    loss = SelfCriticalLoss(references, vocab, samples_per_image=2, max_length=6)
    finished, cut = vocab.encode(["a", "dog", "runs"]) + [EOS_ID], vocab.encode(["a", "dog", "runs"])
    assert loss.score(0, finished) > loss.score(0, cut) > 0
    in_the = vocab.encode(["a", "dog", "runs", "in", "the"]) + [EOS_ID]
    assert loss.score(0, vocab.encode(["a", "dog", "runs", "in", "the", "grass"]) + [EOS_ID]) > loss.score(0, in_the)


def test_a_bleu_weight_adds_sentence_bleu_to_the_reward():
    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs", "in", "the", "grass"])
    references = [[["a", "dog", "runs", "in", "the", "grass"], ["a", "dog", "runs"]]]
    cider_only = SelfCriticalLoss(references, vocab, samples_per_image=2, max_length=6)
    mixed = SelfCriticalLoss(references, vocab, samples_per_image=2, max_length=6, bleu_weight=0.5)
    caption = vocab.encode(["a", "dog", "runs", "in", "grass"]) + [EOS_ID]
    bleu = mixed.bleu.score(0, ["a", "dog", "runs", "in", "grass", EOS])
    assert 0 < bleu < 1
    assert mixed.score(0, caption) == pytest.approx(cider_only.score(0, caption) + 0.5 * bleu)


def test_an_unseen_trigram_penalty_costs_each_word_triple_no_training_caption_has():
    # CIDEr-D pays for "the ball" and "playing in" wherever they are: self-critical training learns "in the ball".
    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs", "in", "the", "grass", "ball"])
    references = [[["a", "dog", "runs", "in", "the", "grass"]], [["a", "ball"]]]
    plain = SelfCriticalLoss(references, vocab, samples_per_image=2, max_length=8)
    fluent = SelfCriticalLoss(references, vocab, samples_per_image=2, max_length=8, unseen_trigram_penalty=0.5)
    seen = vocab.encode(["a", "dog", "runs", "in", "the", "grass"]) + [EOS_ID]
    assert fluent.score(0, seen) == plain.score(0, seen)
    odd = vocab.encode(["a", "dog", "runs", "in", "the", "ball"]) + [EOS_ID]  # "in the ball", "the ball <eos>"
    assert fluent.score(0, odd) == pytest.approx(plain.score(0, odd) - 2 * 0.5)
    assert "unseen trigrams" in fluent.name and "unseen" not in plain.name


def _config_file(path, config) -> str:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def test_self_critical_steps_teach_a_model_to_write_captions_that_score():
    torch.manual_seed(0)
    vocab = Vocabulary([*SPECIALS, "a", "dog", "cat", "runs", "sleeps", "the", "big"])
    references = [[["a", "dog", "runs"], ["the", "dog", "runs"]], [["a", "cat", "sleeps"], ["the", "big", "cat", "sleeps"]]]
    decoder = CaptionDecoder(len(vocab), 4, DecoderConfig(embed_dim=16, hidden_dim=16, dropout=0.0))
    features = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    loss = SelfCriticalLoss(references, vocab, samples_per_image=8, max_length=6)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.02)
    rewards = []
    for _ in range(80):
        summed, reward = loss(decoder, decoder, features, torch.tensor([0, 1]))
        optimizer.zero_grad()
        (summed / 16).backward()
        optimizer.step()
        rewards.append(reward)
    assert sum(rewards[-10:]) > 2 * sum(rewards[:10]), rewards
    written = [vocab.decode(h.tokens) for h in greedy_search(decoder.eval(), features, max_length=6)]
    assert written[0][-2:] == ["dog", "runs"] and written[1][-2:] == ["cat", "sleeps"], written


def test_self_critical_run_starts_from_a_checkpoint_and_logs_the_reward(trained, tiny_flickr8k, tmp_path, capsys):
    config_path, run = trained
    scst = tiny_config(tiny_flickr8k, tmp_path / "scst", tmp_path / "cache", epochs=2, batch_size=4,
                       objective="scst", init_from=str(run / "best.pt"), samples_per_image=3, lr=0.001)
    assert main(["train", "--config", _config_file(tmp_path / "scst.yaml", scst), "--no-progress"]) == 0
    assert f"starting from {run / 'best.pt'}" in capsys.readouterr().err
    history = [json.loads(line) for line in (tmp_path / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["train_reward"] > 0 for h in history)
    assert (tmp_path / "scst" / "curves.png").stat().st_size > 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "scst" / "best.pt"), "--split", "test",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and result["bleu1"] > 0.5


def test_init_from_a_checkpoint_that_does_not_fit_is_refused_by_name(trained, tiny_flickr8k, tmp_path, capsys):
    _, run = trained
    config = tiny_config(tiny_flickr8k, tmp_path / "scst", tmp_path / "cache", objective="scst",
                         init_from=str(run / "best.pt"))
    config.decoder.hidden_dim = 64  # the trained run has 48
    assert main(["train", "--config", _config_file(tmp_path / "bad.yaml", config), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "train.init_from" in error and "does not fit" in error and "hidden_dim" in error
    assert not (tmp_path / "scst" / "last.pt").exists()


def test_self_critical_needs_a_trained_model_to_start_from(tmp_path, capsys):
    config = tmp_path / "scst.yaml"
    config.write_text(yaml.safe_dump({"train": {"objective": "scst"}}))
    assert main(["train", "--config", str(config)]) == 1
    assert "train.init_from" in capsys.readouterr().err
