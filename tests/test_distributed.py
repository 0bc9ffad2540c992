"""torchrun with 2 CPU processes (gloo) trains the same model as 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from captioner.checkpoint import read_checkpoint
from captioner.train import train

from conftest import REPO, tiny_config


def torchrun(config_path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    # The rendezvous store listens on a port it binds itself (port 0) and hands to the workers: no port is
    # chosen here that another process could take before torchrun binds it (--master_port free_port() did).
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
               "-m", "captioner", "train", "--config", str(config_path), "--no-progress", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=REPO)


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_flickr8k, tmp_path_factory):
    """One process for 2 epochs, and 2 torchrun processes for 1 epoch then --resume to 2.

    Dropout is off so the two runs draw no random numbers that depend on the process count;
    the encoder sees one image at a time so each image's features do not depend on which
    others share its batch; the learning rate is constant so that changing epochs on --resume
    keeps the schedule. Batch 7 gives the ranks unequal shares and the last global batch a
    single caption.
    """
    work = tmp_path_factory.mktemp("ddp")
    common = dict(epochs=2, batch_size=7, lr=0.01, lr_schedule="constant")
    single = tiny_config(tiny_flickr8k, work / "single", work / "cache", **common)
    single.decoder.dropout, single.encoder.batch_size = 0.0, 1
    torch.manual_seed(0)
    train(single, progress=False)

    ddp = tiny_config(tiny_flickr8k, work / "ddp", work / "cache", **common)
    ddp.decoder.dropout, ddp.encoder.batch_size = 0.0, 1
    config_path = work / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(ddp.to_dict()))
    first = torchrun(config_path, "--set", "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(config_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return work / "single", work / "ddp", first.stderr + resumed.stderr


def test_two_processes_reach_the_same_parameters_as_one(runs):
    single_dir, ddp_dir, _ = runs
    single, ddp = read_checkpoint(single_dir / "last.pt"), read_checkpoint(ddp_dir / "last.pt")
    assert single["vocab"] == ddp["vocab"]
    assert single["decoder"].keys() == ddp["decoder"].keys()
    # Adam turns float rounding in the all-reduce into differences of about 1e-4 here; averaging
    # per-rank mean losses in place of the global batch's loss gives differences near 0.1.
    for name, weight in single["decoder"].items():
        torch.testing.assert_close(ddp["decoder"][name], weight, rtol=0, atol=2e-3, msg=name)
    assert ddp["training"]["world_size"] == 2 and ddp["provenance"]["processes"] == 2


def test_training_log_and_dev_scores_match_and_only_rank_zero_writes(runs):
    single_dir, ddp_dir, log = runs
    single_history, ddp_history = history(single_dir), history(ddp_dir)
    assert [h["epoch"] for h in ddp_history] == [1, 2]  # one row per epoch: no rank wrote twice
    for one, two in zip(single_history, ddp_history):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert two["dev_bleu4"] == pytest.approx(one["dev_bleu4"], abs=1e-6)
    assert log.count("epoch 1: loss") == 1 and log.count("epoch 2: loss") == 1  # printed by rank 0 only
    assert "2 processes" in log and "resuming" in log
    assert sorted(p.name for p in ddp_dir.iterdir() if not p.name.startswith(".")) == \
        ["best.pt", "config.yaml", "curves.png", "last.pt", "metrics.jsonl"]


def test_more_processes_than_gpus_is_refused_with_a_reason(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: the second process says why, not CUDA's 'invalid device'."""
    from captioner.config import ConfigError
    from captioner.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="started process 1 on this machine, which has 1 CUDA GPU"):
        setup("cuda")
