"""One photo's caption time for each cell and for mixes of them, in the same run (what a mix costs a user).

    python bench/cell_latency.py [--checkpoint CKPT] --folder DIR [--calls 50]
                                 [--cells gru lstm rnn gru:0.9,lstm:0.1 gru:0.6,lstm:0.2,rnn:0.2] [--name cell-latency]

Captioner.caption(path, cells=...) at the checkpoint's beam, one photo per call, on the folder's first
photos (sorted). The settings take turns, one call each, so load from other work spreads over all of them.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT, Captioner

from speed import percentile  # bench/speed.py's nearest-rank percentile, beside this script


def latencies(captioners: dict[str, Captioner], photos: list[Path], warm_up: int = 5) -> dict[str, dict]:
    """Median and 90th percentile ms of Captioner.caption(photo) per setting, after `warm_up` untimed photos
    (each setting's sessions and caches); the settings take turns, one call each."""
    for photo in photos[:warm_up]:
        for captioner in captioners.values():
            captioner.caption(photo)
    seconds = {name: [] for name in captioners}
    for photo in photos[warm_up:]:
        for name, captioner in captioners.items():
            start = time.perf_counter()
            captioner.caption(photo)
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median_ms": round(1000 * statistics.median(s), 1), "p90_ms": round(1000 * percentile(s, 0.9), 1)}
            for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--folder", required=True, help="photos to caption, one per call")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per setting (after 5 untimed)")
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm", "rnn", "gru:0.9,lstm:0.1",
                                                       "gru:0.6,lstm:0.2,rnn:0.2"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="cell-latency")
    args = parser.parse_args(argv)

    captioner = Captioner.from_checkpoint(args.checkpoint)
    photos = sorted(Path(args.folder).glob("*.jpg"))[:args.calls + 5]
    rows = latencies({cells: captioner.with_settings(f"decode.cells={cells}") for cells in args.cells}, photos)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    report = [f"`python {' '.join(sys.argv)}`: one photo per call, `{args.checkpoint}` at beam "
              f"{captioner.config.decode.beam_size}, {len(photos) - 5} calls per setting, taking turns. Machine: {machine}; "
              f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared).", "",
              "| cells | median ms | 90th percentile ms |", "| --- | --- | --- |",
              *(f"| {cells} | {r['median_ms']} | {r['p90_ms']} |" for cells, r in rows.items())]
    write_results(args.out, args.name, {"checkpoint": args.checkpoint, "machine": machine, "calls": len(photos) - 5,
                                        "beam_size": captioner.config.decode.beam_size, "latency": rows},
                  "\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
