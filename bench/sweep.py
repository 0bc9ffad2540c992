"""Train one config several ways and compare the runs on dev: a hyperparameter sweep.

    python bench/sweep.py bench/sweeps/gru-scst.txt --config configs/flickr8k-gru-scst.yaml \
        [--set train.dev_beam_size=3] [--out-root runs/sweep] [--parallel 1] [--results bench/results/sweep]

Each line of the sweep file is a run: a name, then its `section.key=value` overrides
("k10 train.samples_per_image=10 train.epochs=12"; `#` starts a comment). Every run's config is
checked before any training starts. Runs train with `captioner train` into <out-root>/<name>
(a finished run is kept, an interrupted one resumed), --parallel at a time: 1 on a small CPU,
more where a GPU sits idle between one run's small kernels. A run that fails does not stop the
others; its log is <out-root>/<name>.log. Writes <results>.md (dev BLEU-4 per epoch, the best
epoch's BLEU-1 and CIDEr-D) and <results>.png (training loss, or sampled reward, and dev BLEU-4
per epoch). Only dev is read: pick on dev, then score the pick on test with `captioner evaluate`.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.config import ConfigError, load_config
from captioner.files import plot_curves, read_metrics
from captioner.train import run_is_finished


def read_sweep(path: str | Path) -> list[tuple[str, list[str]]]:
    runs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        name, overrides = words[0], words[1:]
        if "=" in name or "/" in name:
            raise ConfigError(f"{path}:{number}: a line starts with the run's name, got {name!r}")
        if any(existing == name for existing, _ in runs):
            raise ConfigError(f"{path}:{number}: run name {name!r} is used twice")
        runs.append((name, overrides))
    if not runs:
        raise ConfigError(f"{path}: no runs (each line: a name, then section.key=value overrides)")
    return runs


def train_command(config: str, out_dir: Path, overrides: list[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "captioner", "train", "--config", config, "--no-progress",
               "--set", f"train.out_dir={out_dir}"]
    for override in overrides:
        command += ["--set", override]
    return command + (["--resume"] if resume else [])


def run_sweep(runs: list[tuple[str, list[str]]], config: str, common: list[str], out_root: Path,
              parallel: int) -> dict[str, int]:
    """Train every run (parallel at a time); returns each run's exit status (0 for one already finished)."""
    pending = []
    for name, overrides in runs:
        run_config = load_config(config, [*common, *overrides])  # a bad value stops the sweep before any training
        run = out_root / name
        if run_is_finished(run, run_config):
            print(f"{name}: finished earlier, kept")
            continue
        pending.append((name, train_command(config, run, [*common, *overrides], (run / "last.pt").is_file())))
    out_root.mkdir(parents=True, exist_ok=True)
    status, active = {name: 0 for name, _ in runs}, {}
    while pending or active:
        while pending and len(active) < parallel:
            name, command = pending.pop(0)
            print(f"{name}: training ({shlex.join(command[2:])})")
            log = open(out_root / f"{name}.log", "w")
            active[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log,
                            time.perf_counter())
        time.sleep(1)
        for name, (process, log, started) in list(active.items()):
            if process.poll() is not None:
                log.close()
                status[name] = process.returncode
                del active[name]
                tail = (out_root / f"{name}.log").read_text(errors="replace").splitlines()[-3:]
                outcome = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                print(f"{name}: {outcome} after {time.perf_counter() - started:.0f}s: " + " / ".join(tail))
    return status


def this_machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def write_report(runs: list[tuple[str, list[str]]], out_root: Path, results: Path, title: str, machine: str) -> str:
    lines = [f"{title}", "", f"Trained on: {machine}.", "",
             "| run | overrides | epochs | dev BLEU-4 per epoch | best (epoch) | its BLEU-1 / CIDEr-D | s/epoch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    histories = {}
    for name, overrides in runs:
        history = histories[name] = read_metrics(out_root / name)
        if not history:
            lines.append(f"| {name} | {' '.join(overrides)} | 0 | no finished epoch: see {out_root / name}.log | | | |")
            continue
        best = max(history, key=lambda h: h["dev_bleu4"])
        curve = " ".join(f"{h['dev_bleu4']:.3f}" for h in history)
        seconds = sum(h["train_seconds"] for h in history) / len(history)
        lines.append(f"| {name} | {' '.join(overrides)} | {len(history)} | {curve} | {best['dev_bleu4']:.4f} "
                     f"({best['epoch']}) | {best['dev_bleu1']:.4f} / {best.get('dev_cider_d', float('nan')):.4f} | "
                     f"{seconds:.0f} |")
    decodes = sorted({h.get("dev_decode", "?") for history in histories.values() for h in history})
    lines += ["", f"Dev decoding: {', '.join(decodes) or 'none'}. BLEU is nltk corpus_bleu in [0, 1]."]
    text = "\n".join(lines) + "\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(text)
    plot_curves(histories, results.with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="file of runs: a name, then section.key=value overrides, per line")
    parser.add_argument("--config", default="configs/flickr8k-gru-scst.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for every run (a run's own line wins)")
    parser.add_argument("--out-root", default=None, help="folder of the runs (default runs/sweep-<sweep file name>)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--results", default=None, help="report path without suffix (default bench/results/sweep-<name>)")
    parser.add_argument("--report-only", action="store_true", help="summarise the runs there, train nothing")
    parser.add_argument("--machine", default=None,
                        help="with --report-only: the machine that trained the runs (default: this one)")
    args = parser.parse_args(argv)
    stem = Path(args.sweep).stem
    out_root = Path(args.out_root or f"runs/sweep-{stem}")
    results = Path(args.results or f"bench/results/sweep-{stem}")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    try:
        runs = read_sweep(args.sweep)
        status = {} if args.report_only else run_sweep(runs, args.config, args.set, out_root, args.parallel)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(write_report(runs, out_root, results, f"Sweep `{args.sweep}` over `{args.config}`"
                       + (f" with {' '.join(args.set)}" if args.set else "") + ".", args.machine or this_machine()))
    failed = [name for name, code in status.items() if code]
    if failed:
        print(f"error: failed runs: {', '.join(failed)} (logs in {out_root})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
