"""bench/sweep.py: several trainings of one config, compared on dev in one table and one plot."""
from __future__ import annotations


import yaml

from conftest import tiny_config

import sweep  # bench/, on pytest's path (pyproject.toml)



def _setup(tiny_flickr8k, tmp_path, lines: str):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_flickr8k, tmp_path / "unused", tmp_path / "cache").to_dict()))
    runs = tmp_path / "runs.txt"
    runs.write_text(lines)
    return ["--config", str(config), "--out-root", str(tmp_path / "sweep"), "--results", str(tmp_path / "report" / "s"),
            str(runs)]


def test_sweep_trains_every_run_reports_dev_curves_and_keeps_finished_runs(tiny_flickr8k, tmp_path, capsys):
    args = _setup(tiny_flickr8k, tmp_path, "# name, then overrides\n"
                                           "lstm train.epochs=2\n"
                                           "gru decoder.cell=gru train.epochs=1  # one epoch\n"
                                           "broken train.init_from=no-such-model.pt\n")
    assert sweep.main(["--parallel", "2", *args]) == 1  # one run failed; the others still trained
    report = (tmp_path / "report" / "s.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.splitlines() if line.startswith("| ")}
    assert rows["lstm"][2] == "2" and len(rows["lstm"][3].split()) == 2
    assert rows["gru"][2] == "1" and rows["gru"][1] == "decoder.cell=gru train.epochs=1"
    assert rows["broken"][2] == "0" and "broken.log" in rows["broken"][3]
    assert "no-such-model.pt" in (tmp_path / "sweep" / "broken.log").read_text()
    assert (tmp_path / "report" / "s.png").stat().st_size > 0
    assert "failed runs: broken" in capsys.readouterr().err

    best = tmp_path / "sweep" / "lstm" / "best.pt"
    stamp = best.stat().st_mtime_ns
    (tmp_path / "runs.txt").write_text("lstm train.epochs=2\ngru decoder.cell=gru train.epochs=1\n")
    assert sweep.main(args) == 0
    assert "lstm: finished earlier, kept" in capsys.readouterr().out
    assert best.stat().st_mtime_ns == stamp


def test_sweep_checks_every_run_before_training_any(tiny_flickr8k, tmp_path, capsys):
    args = _setup(tiny_flickr8k, tmp_path, "fine train.epochs=1\nbad train.lr=-1\n")
    assert sweep.main(args) == 2
    assert "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "fine").exists()

    (tmp_path / "runs.txt").write_text("same train.epochs=1\nsame train.epochs=2\n")
    assert sweep.main(args) == 2
    assert "'same' is used twice" in capsys.readouterr().err


def test_a_run_counts_as_finished_by_the_training_loops_own_stopping_rule(tmp_path):
    from captioner.config import Config
    from captioner.train import run_is_finished

    def config(epochs, patience):
        return Config.from_dict({"train": {"epochs": epochs, "patience": patience}})

    (tmp_path / "best.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"dev_bleu4": {b}}}\n' for b in (0.1, 0.2, 0.2, 0.15)))
    assert run_is_finished(tmp_path, config(4, 0))
    assert not run_is_finished(tmp_path, config(6, 0))
    assert run_is_finished(tmp_path, config(6, 2))  # a tie with the best is no improvement
    assert not run_is_finished(tmp_path, config(6, 3))
    (tmp_path / "best.pt").unlink()
    assert not run_is_finished(tmp_path, config(4, 0))
