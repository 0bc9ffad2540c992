"""Images/s of `captioner caption` with the local engine and with --engine ray, on the same images, in one run.

    python bench/ray_vs_local.py [--folder DIR] [--images 400] [--checkpoint CKPT] [--beam-size 3]

Default: the first N images (sorted) of data/flickr8k (README's download), the shipped model, beam 3. The local engine
runs twice: with torch's default thread count (what the CLI does) and with one thread, as each Ray actor
does, so the table shows what Ray itself adds. Ray is started first and timed apart: the Ray figure is the
captioning itself (actors loading the model included). Writes bench/results/ray_vs_local.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from captioner import Captioner
from captioner.caption import caption_paths
from captioner.ray_engine import caption_with_ray, pool_layout, start_ray

FLICKR8K = Path("data/flickr8k")
RESULTS = Path(__file__).resolve().parent / "results" / "ray_vs_local.md"


def default_folder() -> Path:
    for name in ("images", "Flicker8k_Dataset"):  # `captioner download`'s folder name, or the release's
        if (FLICKR8K / name).is_dir():
            return FLICKR8K / name
    raise SystemExit(f"no Flickr8k images under {FLICKR8K}; pass --folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--checkpoint")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (the CLI default)")
    args = parser.parse_args()

    folder = args.folder or default_folder()
    files = sorted(str(p) for p in folder.iterdir() if p.is_file())[: args.images]
    work = Path(tempfile.mkdtemp(prefix="ray_vs_local-"))
    options = dict(batch_size=args.batch_size, overwrite=True, progress=False, beam_size=args.beam_size)

    default_threads = torch.get_num_threads()
    local_s = {}
    for threads in dict.fromkeys((default_threads, 1)):  # 1 thread too, as each Ray actor runs it
        torch.set_num_threads(threads)
        started = time.perf_counter()
        captioner = Captioner.from_checkpoint(args.checkpoint)
        caption_paths(captioner, files, str(work / f"local{threads}.jsonl"), **options)
        local_s[threads] = time.perf_counter() - started
    torch.set_num_threads(default_threads)

    started = time.perf_counter()
    start_ray(ray, address=None)
    ray_start_s = time.perf_counter() - started
    actors, cpus_each, threads = pool_layout(ray.cluster_resources()["CPU"])
    started = time.perf_counter()
    caption_with_ray(files, args.checkpoint, str(work / "ray.jsonl"), **options)
    ray_s = time.perf_counter() - started
    ray.shutdown()

    local_rows, ray_rows = ([json.loads(line) for line in (work / name).read_text().splitlines()]
                            for name in (f"local{default_threads}.jsonl", "ray.jsonl"))
    ray_by_path = {r["path"]: r for r in ray_rows}
    same_captions = sum(r.get("caption") == ray_by_path.get(r["path"], {}).get("caption") for r in local_rows)
    score_gap = max(abs(r["score"] - ray_by_path[r["path"]]["score"]) for r in local_rows if "score" in r)
    n = len(files)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
               f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
               f"Ray {ray.__version__}; load average {os.getloadavg()[0]:.1f} at the end (shared machine?)")
    rows = [(f"local (`caption_paths`), torch {t} thread(s){' (the default)' if t == default_threads else ''}", s)
            for t, s in local_s.items()] + [(f"ray (`--engine ray`), {actors} actor(s) x {threads} thread(s)", ray_s)]
    table = "\n".join([
        f"# Local engine vs --engine ray: {n} images from {folder.name}/, beam {args.beam_size}, "
        f"batch {args.batch_size}, {'shipped model' if not args.checkpoint else args.checkpoint}",
        "",
        f"Machine: {machine}.",
        f"Ray: {actors} actor(s), {cpus_each:g} CPU reserved and {threads} torch thread(s) each; "
        f"starting the local Ray instance took {ray_start_s:.1f} s (not counted below).",
        "",
        "| engine | seconds | images/s | ray speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {seconds:.1f} | {n / seconds:.2f} | {seconds / ray_s:.2f}x |" for name, seconds in rows),
        "",
        f"Same captions from both engines: {same_captions}/{n}; scores differ by at most {score_gap:.4f} "
        f"(thread counts change float sums).",
    ])
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
