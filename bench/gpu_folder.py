"""Folder captioning on a GPU: images/s by the number of processes decoding the image files.

    python bench/gpu_folder.py [--folder DIR | --synthetic 2048] [--workers 0 1 2 4 8] [--rounds 2]
                               [--device cuda] [--out bench/results] [--name gpu-folder]

On a GPU the CNN and the search take milliseconds per batch of 128, so the JPEG decoding sets the pace. This times
caption.caption_paths (the code behind `captioner caption`, beam 3, the shipped model) for each --workers value
and for the default (`folders.default_workers`), the settings taking turns over --rounds, and checks that every
setting writes the same captions. --synthetic N writes N photo-sized JPEGs (640x480 smooth random colour fields
with grain) to a temporary folder, for machines without photos: the captions mean nothing, the decoding costs
what a photo's does. Writes NAME.md and NAME.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner import Captioner
from captioner.caption import caption_paths
from captioner.files import write_results
from captioner.folders import default_workers


def synthetic_photos(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        grain = rng.normal(0, 12, (480, 640, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder")
    source.add_argument("--synthetic", type=int, metavar="N")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="gpu-folder")
    args = parser.parse_args()

    captioner = Captioner.from_checkpoint(device=args.device)
    default = default_workers(captioner.device)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(args.folder) if args.folder else Path(work) / "photos"
        if args.synthetic:
            folder.mkdir()
            synthetic_photos(folder, args.synthetic)
        count = sum(1 for _ in folder.iterdir())
        settings = sorted(set(args.workers) | {default})
        seconds: dict[int, list[float]] = {w: [] for w in settings}
        captions: dict[int, list[str]] = {}
        caption_paths(captioner, [str(folder)], str(Path(work) / "warm-up.jsonl"), progress=False, num_workers=0)
        for _ in range(args.rounds):
            for workers in settings:
                out = Path(work) / f"captions-{workers}.jsonl"
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                status = caption_paths(captioner, [str(folder)], str(out), overwrite=True, progress=False,
                                       num_workers=workers)
                seconds[workers].append(time.perf_counter() - started)
                if status != 0:
                    sys.exit(f"caption_paths returned {status} with {workers} workers")
                captions[workers] = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    same = all(captions[w] == captions[settings[0]] for w in settings)
    rates = {w: count / statistics.median(s) for w, s in seconds.items()}
    machine = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
               "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__, "python": platform.python_version(),
               "torch_threads": torch.get_num_threads()}
    results = {"command": "python " + " ".join(sys.argv), "machine": machine, "images": count,
               "synthetic": bool(args.synthetic), "rounds": args.rounds, "default_workers": default,
               "images_per_s": rates, "seconds": seconds, "same_captions": same}
    lines = [f"# Folder captioning on {machine['device']}, by decoding processes", "",
             f"`{results['command']}`: {count} {'synthetic 640x480 JPEGs' if args.synthetic else 'images'}, beam 3, "
             f"median of {args.rounds} rounds; {machine['cpus']} CPUs, torch {machine['torch']}. "
             f"Same captions in every setting: {same}.", "",
             "| decoding processes | images/s | / in process |", "| --- | --- | --- |"]
    lines += [f"| {w}{' (default)' if w == default else ''} | {rates[w]:.0f} | {rates[w] / rates[settings[0]]:.2f}x |"
              for w in settings]
    write_results(Path(args.out), args.name, results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
