"""Pick which cells write together, their weights and the beam size on dev; report test for the pick only.

    python bench/tune_cells.py [--checkpoint captioner/models/default.pt] [--data-root DIR] [--step 0.1]
                               [--beam-sizes 1 2 3 5] [--top 5] [--out bench/results] [--name cells-tuning]

The checkpoint holds several photo decoders (`captioner export --add-cell`). Every decode.cells candidate
(each cell alone, each pair and the three together, with weights on a grid of --step) is scored on the dev
split at the checkpoint's beam size, captioned as `captioner caption` captions (routing and tag decoder
included); the --top best are scored again at each of --beam-sizes. The best is the highest dev BLEU-4, ties
broken by CIDEr-D; it is picked only if it beats the best cell alone at the checkpoint's beam by --min-gain
(a mix costs a step per cell), else that cell is. Test is decoded only after the pick: with it, the best
(when not picked), the checkpoint's own settings, and each cell alone at the checkpoint's beam size (the
cells table), so test plays no part in the choice.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

from captioner.data import load_dataset
from captioner.evaluate import describe_and_score, prepare_features, readable
from captioner.inference import DEFAULT_CHECKPOINT, Captioner

METRICS = ("bleu1", "bleu4", "cider_d", "rouge_l")


def candidates(cells: list[str], step: float) -> list[str]:
    """decode.cells values: each cell alone, then every subset of two or more with weights on the grid."""
    found = list(cells)
    units = round(1 / step)
    for size in range(2, len(cells) + 1):
        for subset in itertools.combinations(cells, size):
            for parts in itertools.product(range(1, units), repeat=size):
                if sum(parts) == units:
                    found.append(",".join(f"{cell}:{part / units:g}" for cell, part in zip(subset, parts)))
    return found


def scored(captioner: Captioner, split: tuple, cells: str, beam_size: int) -> dict:
    features, records = split
    decode = replace(captioner.config.decode, cells=cells, beam_size=beam_size)
    scores, _ = describe_and_score(captioner, features, records, decode)
    return {"cells": cells, "beam_size": beam_size, **{k: round(scores[k], 4) for k in METRICS},
            "person_dog_hallucination": scores["person_dog_hallucination"], "from_tags": round(scores["from_tags"], 4)}


def load_on_data(checkpoint: str, data_root: str | None, **options) -> Captioner:
    """The checkpoint's captioner, reading its dataset at `data_root` (None: at its data.root)."""
    settings = [f"data.root={json.dumps(data_root)}"] if data_root else []
    return Captioner.from_checkpoint(checkpoint, settings=settings, **options)


def featured_splits(captioner: Captioner, names: tuple[str, ...]) -> dict[str, tuple]:
    """The model's dataset splits as (features, records), its readable photos only, features from the cache."""
    dataset = load_dataset(captioner.config.data)
    table, _ = prepare_features(captioner.config, dataset, captioner.device, progress=True, encoder=captioner.encoder)
    splits = {}
    for split in names:
        records = readable(dataset.split(split), table)
        splits[split] = (table.lookup([r.path for r in records]), records)
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--data-root", help="where the checkpoint's dataset is, if not at its data.root")
    parser.add_argument("--step", type=float, default=0.1, help="the weights' grid")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--top", type=int, default=5, help="candidates scored again at each beam size")
    parser.add_argument("--min-gain", type=float, default=0.013,
                        help="dev BLEU-4 by which a mix or another beam must beat the best cell alone to be picked "
                             "(default: the spread between two seeds of one setting in bench/results/sweep-gru-scst.md)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="cells-tuning", help="writes NAME.md and NAME.json")
    args = parser.parse_args(argv)

    captioner = load_on_data(args.checkpoint, args.data_root)
    config = captioner.config
    splits = featured_splits(captioner, ("dev", "test"))

    own_beam = config.decode.beam_size
    grid = []
    for cells in candidates(captioner.cells, args.step):
        grid.append(scored(captioner, splits["dev"], cells, own_beam))
        print(json.dumps(grid[-1]), flush=True)
    best_first = sorted(grid, key=lambda row: (-row["bleu4"], -row["cider_d"]))
    for row, beam in itertools.product(best_first[:args.top], args.beam_sizes):
        if beam != own_beam:
            grid.append(scored(captioner, splits["dev"], row["cells"], beam))
            print(json.dumps(grid[-1]), flush=True)
    best = max(grid, key=lambda row: (row["bleu4"], row["cider_d"]))
    alone = max((row for row in grid if "," not in row["cells"] and row["beam_size"] == own_beam),
                key=lambda row: (row["bleu4"], row["cider_d"]))
    pick = best if best["bleu4"] >= alone["bleu4"] + args.min_gain else alone
    test = {"dev pick": scored(captioner, splits["test"], pick["cells"], pick["beam_size"]),
            **({"dev best": scored(captioner, splits["test"], best["cells"], best["beam_size"])} if best != pick else {}),
            "checkpoint's settings": scored(captioner, splits["test"], config.decode.cells or config.decoder.cell,
                                            own_beam),
            **{f"{cell} alone": scored(captioner, splits["test"], cell, own_beam) for cell in captioner.cells}}
    write(args, grid, pick, test)


def write(args, grid: list[dict], pick: dict, test: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out / f"{args.name}.json").write_text(json.dumps({"checkpoint": args.checkpoint, "machine": machine, "dev": grid,
                                                       "pick": pick, "test": test}, indent=1) + "\n")
    header = "| cells | beam | BLEU-1 | BLEU-4 | CIDEr-D | ROUGE-L | person/dog hallucination | from tags |\n" \
             "|---|---|---|---|---|---|---|---|\n"

    def row(name: str, r: dict) -> str:
        hallucination = "n/a" if r["person_dog_hallucination"] is None else f"{r['person_dog_hallucination']:.3f}"
        return f"| {name} | {r['beam_size']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + \
            f" | {hallucination} | {r['from_tags']:.3f} |\n"

    dev_rows = "".join(row(r["cells"], r) for r in sorted(grid, key=lambda r: (-r["bleu4"], -r["cider_d"])))
    test_rows = "".join(row(f"{name}: {r['cells']}", r) for name, r in test.items())
    (out / f"{args.name}.md").write_text(
        f"Cells and beam size for `{args.checkpoint}`, chosen on dev (`python {' '.join(sys.argv)}`), captioned "
        f"as `captioner caption` captions (routing included). Machine: {machine}.\n\n"
        f"Picked: `{pick['cells']}` at beam {pick['beam_size']} (dev BLEU-4 {pick['bleu4']:.4f}). The best on dev is "
        f"picked only if it beats the best cell alone at the checkpoint's beam by {args.min_gain} BLEU-4 "
        f"(`--min-gain`).\n\n"
        f"Test, decoded once per row:\n\n{header}{test_rows}\nDev, best first:\n\n{header}{dev_rows}")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
