"""Killed runs lose nothing: training resumes, captioning finishes with one row per image, writes are atomic."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from captioner.caption import RowWriter
from captioner.checkpoint import load_checkpoint, read_checkpoint
from captioner.cli import main
from captioner.distributed import SINGLE
from captioner.files import atomic_save, read_metrics
from captioner.train import random_states, restore_random_states
from conftest import tiny_config


# `python -c STOPPING captioner.MODULE:NAME N ARGS...` runs `captioner ARGS...` with NAME (a function, or
# Class.method) of captioner.MODULE wrapped: its first N calls run, and the next prints STOPPED and waits, for the
# test to SIGKILL the process there. (Killed when a poll of its output files happened to see enough done, the run
# was stopped wherever it had got to by then: on a busy machine, midway through writing a file, whose temporary
# was left behind, or not at all, having finished first.)
STOPPED = "stopped, waiting to be killed"
STOPPING = f"""
import importlib, sys, threading
from captioner.cli import main
module, _, name = sys.argv[1].partition(":")
owner, (*path, name) = importlib.import_module(module), name.split(".")
for part in path:
    owner = getattr(owner, part)
function, limit, calls = getattr(owner, name), int(sys.argv[2]), []

def stopping(*args, **kwargs):
    if len(calls) == limit:
        print({STOPPED!r}, flush=True)
        threading.Event().wait()
    calls.append(None)
    return function(*args, **kwargs)

setattr(owner, name, stopping)
sys.exit(main(sys.argv[3:]))
"""


def kill_at_call(function: str, calls: int, args: list[str], log: Path, hang_guard_s: float = 600) -> None:
    """Run `captioner ARGS` and SIGKILL it as it makes call number calls + 1 of `function`
    ("captioner.module:name"); fail if the run ends first. Its stderr goes to `log`."""
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", STOPPING, function, str(calls), *args],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    hang_guard = threading.Timer(hang_guard_s, process.kill)  # for a hung run only: nothing here waits on time
    hang_guard.start()
    try:
        stopped = any(line.strip() == STOPPED for line in process.stdout)  # reads until that line or the end
    finally:
        hang_guard.cancel()
        process.kill()
        process.wait()
        process.stdout.close()
    if not stopped:
        pytest.fail(f"the run ended ({process.returncode}) before it was stopped: {log.read_text()[-2000:]}")


def test_training_killed_mid_run_and_resumed_ends_as_an_uninterrupted_run(tiny_flickr8k, trained, tmp_path):
    def command(name: str) -> list[str]:
        # dropout on and a warmup-then-cosine schedule: resuming must restore the random state and the schedule
        config = tiny_config(tiny_flickr8k, tmp_path / name, trained[0].parent / "cache", epochs=8, batch_size=8,
                             threads=1)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config.to_dict()))
        return [sys.executable, "-m", "captioner", "train", "--config", str(tmp_path / f"{name}.yaml"), "--no-progress"]

    with open(tmp_path / "whole.log", "w") as whole_log:  # the uninterrupted run trains meanwhile
        whole = subprocess.Popen(command("whole"), stdout=subprocess.DEVNULL, stderr=whole_log)
        killed = tmp_path / "killed"
        # Killed in its third epoch, trained but not yet evaluated on dev or saved: that epoch's work is lost.
        kill_at_call("captioner.train:evaluate_features", 2, command("killed")[3:], tmp_path / "killed.log")
        assert [row["epoch"] for row in read_metrics(killed)] == [1, 2]
        assert load_checkpoint(killed / "last.pt")[3]["training"]["epoch"] == 2  # whole, never half-written
        assert not list(killed.glob(".*.tmp"))

        resumed = subprocess.run([*command("killed"), "--resume"], capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming" in resumed.stderr
        assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-2000:]

    def without_timing(run):
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in read_metrics(run)]

    assert [row["epoch"] for row in read_metrics(killed)] == list(range(1, 9))
    assert without_timing(killed) == without_timing(tmp_path / "whole")
    for name in ("best.pt", "last.pt"):
        one, other = read_checkpoint(tmp_path / "whole" / name), read_checkpoint(killed / name)
        assert one["decoder"].keys() == other["decoder"].keys()
        for key, weight in one["decoder"].items():
            assert torch.equal(other["decoder"][key], weight), (name, key)
    moments = read_checkpoint(killed / "last.pt")["training"]["optimizer"]["state"]
    for index, state in read_checkpoint(tmp_path / "whole" / "last.pt")["training"]["optimizer"]["state"].items():
        assert torch.equal(moments[index]["exp_avg_sq"], state["exp_avg_sq"]), index


def test_a_run_on_a_cold_feature_cache_trains_the_same_model_as_on_a_warm_one(tiny_flickr8k, tmp_path):
    """Same seed, same model, whether the features were extracted (drawing DataLoader seeds) or read from the cache."""
    cache = tmp_path / "cache"
    for name in ("cold", "warm"):  # the second run finds the first's features in the cache
        config = tiny_config(tiny_flickr8k, tmp_path / name, cache, epochs=1, batch_size=8, threads=1)
        config.encoder.num_workers = 1  # extraction through a worker process: the draws a cold cache makes
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config.to_dict()))
        assert main(["train", "--config", str(tmp_path / f"{name}.yaml"), "--no-progress"]) == 0
    cold, warm = read_checkpoint(tmp_path / "cold" / "best.pt"), read_checkpoint(tmp_path / "warm" / "best.pt")
    for key, weight in cold["decoder"].items():
        assert torch.equal(warm["decoder"][key], weight), key


def test_the_gpu_random_state_is_saved_and_restored_with_the_cpu_one(monkeypatch):
    """Without a GPU: torch.cuda's two state functions are stood in for by one fake generator state."""
    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: gpu.update(state=state))
    cuda = torch.device("cuda", 0)
    saved = random_states(SINGLE, cuda)
    expected = torch.rand(4)
    gpu["state"] = torch.tensor([7], dtype=torch.uint8)
    restore_random_states(saved, SINGLE, cuda)
    assert torch.equal(gpu["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(torch.rand(4), expected)
    assert "cuda_rng_per_rank" not in random_states(SINGLE, torch.device("cpu"))


def test_caption_run_killed_and_rerun_gives_each_image_exactly_one_row(trained, tiny_flickr8k, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(sorted((tiny_flickr8k / "images").glob("*.jpg")) * 2):
        shutil.copy(image, folder / f"{i:02d}_{image.name}")
    (folder / "zz_broken.jpg").write_text("broken")
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "captioner", "caption", str(folder), "--checkpoint", str(trained[1] / "best.pt"),
               "--out", str(out), "--batch-size", "1", "--workers", "0", "--no-progress"]
    kill_at_call("captioner.caption:RowWriter._write", 5, command[3:], tmp_path / "killed.log")  # at the 6th row
    assert len(out.read_text().splitlines()) == 5

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 3, rerun.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 49
    assert sum("error" in r for r in rows) == 1


def test_checkpoint_write_that_fails_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_save({"version": 1}, target)

    def crash(obj, path):
        Path(path).write_bytes(b"half a checkp")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_save({"version": 2}, target)
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
