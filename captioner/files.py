"""Files written whole or not at all, and a training run's log: metrics.jsonl and curves.png.

Everything a run or a feature cache leaves is written to a temporary file beside its target,
flushed to disk and renamed over it, so a killed process leaves the old file or the new one,
never half of one. Training writes metrics.jsonl and curves.png; the benches read and draw
runs with the same two functions.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

METRICS = "metrics.jsonl"


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(temporary) on a temporary file in path's folder, then rename it to path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save, whole or not at all."""
    write_atomic(path, lambda temporary: torch.save(obj, temporary))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_metrics(run_dir: str | Path, history: list[dict]) -> None:
    """A run's metrics.jsonl: one JSON row per finished epoch."""
    write_text_atomic(Path(run_dir) / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; [] before its first epoch has finished."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(runs: dict[str, list[dict]], path: str | Path, reward_name: str = "reward") -> None:
    """Training loss and dev BLEU-4 per epoch, a line per run (the name is its legend; one unnamed run
    has none). Self-critical runs plot the reward of their sampled captions in place of the loss,
    which is a policy gradient there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: history for name, history in runs.items() if history}
    self_critical = bool(runs) and all("train_reward" in history[-1] for history in runs.values())
    decodes = sorted({row["dev_decode"] for history in runs.values() for row in history if "dev_decode" in row})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.cm.tab20.colors  # the dark shades first: ten runs before a colour repeats
    for index, (name, history) in enumerate(runs.items()):
        color = colors[(2 * index) % 20 + (2 * index) // 20 % 2]
        epochs = [row["epoch"] for row in history]
        left.plot(epochs, [row["train_reward" if self_critical else "train_loss"] for row in history], marker=".",
                  color=color, label=name or None)
        scored = [row for row in history if "dev_bleu4" in row]  # a run without a dev set has no dev curve
        right.plot([row["epoch"] for row in scored], [row["dev_bleu4"] for row in scored], marker=".", color=color,
                   label=name or None)
    if self_critical:
        left.set(title="reward of sampled captions", xlabel="epoch", ylabel=reward_name)
    else:
        left.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    right.set(title="dev BLEU-4" + (f" ({', '.join(decodes)})" if decodes else ""), xlabel="epoch",
              ylabel="BLEU-4 (nltk corpus_bleu)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    if any(runs):
        right.legend(fontsize=8)
    figure.tight_layout()
    write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


def write_results(out_dir: str | Path, name: str, result: dict, report: str) -> None:
    """A bench's results: NAME.json (the numbers) and NAME.md (the report people read), side by side."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / f"{name}.md", report)
