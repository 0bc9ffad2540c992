"""Why the plain RNN captions worse: how far back each trained decoder remembers, on Flickr8k dev.

    python bench/cell_memory.py [--runs runs/flickr8k-rnn runs/flickr8k-lstm runs/flickr8k-gru | --model CKPT] \
        [--length 15] [--set data.root=...] [--out bench/results] [--name cell-memory] [--note TEXT]

Reads each run's best.pt (the runs bench/compare_cells.py trains), or with --model every cell a model file
holds (the shipped one: captioner/models/default.pt), and, on the dev captions of
--length words under teacher forcing, measures (bench/memory.py):
- gradient flow through time: the norm of the gradient of the last word's loss with respect to
  the recurrent state 0, 1, ... steps earlier (for the LSTM, h and c together), averaged over
  captions, relative to 0 steps back;
- how long the photo is remembered: at each word, the KL divergence between the next-word
  distributions with the photo's initial state and with another dev photo's (same words fed in);
- quality by position: teacher-forced word accuracy at each word position, over all dev captions.
Writes <name>.png (the three panels), <name>.json (every number) and <name>.md (a summary table).
`--set` overrides apply to every run's saved config (e.g. data.root, if the data moved).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from captioner.checkpoint import load_cells, load_checkpoint
from captioner.config import Config, with_settings
from captioner.data import load_dataset
from captioner.evaluate import prepare_features, readable
from captioner.files import read_metrics, write_results
from captioner.train import caption_tensor

import memory  # bench/memory.py: beside this script (tests put bench/ on the path, pyproject.toml)


def dev_features(config: Config, fingerprint: str, cache: dict) -> tuple[list, torch.Tensor]:
    """Dev records and their features; read once per data and encoder, shared by the runs."""
    key = json.dumps([config.to_dict()["data"], config.to_dict()["encoder"], config.train.cache_dir])
    if key not in cache:
        dataset = load_dataset(config.data)
        table, info = prepare_features(config, dataset, "cpu", progress=False)
        if info["fingerprint"] != fingerprint:
            raise SystemExit(f"the encoder's weights ({info['fingerprint']}) are not those the run was trained on "
                             f"({fingerprint})")
        records = readable(dataset.split("dev"), table)
        cache[key] = records, table.lookup([r.path for r in records]).float()
    return cache[key]


def run_decoders(run: Path) -> list[tuple]:
    """(name, config, vocab, decoder, encoder fingerprint, provenance, epochs trained) of a run's best.pt."""
    config, vocab, decoder, payload = load_checkpoint(run / "best.pt")
    return [(str(run), config, vocab, decoder, payload["encoder"]["fingerprint"], payload["provenance"],
             len(read_metrics(run)))]


def model_decoders(model: Path) -> list[tuple]:
    """The same for every cell a model file holds (its provenance says how it was trained; its config, how long)."""
    config, vocab, decoder, payload = load_checkpoint(model)
    found = []
    for cell, cell_decoder in load_cells(payload, model, config, decoder).items():
        entry = payload if cell == config.decoder.cell else payload["cells"][cell]
        cell_config = config if cell == config.decoder.cell else Config.from_dict(entry["config"])
        provenance = entry.get("provenance", {})
        found.append((f"{model.name} ({cell})", cell_config, vocab, cell_decoder, payload["encoder"]["fingerprint"],
                      provenance, cell_config.train.epochs))
    return found


def measure(found: tuple, overrides: list[str], length: int, positions: int, seed: int, cache: dict) -> dict:
    name, config, vocab, decoder, fingerprint, provenance, epochs = found
    config = with_settings(config, overrides, name)
    records, features = dev_features(config, fingerprint, cache)
    tokens, images = caption_tensor(records, vocab, config.data.max_caption_length)
    words = (tokens != vocab.pad).sum(1) - 2
    chosen = (words == length).nonzero().squeeze(1)
    if not len(chosen):
        raise SystemExit(f"no dev caption has {length} words: pick another --length")
    fixed = tokens[chosen, : length + 1]  # <bos> w1 .. wL: the last word is the last target
    own = images[chosen]
    # another photo for each caption, never its own: the same draw for every run of the same data
    other = (own + torch.randint(1, len(records), own.shape, generator=torch.Generator().manual_seed(seed))) % len(records)
    gradient = memory.gradient_through_time(decoder, features[own], fixed)
    kl = memory.image_influence(decoder, features[own], features[other], fixed)
    accuracy, count = memory.accuracy_by_position(decoder, features[images], tokens[:, : positions + 1], vocab.pad,
                                                  vocab.eos)
    state = gradient["state"].flip(0)  # index = steps back from the last word
    return {
        "run": name, "cell": config.decoder.cell, "epochs": epochs,
        "best_epoch": provenance["epoch"], "dev_bleu4": provenance["dev"]["dev_bleu4"],
        "captions": len(chosen),
        "gradient_norm_by_steps_back": state.tolist(),
        "gradient_relative_by_steps_back": (state / state[0]).tolist(),
        **({"gradient_h_only_relative_by_steps_back": (gradient["h"].flip(0) / state[0]).tolist()} if "h" in gradient else {}),
        "gradient_factor_per_step": float((state[-1] / state[0]) ** (1 / (len(state) - 1))),
        "kl_by_word": kl.tolist(),
        "accuracy_by_position": accuracy.tolist(), "words_by_position": count.tolist(),
    }


def plot(results: list[dict], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (grad_axis, kl_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in results:
        label = f"{r['cell'].upper()} ({r['epochs']} ep)"
        line, = grad_axis.plot(r["gradient_relative_by_steps_back"], marker="o", markersize=3, label=label)
        if "gradient_h_only_relative_by_steps_back" in r:
            grad_axis.plot(r["gradient_h_only_relative_by_steps_back"], linestyle=":", color=line.get_color(),
                           label=f"{r['cell'].upper()}, h only")
        kl_axis.plot(range(1, length + 1), r["kl_by_word"], marker="o", markersize=3, label=label)
        positions = [i + 1 for i, n in enumerate(r["words_by_position"]) if n >= 100]
        accuracy_axis.plot(positions, [r["accuracy_by_position"][i - 1] for i in positions], marker="o", markersize=3,
                           label=label)
    grad_axis.set(yscale="log", xlabel=f"steps back from the last word ({length - 1}: the photo's initial state)",
                  ylabel="|d loss(last word) / d state|, relative",
                  title=f"gradient flow through time ({length}-word captions)")
    kl_axis.set(yscale="log", xlabel="word position", ylabel="KL(own photo || other photo), nats",
                title="how much the photo still matters")
    accuracy_axis.set(xlabel="word position (>= 100 dev captions)", ylabel="next-word accuracy (teacher forced)",
                      title="quality by position, all dev captions")
    for axis in (grad_axis, kl_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(results: list[dict], length: int, command: str, note: str = "") -> str:
    mid = length // 2
    epochs = sorted({r["epochs"] for r in results})
    lines = [f"Flickr8k dev, teacher forced: {results[0]['captions']} captions of {length} words for the gradient and "
             f"KL columns, all dev captions for accuracy; the runs trained {' / '.join(map(str, epochs))} epochs. "
             f"`{command}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
             *([note] if note else []), "",
             f"| cell | run | epochs (best) | dev BLEU-4 (at selection) | gradient x per step back | gradient {length - 1} steps "
             f"back / 0 | KL word 1 / {mid} / {length} | accuracy words 1-5 / 6-10 / 11-15 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        kl, accuracy = r["kl_by_word"], r["accuracy_by_position"]
        buckets = [sum(a * n for a, n in zip(accuracy[s:s + 5], r["words_by_position"][s:s + 5]))
                   / max(1, sum(r["words_by_position"][s:s + 5])) for s in (0, 5, 10)]
        lines.append(f"| {r['cell']} | {r['run']} | {r['epochs']} ({r['best_epoch']}) | {r['dev_bleu4']:.3f} | "
                     f"{r['gradient_factor_per_step']:.3f} | {r['gradient_relative_by_steps_back'][-1]:.2e} | "
                     f"{kl[0]:.3f} / {kl[mid - 1]:.3f} / {kl[length - 1]:.3f} | "
                     f"{buckets[0]:.3f} / {buckets[1]:.3f} / {buckets[2]:.3f} |")
    lines += ["", "Gradient: the norm of the gradient of the last word's cross-entropy with respect to the recurrent "
              "state (LSTM: h and c together), mean over the captions; x per step back is the geometric mean factor. "
              "KL: next-word distributions with the photo's initial state against another dev photo's, same words fed in."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path,
                        default=[Path(f"runs/flickr8k-{cell}") for cell in ("rnn", "lstm", "gru")])
    parser.add_argument("--model", type=Path, help="measure the cells of this model file instead of --runs")
    parser.add_argument("--length", type=int, default=15, help="caption length (words) for gradient and KL")
    parser.add_argument("--positions", type=int, default=20, help="word positions for accuracy")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="picks the other photo for each caption")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="cell-memory")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how the runs were trained")
    args = parser.parse_args(argv)
    cache: dict = {}
    found = model_decoders(args.model) if args.model else [d for run in args.runs for d in run_decoders(run)]
    results = [measure(d, args.set, args.length, args.positions, args.seed, cache) for d in found]
    command = shlex.join(["python", "bench/cell_memory.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.length, args.out / f"{args.name}.png")
    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": str(torch.__version__), "length": args.length, "seed": args.seed, "note": args.note}
    text = report(results, args.length, command, args.note)
    write_results(args.out, args.name, {**meta, "cells": results}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
