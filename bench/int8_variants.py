"""int8 calibration settings side by side: how close each int8 CNN stays to fp32, and how fast it runs.

    python bench/int8_variants.py --flickr8k DATA/flickr8k --ood DATA/coco-ood-dev [--checkpoint CKPT]
                                  [--dev-photos 200] [--out bench/results] [--name int8-variants]

Each variant quantizes the model's CNN (ONNX Runtime, static QDQ, per-channel; captioner.quantize.quantize_graph)
calibrated on the same Flickr8k training photos, then encodes dev photos (a fixed sample of Flickr8k dev and every
--ood photo) and compares with fp32: the pooled features' cosine, and how often the ImageNet head's top class (the
first tag) stays the same. Speed is CNN images/s at batch 4 over fp32's, on this machine. Dev photos only: the
settings are chosen here, int8's verdict against fp32 is bench/int8.py's on Flickr8k test.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import load_checkpoint
from captioner.data import load_dataset
from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT
from captioner.onnx_runtime import encoder_from_config, encoder_graph, inference_session
from captioner.quantize import calibration_sample, quantize_graph
from int8 import int8_machine  # bench/int8.py, next to this file

VARIANTS = {  # name -> quantize_graph options; the first is what `captioner calibrate-int8` makes
    "shipped setting: first 3 convolutions fp32, MinMax, 7-bit weights, 8-bit in depthwise convolutions": {},
    "7-bit depthwise weights too (the setting before)": {"depthwise_weight_bits": 7},
    "first 10 convolutions fp32": {"float_convolutions": 10},
    "first 25 convolutions fp32": {"float_convolutions": 25},
    "first 40 convolutions fp32": {"float_convolutions": 40},
    "last 4 convolutions fp32 too": {"float_last_convolutions": 4},
    "Percentile ranges (99.999, 64 photos: histograms take 5 GB)": {"method": "Percentile", "photos": 64},
    "Entropy ranges (64 photos)": {"method": "Entropy", "photos": 64},
    "1024 calibration photos": {"photos": 1024},
    "8-bit signed weights everywhere": {"weight_bits": 8},
    "8-bit unsigned weights everywhere (u8 x u8 kernels)": {"weight_bits": 8, "unsigned_weights": True},
}


def encode(session, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(["pooled"], {"images": images[i:i + 4]})[0] for i in range(0, len(images), 4)])


def speed_over_fp32(fp32, session, images: np.ndarray, rounds: int = 7) -> float:
    """The variant's CNN images/s over fp32's: the two timed in turn, `rounds` times, the medians compared (the
    shared machine's load moves both alike)."""
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(rounds):
        rates["fp32"].append(images_per_second(fp32, images, rounds=1))
        rates["int8"].append(images_per_second(session, images, rounds=1))
    return statistics.median(rates["int8"]) / statistics.median(rates["fp32"])


def images_per_second(session, images: np.ndarray, rounds: int = 3) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        encode(session, images)
    return rounds * len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr8k", required=True, help="Flickr8k in its release layout")
    parser.add_argument("--ood", required=True, help="a folder of photos unlike Flickr8k's, e.g. coco-ood-dev")
    parser.add_argument("--checkpoint", help="default: the shipped model")
    parser.add_argument("--dev-photos", type=int, default=200, help="Flickr8k dev photos sampled")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="int8-variants")
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(DEFAULT_CHECKPOINT)
    config = load_checkpoint(checkpoint)[0]
    config.encoder.runtime = "onnx"
    encoder = encoder_from_config(config.encoder)
    data = copy.deepcopy(config.data)
    data.root = args.flickr8k
    dataset = load_dataset(data)
    train = [str(r.path) for r in dataset.split("train")]
    dev = sorted({str(r.path) for r in dataset.split("dev")})
    ood = sorted(str(p) for p in Path(args.ood).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = {"Flickr8k dev": sorted(random.Random(0).sample(dev, min(args.dev_photos, len(dev)))),
              Path(args.ood).name: ood}
    pixels = {name: np.stack([encoder.transform.load(p).numpy() for p in paths]).astype(np.float32)
              for name, paths in photos.items()}
    timing = pixels["Flickr8k dev"][:64]
    fp32 = inference_session(encoder_graph(encoder, "fp32"))
    reference = {name: encode(fp32, images) for name, images in pixels.items()}
    head = encoder.head.eval()

    def top_class(pooled: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return head(torch.from_numpy(pooled)).argmax(1).numpy()

    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-variants-") as work:
        for name, options in VARIANTS.items():
            options = dict(options)
            sample = calibration_sample(train, options.pop("photos", args.calibration_images))
            target = Path(work) / "int8.onnx"
            started = time.perf_counter()
            quantize_graph(encoder_graph(encoder, "fp32"), target, sample, encoder.transform, progress=False,
                           **options)
            seconds = time.perf_counter() - started
            session = inference_session(target)
            row = {"variant": name, "options": options, "calibration_photos": len(sample),
                   "calibration_seconds": round(seconds, 1)}
            for set_name, images in pixels.items():
                pooled, expected = encode(session, images), reference[set_name]
                cosine = (pooled * expected).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(expected, axis=1)
                row[set_name] = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                                 "same_top_class": float((top_class(pooled) == top_class(expected)).mean())}
            row["speed_vs_fp32"] = speed_over_fp32(fp32, session, timing)
            rows.append(row)
            print(name, row, file=sys.stderr, flush=True)
    result = {"command": " ".join(["python bench/int8_variants.py", *sys.argv[1:]]), "checkpoint": checkpoint,
              "photos": {name: len(paths) for name, paths in photos.items()}, "variants": rows,
              "machine": int8_machine()}
    report = markdown(result)
    write_results(args.out, args.name, result, report)
    print(report)


def markdown(result: dict) -> str:
    info, sets = result["machine"], list(result["photos"])
    lines = [f"# int8 calibration settings against fp32 (ONNX Runtime {info['onnxruntime']})", "",
             f"`{result['command']}`. Photos: " + ", ".join(f"{n} {name}" for name, n in result["photos"].items())
             + f". Machine: {info['processor']}, {info['cpu_count']} CPUs, {info['torch_threads']} threads, "
             f"AVX-512 VNNI: {info['avx512_vnni']}. Cosine of int8 to fp32 pooled features (mean / min), the share "
             "of photos whose ImageNet top class (first tag) stays the same, and CNN speed over fp32 at batch 4 "
             "(the two timed in turn, 7 rounds of 64 photos, medians compared).", "",
             "| variant | " + " | ".join(f"{s}: cosine | {s}: same top class" for s in sets) + " | speed / fp32 |",
             "| --- | " + " | ".join("--- | ---" for _ in sets) + " | --- |"]
    for row in result["variants"]:
        cells = " | ".join(f"{row[s]['cosine_mean']:.4f} / {row[s]['cosine_min']:.4f} | {row[s]['same_top_class']:.2f}"
                           for s in sets)
        lines.append(f"| {row['variant']} | {cells} | {row['speed_vs_fp32']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
