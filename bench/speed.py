"""Folder captioning speed against its ceiling (the encoder alone) and a naive loop, in one run.

    python bench/speed.py [--folder data/flickr8k/images] [--images 512] [--repeats 2]
                          [--slice 128] [--latency-calls 50] [--checkpoint CKPT] [--out bench/results]
                          [--name speed] [--compare-with DIR] [--int8]

On the first N images of the folder (sorted), with the shipped model unless --checkpoint:
- encoder only: decode + transform + CNN through the loader the captioner uses (features.iter_image_batches),
  at a few (CNN batch, worker processes) settings; the fastest is the practical ceiling;
- the same CNN alone in PyTorch eager (batch 4, channels-last, in process): the reference the speed targets of
  issue 14 are set against, whatever runtime the package uses;
- `captioner caption`: caption.caption_paths, the code behind the command, with its defaults, at beam 1 and
  beam 3, writing JSONL to a temporary file;
- a naive loop, the way tutorial captioners do it: per image, load and transform, the CNN on a batch of one,
  beam search (beam 3) on that one image;
- single-image latency at beam 3: Captioner.caption(path), median and 90th percentile of many calls.

Variants take turns on short rounds (A, B, C on images 1-128, A, B, C on 129-256, ..., then a second pass)
so that load from other work on a shared machine spreads over all of them; each rate is the median over
rounds. Captions of `captioner caption` at beam 3 are checked against
the naive loop's. --compare-with DIR also times the captioner package found in DIR (e.g. an older version:
`git archive 0bbe6d6 captioner | tar -x -C /tmp/before`) in the same rounds, with the same decoding options,
and checks its captions too; it loads the same checkpoint, less the config keys it does not know (or
--compare-checkpoint).
--int8 also times the current package with its int8 encoder (`captioner calibrate-int8` first).
Writes speed.md and speed.json to --out (--name changes the names).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import captioner as current
from captioner.files import write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = "data/flickr8k/images"  # where README's `captioner download flickr8k` puts them
ENCODER_SETTINGS = [(2, 1), (4, 1), (8, 1), (16, 1), (4, 0)]  # (CNN batch, worker processes)


def load_package(folder: str, alias: str):
    """Import the `captioner` package under `folder` as `alias`, next to the current one."""
    init = Path(folder) / "captioner" / "__init__.py"
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def readable_by(package, checkpoint: Path, path: Path) -> str:
    """A copy of `checkpoint` without the config keys an older `package` does not know (options added
    since, at their defaults), so that it loads the same weights."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    defaults = importlib.import_module(f"{package.__name__}.config").Config()
    configs = [payload["config"]] + ([payload["fallback"]["config"]] if payload.get("fallback") else [])
    for config in configs:  # the model's, and its fallback decoder's
        for section, values in config.items():
            known = {f.name for f in dataclasses.fields(getattr(defaults, section))}
            for key in [k for k in values if k not in known]:
                del values[key]
    torch.save(payload, path)
    return str(path)


class Package:
    """One version of captioner: its model and the functions the bench times."""

    def __init__(self, package, checkpoint: str, label: str, decoding: dict | None = None, **runtime):
        name = package.__name__
        self.label = label
        self.caption_paths = importlib.import_module(f"{name}.caption").caption_paths
        self.iter_image_batches = importlib.import_module(f"{name}.features").iter_image_batches
        self.beam_search = importlib.import_module(f"{name}.search").beam_search
        self.model = package.Captioner.from_checkpoint(checkpoint, **runtime)  # runtime= and precision=, if any
        self.eager_encoder = None  # PyTorch eager, for the encoder-alone reference (torch_encoder_only)
        # every package decodes with the same options (the first package's checkpoint defaults), beam size aside
        defaults = self.model.config.decode
        self.decoding = decoding or {"max_length": defaults.max_length, "min_length": defaults.min_length,
                                     "no_repeat_ngram_size": defaults.no_repeat_ngram_size,
                                     "length_penalty": defaults.length_penalty}

    def encoder_only(self, paths: list[str], batch_size: int, workers: int, encoder=None) -> int:
        encoder, done = encoder or self.model.encoder, 0
        with torch.inference_mode():
            for indices, images, _ in self.iter_image_batches(paths, encoder.transform, batch_size, workers):
                if images is not None:
                    encoder(images)
                    done += len(indices)
        return done

    def torch_encoder_only(self, paths: list[str], batch_size: int, workers: int) -> int:
        """The same CNN alone, run by PyTorch eager (channels-last, as the torch runtime runs it)."""
        if self.eager_encoder is None:
            config, encoder_type = self.model.config.encoder, type(self.model.encoder)
            # An Encoder with no session attached runs torch; older versions' Encoder chooses its runtime itself.
            torch_only = {"runtime": "torch"} if "runtime" in inspect.signature(encoder_type).parameters else {}
            self.eager_encoder = encoder_type(config.name, config.weights, config.image_size, **torch_only)
        return self.encoder_only(paths, batch_size, workers, self.eager_encoder)

    def caption_folder(self, paths: list[str], beam_size: int, out: Path) -> dict[str, str]:
        """`captioner caption PATHS --out out.jsonl --beam-size B --overwrite`, in process, with its defaults."""
        self.caption_paths(self.model, paths, str(out), overwrite=True, progress=False, beam_size=beam_size,
                           **self.decoding)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return {row["path"]: row.get("caption") for row in rows}

    def naive_loop(self, paths: list[str], beam_size: int) -> dict[str, str]:
        """One image at a time, as the tutorials do: load, CNN on a batch of one, beam search on it."""
        model, captions = self.model, {}
        with torch.no_grad():
            for path in paths:
                image = model.encoder.transform.load(path).unsqueeze(0)
                features, _ = model.encoder(image)
                best = self.beam_search(model.decoder, features, beam_size=beam_size, **self.decoding)[0][0]
                captions[path] = " ".join(model.vocab.decode(best.tokens))
        return captions

    def latency(self, paths: list[str], beam_size: int) -> list[float]:
        seconds = []
        for path in paths:
            started = time.perf_counter()
            self.model.caption(path, beam_size=beam_size, **self.decoding)
            seconds.append(time.perf_counter() - started)
        return seconds


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of `values`; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average_start": os.getloadavg(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=DEFAULT_FOLDER)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
    parser.add_argument("--slice", type=int, default=128,
                        help="images per round: each pass runs every variant on one slice, then the next slice")
    parser.add_argument("--latency-calls", type=int, default=50)
    parser.add_argument("--checkpoint", help="default: the shipped model")
    parser.add_argument("--compare-with", metavar="DIR", help="also time the captioner package in DIR/captioner")
    parser.add_argument("--compare-checkpoint", help="the model that package loads (default: --checkpoint, "
                                                     "less config keys it does not know); decoding options stay the same")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="speed", help="writes NAME.md and NAME.json")
    parser.add_argument("--int8", action="store_true", help="also time the current package with the int8 encoder "
                        "(made by `captioner calibrate-int8`)")
    args = parser.parse_args()

    if not Path(args.folder).is_dir():
        raise SystemExit(f"no folder {args.folder}; pass --folder (e.g. data/flickr8k/images)")
    paths = sorted(str(p) for p in Path(args.folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[:args.images]
    if not paths:
        raise SystemExit(f"no images in {args.folder}")
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="speed-"))
    given = args.checkpoint or str(importlib.import_module("captioner.inference").DEFAULT_CHECKPOINT)
    checkpoint = work / "model.pt"  # one copy for every package, safe from a file replaced mid-run
    shutil.copyfile(given, checkpoint)
    shown = os.path.relpath(given, REPO) if Path(given).resolve().is_relative_to(REPO) else given
    info["checkpoint"] = f"{shown} (sha256 {hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]})"
    packages = [Package(current, str(checkpoint), "now")]
    info["decoding"] = packages[0].decoding
    if args.compare_with:
        compared = load_package(args.compare_with, "captioner_compared")
        compared_checkpoint = args.compare_checkpoint or readable_by(compared, checkpoint, work / "compared.pt")
        packages.append(Package(compared, compared_checkpoint, "compared", packages[0].decoding))
    if args.int8:
        packages.append(Package(current, str(checkpoint), "int8", packages[0].decoding, precision="int8"))
    latency_paths = [paths[i % len(paths)] for i in range(args.latency_calls)]

    variants = {}  # name -> (package label, what, setting, function(paths) returning (images, captions or None))
    variants["encoder only, PyTorch eager, batch 4, 0 workers"] = (  # the reference the speed targets are set against
        "now", "encoder_torch", (4, 0), lambda some, p=packages[0]: (p.torch_encoder_only(some, 4, 0), None))
    for package in packages:
        tag = "" if package.label == "now" else f"{package.label}: "
        settings = ENCODER_SETTINGS if package.label == "now" else [(4, 1), (16, 1), (4, 0)]
        for batch, workers in settings:
            variants[f"{tag}encoder only, batch {batch}, {workers} worker{'s' * (workers != 1)}"] = (
                package.label, "encoder", (batch, workers),
                lambda some, p=package, b=batch, w=workers: (p.encoder_only(some, b, w), None))
        for beam in (1, 3):
            variants[f"{tag}captioner caption, beam {beam}"] = (
                package.label, f"caption_beam{beam}", None,
                lambda some, p=package, b=beam: (len(some), p.caption_folder(some, b, work / f"{p.label}-{b}.jsonl")))
        variants[f"{tag}naive loop, beam 3"] = (package.label, "naive_beam3", None,
                                                lambda some, p=package: (len(some), p.naive_loop(some, 3)))

    print(f"{len(paths)} images from {args.folder}; {info}", file=sys.stderr)
    for package in packages:  # warm-up: model loading, first CNN calls, worker start
        package.encoder_only(paths[:16], 4, 0)
        package.caption_folder(paths[:16], 3, work / "warmup.jsonl")
        package.latency(paths[:5], 3)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    captions: dict[str, dict] = {name: {} for name in variants}
    latencies: dict[str, list[float]] = {p.label: [] for p in packages}
    slices = [paths[start:start + args.slice] for start in range(0, len(paths), args.slice)]
    rounds = slices * args.repeats
    for number, some in enumerate(rounds, start=1):  # every variant on this slice, then the next slice
        for name, (_, _, _, run) in variants.items():
            started = time.perf_counter()
            count, result = run(some)
            rates[name].append(len(some) / (time.perf_counter() - started))
            assert count == len(some), (name, count)
            captions[name].update(result or {})
            print(f"round {number}/{len(rounds)}: {name}: {rates[name][-1]:.1f} images/s", file=sys.stderr)
        for package in packages:
            latencies[package.label] += package.latency(latency_paths[number - 1::len(rounds)], 3)
    info["load_average_end"] = os.getloadavg()

    rows = []
    for name, (label, what, setting, _) in variants.items():
        rows.append({"name": name, "package": label, "what": what, "setting": setting,
                     "images_per_s": statistics.median(rates[name]), "rounds_images_per_s": rates[name]})
    result = {"machine": info, "images": len(paths), "folder": args.folder, "rounds": len(rounds),
              "slice": args.slice, "rows": rows}
    for label in latencies:
        result[f"latency_beam3_{label}"] = {"calls": len(latencies[label]),
                                            "median_ms": 1000 * statistics.median(latencies[label]),
                                            "p90_ms": 1000 * percentile(latencies[label], 0.9)}
        mine = [r for r in rows if r["package"] == label]
        ceiling = max((r for r in mine if r["what"] == "encoder"),
                      key=lambda r: r["images_per_s"])
        beam3 = next(r for r in mine if r["what"] == "caption_beam3")
        naive = next(r for r in mine if r["what"] == "naive_beam3")
        tag = "" if label == "now" else f"{label}: "
        reference = captions[f"{tag}naive loop, beam 3"]
        got = captions[f"{tag}captioner caption, beam 3"]
        eager = next(r for r in rows if r["what"] == "encoder_torch")
        result[f"summary_{label}"] = {
            "encoder_only_images_per_s": ceiling["images_per_s"], "encoder_only_setting": ceiling["setting"],
            "caption_beam3_over_encoder_only": beam3["images_per_s"] / ceiling["images_per_s"],
            "caption_beam3_over_torch_encoder_only": beam3["images_per_s"] / eager["images_per_s"],
            "caption_beam3_over_naive": beam3["images_per_s"] / naive["images_per_s"],
            "caption_beam3_vs_naive_mismatches": sum(got.get(p) != reference[p] for p in paths)}
    for label in latencies.keys() - {"now"}:
        now, other = captions["captioner caption, beam 3"], captions[f"{label}: captioner caption, beam 3"]
        result[f"summary_{label}"]["caption_beam3_mismatches_vs_now"] = sum(now[p] != other.get(p) for p in paths)
    report = markdown(result, " ".join(["python bench/speed.py", *sys.argv[1:]]))
    write_results(args.out, args.name, result, report)
    print(report)


def markdown(result: dict, command: str) -> str:
    info = result["machine"]
    folder = os.path.relpath(result["folder"], REPO)
    lines = [f"`{command}`: the first {result['images']} images of `{folder}`, model `{info['checkpoint']}`, "
             "decoding " + ", ".join(f"{k} {v}" for k, v in info["decoding"].items()) + ". Every variant runs "
             f"on a slice of {result['slice']} images, then the next variant, then the next slice "
             f"({result['rounds']} rounds); images/s is the median over rounds.",
             f"Machine: {info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, torch {info['torch']} "
             f"with {info['torch_threads']} threads"
             + "".join(f", {k}={v}" for k, v in info["env"].items()) + f", Python {info['python']}; load average "
             f"{info['load_average_start'][0]:.1f} at the start, {info['load_average_end'][0]:.1f} at the end "
             f"(the machine is shared).", "",
             "| what | images/s | / encoder only | rounds |", "| --- | --- | --- | --- |"]
    for row in result["rows"]:
        ceiling = result[f"summary_{row['package']}"]["encoder_only_images_per_s"]
        lines.append(f"| {row['name']} | {row['images_per_s']:.1f} | {row['images_per_s'] / ceiling:.2f} | "
                     + ", ".join(f"{r:.1f}" for r in row["rounds_images_per_s"]) + " |")
    lines.append("")
    for label in ("now", "compared", "int8"):
        if f"summary_{label}" not in result:
            continue
        summary, latency = result[f"summary_{label}"], result[f"latency_beam3_{label}"]
        tag = {"now": "", "compared": "compared package: ", "int8": "with the int8 encoder: "}[label]
        lines.append(f"- {tag}captioner caption at beam 3 runs at "
                     f"**{summary['caption_beam3_over_torch_encoder_only']:.2f}x** the CNN alone in PyTorch eager, "
                     f"**{summary['caption_beam3_over_encoder_only']:.2f}x** its own encoder-only ceiling "
                     f"and **{summary['caption_beam3_over_naive']:.2f}x** the naive loop (target >= 2); "
                     f"its captions differ from the naive loop's on "
                     f"{summary['caption_beam3_vs_naive_mismatches']} of {result['images']} images"
                     + (f" and from the current package's on {summary['caption_beam3_mismatches_vs_now']}"
                        if "caption_beam3_mismatches_vs_now" in summary else "") + ".")
        lines.append(f"- {tag}single-image latency, Captioner.caption(path) at beam 3: median "
                     f"{latency['median_ms']:.0f} ms, 90th percentile {latency['p90_ms']:.0f} ms "
                     f"({latency['calls']} calls).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
