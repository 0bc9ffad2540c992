"""Train -> checkpoint -> reload -> caption -> evaluate, through the CLI, on the tiny shapes dataset."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from captioner import Captioner
from captioner.cli import main
from captioner.config import Config
from captioner.files import read_metrics
from captioner.train import RESUMABLE, learning_rate_schedule


def test_training_writes_a_complete_run_folder(trained):
    _, run = trained
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["provenance"]["dev"]["dev_bleu4"] == max(h["dev_bleu4"] for h in history)
    assert "training" not in best and "training" in torch.load(run / "last.pt", weights_only=True)


def test_the_trained_model_captions_what_it_sees(trained, tiny_flickr8k):
    _, run = trained
    captioner = Captioner.from_checkpoint(run / "best.pt")
    paths = [tiny_flickr8k / "images" / f"{c}_square_2.jpg" for c in ("red", "green", "blue", "yellow")]
    captions = captioner.caption(paths, beam_size=3)
    colours = sum(c in caption.text for c, caption in zip(("red", "green", "blue", "yellow"), captions))
    assert colours >= 3, [c.text for c in captions]
    # One path in, one Caption out; that it is the folder command's caption: test_caption_folder.py.
    assert captioner.caption(str(paths[0]), beam_size=3).text == captions[0].text
    n_best = captioner.caption([paths[0]], beam_size=3, n_best=3)[0]
    assert len(n_best) == 3 and n_best[0].score >= n_best[-1].score


def test_training_refuses_to_overwrite_and_resume_continues(trained, tmp_path, capsys):
    # On a copy of the shared run: resumed in place, it would hand the tests after this one a 16-epoch run (and
    # perhaps another best.pt) and those before it the 15-epoch one, so results would depend on the order.
    config_path, _ = trained
    run = shutil.copytree(trained[1], tmp_path / "run")
    in_copy = ["--config", str(config_path), "--set", f"train.out_dir={run}", "--no-progress"]
    assert main(["train", *in_copy]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *in_copy, "--resume", "--set", "train.epochs=16"]) == 0
    history = read_metrics(run)
    assert [row["epoch"] for row in history] == list(range(1, 17))
    assert "resuming" in capsys.readouterr().err
    # The cosine schedule now spans 16 epochs: it ends at 5% of train.lr (0.01) again, not past its old end.
    assert history[14]["lr"] == pytest.approx(0.0005, rel=1e-9) and history[15]["lr"] == pytest.approx(0.0005, rel=1e-9)


def test_resume_refuses_settings_that_differ_from_the_runs_and_names_them(trained, capsys):
    config_path, run = trained
    before = (run / "last.pt").read_bytes(), (run / "config.yaml").read_text()
    assert main(["train", "--config", str(config_path), "--resume", "--set", "train.lr=0.5",
                 "--set", "decoder.hidden_dim=64", "--set", "train.patience=2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "train.lr: the run's 0.01, here 0.5" in err and "decoder.hidden_dim: the run's 48, here 64" in err
    assert "train.patience: the run's" not in err  # a setting --resume applies is no difference
    assert all(key in err for key in RESUMABLE) and str(run / "config.yaml") in err
    assert ((run / "last.pt").read_bytes(), (run / "config.yaml").read_text()) == before


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0), ("cosine", 1), ("cosine", 7), ("cosine", 40),
                                              ("constant", 0), ("constant", 5)])
def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_five_percent(schedule, warmup):
    total, lr = 30, 0.01
    config = Config.from_dict({"train": {"lr": lr, "warmup_steps": warmup, "lr_schedule": schedule}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = learning_rate_schedule(optimizer, config, total)
    for step in range(total + 1):  # the rate of each optimizer step, and after the last
        if step < warmup:
            factor = (step + 1) / warmup
        elif schedule == "constant":
            factor = 1.0
        else:
            factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * factor, rel=1e-12), step
        optimizer.step()
        scheduler.step()


def test_evaluate_prints_bleu_and_writes_captions(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "test_captions.jsonl"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--split", "test", "--beam-size", "3",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["images"] == 4 and result["beam_size"] == 3 and 0 < result["bleu1"] <= 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["references"]) == 5 and r["caption"] for r in rows)


def test_caption_command_on_a_folder_with_a_bad_file(trained, tiny_flickr8k, tmp_path, capsys):
    _, run = trained
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name in ("red_circle_2.jpg", "blue_square_2.jpg"):
        (folder / "nested" / name).write_bytes((tiny_flickr8k / "images" / name).read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "captions.jsonl"
    status = main(["caption", str(folder), "--checkpoint", str(run / "best.pt"), "--out", str(out),
                   "--beam-size", "2", "--no-progress"])
    assert status == 3  # some images failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["broken.jpg", "blue_square_2.jpg", "red_circle_2.jpg"]
    assert "not an image" in rows[0]["error"] and "caption" not in rows[0]
    assert all(r["caption"] and isinstance(r["score"], float) for r in rows[1:])
    assert "captioned 2, failed 1" in capsys.readouterr().err

    assert main(["caption", str(folder / "nested"), "--checkpoint", str(run / "best.pt"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("\t" in line for line in lines)


def test_caption_command_errors_are_one_clear_line(trained, tmp_path, capsys):
    _, run = trained
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tmp_path / "empty"), "--checkpoint", str(run / "best.pt")]) == 1
    assert "no images found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["caption", str(tmp_path), "--checkpoint", str(tmp_path / "junk.pt")]) == 1
    err = capsys.readouterr().err
    assert "junk.pt" in err and "Traceback" not in err


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_every_cell_trains_from_the_same_config(trained, tmp_path, cell):
    config_path, _ = trained
    assert main(["train", "--config", str(config_path), "--set", f"decoder.cell={cell}", "--set", "train.epochs=1",
                 "--set", f"train.out_dir={tmp_path / cell}", "--no-progress"]) == 0
    captioner = Captioner.from_checkpoint(tmp_path / cell / "best.pt")
    assert captioner.config.decoder.cell == cell
    assert captioner.decoder.rnn.__class__.__name__ == cell.upper()


def test_exported_fp16_checkpoint_is_smaller_and_captions_alike(trained, tiny_flickr8k, tmp_path, capsys):
    _, run = trained
    shipped = tmp_path / "shipped.pt"
    assert main(["export", str(run / "best.pt"), str(shipped)]) == 0
    assert shipped.stat().st_size < (run / "best.pt").stat().st_size
    assert "training" not in torch.load(shipped, weights_only=True)
    paths = sorted((tiny_flickr8k / "images").glob("*_2.jpg"))
    full = [c.text for c in Captioner.from_checkpoint(run / "best.pt").caption(paths, beam_size=3)]
    half = [c.text for c in Captioner.from_checkpoint(shipped).caption(paths, beam_size=3)]
    assert sum(a == b for a, b in zip(full, half)) >= len(paths) - 1


def test_export_can_store_decoding_defaults_chosen_on_dev_but_not_reshape_the_model(trained, tmp_path, capsys):
    _, run = trained
    shipped = tmp_path / "tuned.pt"
    assert main(["export", str(run / "best.pt"), str(shipped), "--set", "decode.beam_size=5",
                 "--set", "decode.length_penalty=0.5"]) == 0
    captioner = Captioner.from_checkpoint(shipped)
    assert (captioner.config.decode.beam_size, captioner.config.decode.length_penalty) == (5, 0.5)
    assert torch.load(shipped, weights_only=True)["provenance"]["settings"] == [
        "decode.beam_size=5", "decode.length_penalty=0.5"]
    assert main(["export", str(run / "best.pt"), str(tmp_path / "bad.pt"), "--set", "decoder.hidden_dim=8"]) == 1
    assert "decoder.hidden_dim describes the trained model" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()
