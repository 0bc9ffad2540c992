"""RNN vs LSTM vs GRU: the same config, data, cached features and budget; only decoder.cell changes.

    python bench/compare_cells.py [--config configs/flickr8k.yaml] [--cells lstm gru rnn] [--out bench/results]

Each cell trains into runs/<name>-<cell> (a finished run there is reused, an interrupted one is
resumed), then its best checkpoint is scored on dev and test at beam 1 and 3. Writes cells.md
(a table: parameters, training seconds per epoch, captions per second, BLEU, CIDEr-D) and cells.png
(training loss and dev BLEU-4 per epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from captioner.config import load_config
from captioner.data import load_dataset
from captioner.evaluate import evaluate_features, prepare_features, readable
from captioner.files import plot_curves, read_metrics
from captioner.describe import decode_features
from captioner.train import run_is_finished, train


def run_cell(config_path: str, cell: str, overrides: list[str]) -> Path:
    base = load_config(config_path, overrides)
    out_dir = f"{base.train.out_dir.rsplit('-', 1)[0]}-{cell}"
    config = load_config(config_path, [*overrides, f"decoder.cell={cell}", f"train.out_dir={out_dir}"])
    run = Path(out_dir)
    if not run_is_finished(run, config):
        train(config, resume=(run / "last.pt").is_file())
    return run


def score(run: Path, dataset, table) -> tuple[dict, list[dict]]:
    config, vocab, decoder, payload = load_checkpoint(run / "best.pt")
    row = {"cell": config.decoder.cell, "parameters": sum(p.numel() for p in decoder.parameters())}
    history = read_metrics(run)
    row["epochs"] = len(history)
    row["best_epoch"] = payload["provenance"]["epoch"]
    row["train_s_per_epoch"] = statistics.median(h["train_seconds"] for h in history)
    for split in ("dev", "test"):
        records = readable(dataset.split(split), table)
        features = table.lookup([r.path for r in records])
        for beam in (1, 3):
            decode = replace(config.decode, beam_size=beam)
            scores, _ = evaluate_features(decoder, vocab, features, records, decode, "cpu")
            row.update({f"{split}_beam{beam}_{k}": v for k, v in scores.items()})
            if split == "test":  # decoding alone, without scoring
                started = time.perf_counter()
                for start in range(0, len(features), 256):
                    decode_features(decoder, vocab, features[start:start + 256], decode)
                row[f"captions_per_s_beam{beam}"] = len(records) / (time.perf_counter() - started)
    return row, history


def write_report(rows: list[dict], histories: dict, out: Path, config_path: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Flickr8k, `{config_path}`, one run per cell; BLEU is nltk corpus_bleu in [0, 1]; "
             f"captions/s decode cached test features (decoder and search only).",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.", "",
             "| cell | parameters | s/epoch | epochs (best) | captions/s beam 1 / 3 | dev BLEU-4 beam 1 / 3 | "
             "test BLEU-1 beam 3 | test BLEU-4 beam 1 / 3 | test CIDEr-D beam 3 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['parameters'] / 1e6:.2f} M | {r['train_s_per_epoch']:.0f} | "
                     f"{r['epochs']} ({r['best_epoch']}) | {r['captions_per_s_beam1']:.0f} / {r['captions_per_s_beam3']:.0f} | "
                     f"{r['dev_beam1_bleu4']:.3f} / {r['dev_beam3_bleu4']:.3f} | {r['test_beam3_bleu1']:.3f} | "
                     f"{r['test_beam1_bleu4']:.3f} / {r['test_beam3_bleu4']:.3f} | {r['test_beam3_cider_d']:.3f} |")
    (out / "cells.md").write_text("\n".join(lines) + "\n")
    (out / "cells.json").write_text(json.dumps(rows, indent=1))
    plot_curves({cell.upper(): history for cell, history in histories.items()}, out / "cells.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/flickr8k.yaml")
    parser.add_argument("--cells", nargs="+", default=["rnn", "lstm", "gru"], choices=["rnn", "lstm", "gru"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    runs = {cell: run_cell(args.config, cell, args.set) for cell in args.cells}
    config = load_config(args.config, args.set)
    dataset = load_dataset(config.data)
    table, _ = prepare_features(config, dataset, "cpu", progress=False)  # the same cached features for every cell
    rows, histories = [], {}
    for cell, run in runs.items():
        row, history = score(run, dataset, table)
        rows.append(row)
        histories[cell] = history
    write_report(rows, histories, Path(args.out), args.config)


if __name__ == "__main__":
    main()
