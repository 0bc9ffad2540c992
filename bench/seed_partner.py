"""Whether other trainings of the model's own cell (other seeds) pay as its ensemble partners, on dev.

    python bench/seed_partner.py --partner CKPT [CKPT ...] [--checkpoint captioner/models/default.pt]
                                 [--data-root DIR] [--weights 1 0.7 0.6 0.5 0.4 0.3 0] [--cells CELLS]
                                 [--folders DIR ...] [--out bench/results] [--name seed-partner]

A model file holds one photo decoder per cell, so for this run the model's own cell becomes the ensemble
(decoder.Ensemble) of its decoder, weight w, and the partners, sharing 1 - w equally: w = 1 is the model as
it is, w = 0 the partners alone. Each is captioned as `captioner caption` captions (routing and tag decoder
included) on the dev split at the model's beam size; with --cells (decode.cells, e.g. gru:0.7,lstm:0.3)
the mixed cell writes with the model's others; --folders (refs.jsonl folders, e.g. coco-ood-dev) are
scored too, as bench/ood.py scores them (CIDEr-D, person/dog hallucination). Dev sets only: it answers
whether shipping partners would pay (tune_cells.py's --min-gain is the bar), and with one partner the two
ends compare two seeds of one recipe.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.data import load_refs_folder
from captioner.decoder import Ensemble
from captioner.describe import unchanged
from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.onnx_runtime import DecoderSession

from ood import fmt, score_records  # bench/ood.py
from tune_cells import METRICS, featured_splits, load_on_data, scored  # bench/tune_cells.py, beside this script


def load_partner(captioner: Captioner, path: str):
    """The partner's decoder as the model's searches step it (on ONNX Runtime where the model's are)."""
    config, vocab, partner, _ = load_checkpoint(path)
    own = captioner.decoder.cell
    if config.decoder.cell != own or list(vocab.words) != list(captioner.vocab.words):
        raise CheckpointError(f"{path}: a {config.decoder.cell} decoder with {len(vocab)} words; a partner must be "
                              f"of the model's cell ({own}) and vocabulary ({len(captioner.vocab)} words)")
    stepper = DecoderSession if captioner.encoder.runtime_on(captioner.device) == "onnx" else unchanged
    return stepper(partner.to(captioner.device).eval())


def with_partners(captioner: Captioner, partners: list, weight: float) -> Captioner:
    """The captioner whose own cell steps w x its decoder's distribution + (1 - w) x the partners' (equal shares)."""
    own = captioner.decoder.cell
    members = {"model": captioner.writer.stepped[own]} if weight > 0 else {}
    if weight < 1:
        members.update({f"partner {i + 1}": partner for i, partner in enumerate(partners)})
    weights = {name: weight if name == "model" else (1 - weight) / len(partners) for name in members}
    searched = next(iter(members.values())) if len(members) == 1 else Ensemble(members, weights)
    return with_stepped(captioner, {**captioner.writer.stepped, own: searched})


def with_stepped(captioner: Captioner, stepped: dict) -> Captioner:
    """The same captioner whose searches step `stepped` (by cell) in place of its own decoders' steppers."""
    changed, writer = copy.copy(captioner), copy.copy(captioner.writer)
    writer.stepped = stepped
    changed.writer = writer
    return changed


def add_mix_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --partner and --data-root: the model, the other runs of its cell, and their dataset."""
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--partner", nargs="+", required=True, help="checkpoints of the model's own cell, same data")
    parser.add_argument("--data-root", help="where the checkpoint's dataset is, if not at its data.root")


def load_mix(args: argparse.Namespace) -> tuple[Captioner, list]:
    """The model (reading its dataset at --data-root) and its partners, as its searches step them."""
    captioner = load_on_data(args.checkpoint, args.data_root)
    return captioner, [load_partner(captioner, path) for path in args.partner]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mix_arguments(parser)
    parser.add_argument("--weights", type=float, nargs="+", default=[1, 0.7, 0.6, 0.5, 0.4, 0.3, 0],
                        help="the model's weight w; the partners share 1 - w")
    parser.add_argument("--cells", default="", help="decode.cells to caption with (default: the model's own cell)")
    parser.add_argument("--folders", nargs="*", default=[], help="dev folders with refs.jsonl (e.g. coco-ood-dev)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="seed-partner", help="writes NAME.md and NAME.json")
    args = parser.parse_args(argv)

    captioner, partners = load_mix(args)
    dev = featured_splits(captioner, ("dev",))["dev"]
    beam, own = captioner.config.decode.beam_size, captioner.decoder.cell
    cells = args.cells or own
    folders = {Path(folder).name: load_refs_folder(folder).split("test") for folder in args.folders}
    rows = []
    for weight in args.weights:
        mixed = with_partners(captioner, partners, weight)
        rows.append({"model_weight": weight, **scored(mixed, dev, cells, beam)})
        for folder, records in folders.items():
            scores, _ = score_records(mixed.with_settings(f"decode.cells={cells}"), records, captioner.config.train.cache_dir)
            rows[-1][folder] = {k: scores[k] for k in ("cider_d", "person_dog_hallucination")}
        print(json.dumps(rows[-1]), flush=True)

    partners_named = ", ".join(f"`{path}`" for path in args.partner)
    write(args, rows, f"`{args.checkpoint}`'s {own} decoder (weight w) mixed with {partners_named} (weight 1 - w) "
                      f"on Flickr8k dev at beam {beam}, captioned as `captioner caption` captions (routing included), "
                      f"decode.cells `{cells}`")


def write(args, rows: list[dict], title: str) -> None:
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    folders = [Path(f).name for f in args.folders]
    header = ["w (model)", *METRICS, "from tags"] + [f"{f} {m}" for f in folders for m in ("CIDEr-D", "hallucination")]
    lines = [f"{title}: `python {' '.join(sys.argv)}`. Machine: {machine}.", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [f"{r['model_weight']:g}", *(f"{r[m]:.4f}" for m in METRICS), f"{r['from_tags']:.3f}"]
        cells += [fmt(r[f][m]) for f in folders for m in ("cider_d", "person_dog_hallucination")]
        lines.append("| " + " | ".join(cells) + " |")
    write_results(args.out, args.name, {"checkpoint": args.checkpoint, "partner": args.partner, "machine": machine,
                                        "dev": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
