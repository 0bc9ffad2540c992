"""Killed runs lose nothing: training resumes, captioning finishes with one row per image, writes are atomic."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import captioner.features as features
from captioner.caption import RowWriter
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from conftest import tiny_config


def kill_when(command: list[str], condition, timeout: float = 240) -> None:
    """Run `command`, SIGKILL it as soon as `condition()` holds; fail if it ends or times out first."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"process ended early with {process.returncode}: {process.stderr.read()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("timed out waiting")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_training_killed_mid_run_resumes_from_the_last_checkpoint(tiny_flickr8k, trained, tmp_path):
    config = tiny_config(tiny_flickr8k, tmp_path / "run", trained[0].parent / "cache", epochs=40, batch_size=4)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    metrics = tmp_path / "run" / "metrics.jsonl"
    command = [sys.executable, "-m", "captioner", "train", "--config", str(config_path), "--no-progress"]
    kill_when(command, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)
    killed_after = len(metrics.read_text().splitlines())
    assert killed_after < 40
    load_checkpoint(tmp_path / "run" / "last.pt")  # whole, never half-written
    assert not list((tmp_path / "run").glob(".*.tmp"))

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, 41))


def test_caption_run_killed_and_rerun_gives_each_image_exactly_one_row(trained, tiny_flickr8k, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(sorted((tiny_flickr8k / "images").glob("*.jpg")) * 2):
        shutil.copy(image, folder / f"{i:02d}_{image.name}")
    (folder / "zz_broken.jpg").write_text("broken")
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "captioner", "caption", str(folder), "--checkpoint", str(trained[1] / "best.pt"),
               "--out", str(out), "--batch-size", "1", "--workers", "0", "--no-progress"]
    kill_when(command, lambda: out.is_file() and len(out.read_text().splitlines()) >= 5)
    done_before = len(out.read_text().splitlines())
    assert done_before < 49

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 3, rerun.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 49
    assert sum("error" in r for r in rows) == 1


def test_checkpoint_write_that_fails_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    features.atomic_save({"version": 1}, target)

    def crash(obj, path):
        Path(path).write_bytes(b"half a checkp")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        features.atomic_save({"version": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"version": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_full_disk_while_writing_captions_is_an_error_not_a_short_file(trained, tiny_flickr8k, tmp_path, monkeypatch,
                                                                       capsys):
    written = []
    real_write = RowWriter._write

    def fill_up(self, row):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(row)
        real_write(self, row)

    monkeypatch.setattr(RowWriter, "_write", fill_up)
    out = tmp_path / "captions.jsonl"
    status = main(["caption", str(tiny_flickr8k / "images"), "--checkpoint", str(trained[1] / "best.pt"),
                   "--out", str(out), "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert "could not write to" in err and "No space left on device" in err
    assert len(out.read_text().splitlines()) == 2
