"""Pick beam size, length penalty and repeat blocking on dev; report test for the pick only.

    python bench/tune_decoding.py [--checkpoint captioner/models/default.pt] [--out bench/results]

Every combination is scored on the dev split (cached features, batched search) and ranked by
dev BLEU-4, ties broken by CIDEr-D. Test is decoded twice: with the checkpoint's own decoding
settings and with the dev pick, and with nothing else, so test plays no part in the choice.
Writes decoding.md (the dev grid and the two test rows) and decoding.json (--name changes the names).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import platform
from dataclasses import replace
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from captioner.data import load_dataset
from captioner.evaluate import evaluate_features, prepare_features, readable
from captioner.inference import DEFAULT_CHECKPOINT

METRICS = ("bleu1", "bleu4", "cider_d", "rouge_l")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--data-root", help="override data.root of the checkpoint's config")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--no-repeat", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="decoding", help="writes NAME.md and NAME.json")
    args = parser.parse_args()

    config, vocab, decoder, _ = load_checkpoint(args.checkpoint)
    if args.data_root:
        config.data.root = args.data_root
    dataset = load_dataset(config.data)
    table, _ = prepare_features(config, dataset, "cpu", progress=True)
    splits = {}
    for split in ("dev", "test"):
        records = readable(dataset.split(split), table)
        splits[split] = (table.lookup([r.path for r in records]), records)

    def score(split: str, decode) -> dict:
        features, records = splits[split]
        scores, _ = evaluate_features(decoder, vocab, features, records, decode, "cpu")
        return {k: round(scores[k], 4) for k in METRICS}

    grid = []
    for beam, penalty, blocking in itertools.product(args.beam_sizes, args.length_penalties, args.no_repeat):
        if beam == 1 and penalty != args.length_penalties[0]:
            continue  # the length penalty cannot change a greedy caption
        decode = replace(config.decode, beam_size=beam, length_penalty=penalty, no_repeat_ngram_size=blocking)
        grid.append({"beam_size": beam, "length_penalty": penalty, "no_repeat_ngram_size": blocking,
                     **score("dev", decode)})
        print(json.dumps(grid[-1]), flush=True)
    pick = max(grid, key=lambda row: (row["bleu4"], row["cider_d"]))
    own = config.decode
    picked = replace(own, beam_size=pick["beam_size"], length_penalty=pick["length_penalty"],
                     no_repeat_ngram_size=pick["no_repeat_ngram_size"])
    test = {"checkpoint's settings": {**_settings(own), **score("test", own)},
            "dev pick": {**_settings(picked), **score("test", picked)}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out / f"{args.name}.json").write_text(json.dumps({"checkpoint": args.checkpoint, "machine": machine, "dev": grid,
                                                   "pick": pick, "test": test}, indent=1) + "\n")
    header = "| beam | length penalty | no-repeat n-gram | BLEU-1 | BLEU-4 | CIDEr-D | ROUGE-L |\n|---|---|---|---|---|---|---|\n"
    rows = "".join(f"| {r['beam_size']} | {r['length_penalty']} | {r['no_repeat_ngram_size']} | "
                   + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |\n"
                   for r in sorted(grid, key=lambda r: (-r["bleu4"], -r["cider_d"])))
    test_rows = "".join(f"| {name} | {r['beam_size']} | {r['length_penalty']} | {r['no_repeat_ngram_size']} | "
                        + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |\n" for name, r in test.items())
    (out / f"{args.name}.md").write_text(
        f"Decoding settings for `{args.checkpoint}`, chosen on dev (`python {' '.join(sys.argv)}`).\n\n"
        f"Test, decoded once per row:\n\n| settings | beam | length penalty | no-repeat n-gram | BLEU-1 | BLEU-4 | "
        f"CIDEr-D | ROUGE-L |\n|---|---|---|---|---|---|---|---|\n{test_rows}\nDev grid, best first:\n\n"
        f"{header}{rows}")
    print((out / f"{args.name}.md").read_text())


def _settings(decode) -> dict:
    return {"beam_size": decode.beam_size, "length_penalty": decode.length_penalty,
            "no_repeat_ngram_size": decode.no_repeat_ngram_size}


if __name__ == "__main__":
    main()
