"""int8 against fp32 for the CNN (ONNX Runtime), scored the way `captioner evaluate` scores a model.

    python bench/int8.py --flickr8k DATA/flickr8k [--ood DATA/coco-ood-dev] [--checkpoint CKPT]
                         [--split test] [--calibration-images 256] [--float-convolutions 3]
                         [--depthwise-weight-bits 8] [--recalibrate]
                         [--out bench/results] [--name int8]

Calibrates the int8 encoder on Flickr8k training photos (`captioner calibrate-int8`, unless one is already in
the cache or with --recalibrate), then runs `captioner evaluate` with --precision fp32 and --precision int8 on
Flickr8k's --split (choose settings on dev, score test once) and on the --ood folder, and compares: BLEU-4 and
CIDEr-D, how many captions differ, and how close the pooled features are (cosine). int8 may become the default
only if it loses at most 0.005 BLEU-4 and 0.01 CIDEr-D on Flickr8k test and 0.01 CIDEr-D on the folder (issue
14); the verdict is written with the numbers.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch

from captioner.files import write_results
from captioner.checkpoint import load_checkpoint
from captioner.cli import main as captioner_main
from captioner.features import cached_features
from captioner.inference import DEFAULT_CHECKPOINT
from captioner.onnx_runtime import encoder_from_config, graph_path

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"flickr8k": {"bleu4": 0.005, "cider_d": 0.01}, "ood": {"cider_d": 0.01}}  # issue 14's, against fp32


def int8_machine() -> dict:
    """What decides int8's speed and numbers: the CPU (VNNI or not), the runtime, the threads."""
    cpuinfo = Path("/proc/cpuinfo")
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "avx512_vnni": "avx512_vnni" in cpuinfo.read_text() if cpuinfo.is_file() else None}


def evaluate(arguments: list[str], captions: Path) -> dict:
    """`captioner evaluate ARGUMENTS --out CAPTIONS`; its JSON line."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert captioner_main(["evaluate", *arguments, "--out", str(captions), "--no-progress"]) == 0
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def feature_cosine(checkpoint: str, paths: list[str]) -> dict:
    """Cosine of int8 to fp32 pooled features of the same photos (both from the feature cache evaluate filled)."""
    config = load_checkpoint(checkpoint)[0]
    tables = {}
    for precision in ("fp32", "int8"):
        config.encoder.runtime, config.encoder.precision = "onnx", precision
        tables[precision] = cached_features(encoder_from_config(config.encoder), paths, config.train.cache_dir,
                                            progress=False)
    cosine = torch.nn.functional.cosine_similarity(tables["fp32"].features.float(), tables["int8"].features.float())
    return {"mean": cosine.mean().item(), "min": cosine.min().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flickr8k", required=True, help="Flickr8k in its release layout")
    parser.add_argument("--ood", help="a folder of captioned photos (refs.jsonl), e.g. coco-ood-dev")
    parser.add_argument("--checkpoint", help="default: the shipped model")
    parser.add_argument("--split", default="test", choices=["dev", "test"], help="Flickr8k split to score")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--float-convolutions", type=int, default=3, help="the first N convolutions stay fp32")
    parser.add_argument("--depthwise-weight-bits", type=int, choices=[7, 8], default=8)
    parser.add_argument("--recalibrate", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="int8")
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(DEFAULT_CHECKPOINT)
    config = load_checkpoint(checkpoint)[0]
    config.encoder.runtime = "onnx"
    int8_file = graph_path(encoder_from_config(config.encoder), "int8")
    started = time.perf_counter()
    if args.recalibrate or not int8_file.is_file():
        assert captioner_main(["calibrate-int8", "--checkpoint", checkpoint, "--data-root", args.flickr8k,
                               "--images", str(args.calibration_images), "--float-convolutions",
                               str(args.float_convolutions), "--depthwise-weight-bits",
                               str(args.depthwise_weight_bits), "--no-progress"]) == 0
    calibration_seconds = time.perf_counter() - started
    sets = {"flickr8k": ["--split", args.split, "--set", f"data.root={args.flickr8k}"]}
    names = {"flickr8k": f"Flickr8k {args.split}"}
    if args.ood:
        sets["ood"] = ["--data", args.ood]
        names["ood"] = Path(args.ood).name
    work = Path(tempfile.mkdtemp(prefix="int8-"))
    results: dict = {}
    for name, arguments in sets.items():
        runs = {}
        for precision in ("fp32", "int8"):
            captions = work / f"{name}-{precision}.jsonl"
            run_started = time.perf_counter()
            runs[precision] = evaluate(["--checkpoint", checkpoint, *arguments, "--runtime", "onnx",
                                        "--precision", precision], captions)
            runs[precision]["seconds"] = time.perf_counter() - run_started
            runs[precision]["captions"] = [json.loads(line) for line in captions.read_text().splitlines()]
        fp32, int8 = runs["fp32"], runs["int8"]
        differ = sum(a["caption"] != b["caption"] for a, b in zip(fp32.pop("captions"), int8.pop("captions")))
        paths = [str(p) for p in sorted({json.loads(line)["path"] for line in
                                         (work / f"{name}-fp32.jsonl").read_text().splitlines()})]
        losses = {metric: fp32[metric] - int8[metric] for metric in LIMITS[name]}
        results[name] = {"name": names[name], "fp32": fp32, "int8": int8, "captions_differ": differ, "losses": losses,
                         "within_limits": all(losses[m] <= limit for m, limit in LIMITS[name].items()),
                         "feature_cosine": feature_cosine(checkpoint, paths)}
    verdict = (all(r["within_limits"] for r in results.values()) and "ood" in results) if args.split == "test" else None
    calibrated = {p.key: p.value for p in onnx.load(str(int8_file), load_external_data=False).metadata_props}
    shown = os.path.relpath(checkpoint, REPO) if Path(checkpoint).resolve().is_relative_to(REPO) else checkpoint
    result = {"command": " ".join(["python bench/int8.py", *sys.argv[1:]]), "checkpoint": shown,
              "int8_graph": str(int8_file), "calibration": calibrated,
              "calibration_seconds": round(calibration_seconds, 1), "limits": LIMITS, "sets": results,
              "int8_may_be_default": verdict,
              "machine": int8_machine()}
    report = markdown(result)
    write_results(args.out, args.name, result, report)
    print(report)


def weight_bits(calibration: dict) -> str:
    """How many bits the int8 graph's weights have (graphs calibrated before the depthwise convolutions got 8 bits
    do not say: 7 everywhere)."""
    depthwise = calibration.get("depthwise_weight_bits", "7")
    return f"{calibration.get('weight_bits', '7')}-bit" + (f" ({depthwise} in the depthwise convolutions)"
                                                            if depthwise != calibration.get("weight_bits", "7") else "")


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"# int8 against fp32 for the CNN (ONNX Runtime {info['onnxruntime']})", "",
             f"`{result['command']}`: model `{result['checkpoint']}`, int8 encoder calibrated "
             f"on {result['calibration'].get('calibration_images')} Flickr8k training photos (static, QDQ, per-channel "
             f"{weight_bits(result['calibration'])} weights, uint8 activations, {result['calibration'].get('calibration_method')} ranges; the first "
             f"{result['calibration'].get('float_convolutions')} convolutions stay fp32); each set scored by "
             "`captioner evaluate` with `--precision fp32` and `--precision int8` (beam 3, the model's decoding "
             "defaults, its fallback decoder included).", "",
             f"Machine: {info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, torch {info['torch']} "
             f"with {info['torch_threads']} threads, AVX-512 VNNI: {info['avx512_vnni']}.", "",
             "| set | images | precision | BLEU-4 | CIDEr-D | captions that differ | feature cosine (mean / min) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, scores in result["sets"].items():
        for precision in ("fp32", "int8"):
            run = scores[precision]
            extra = (f"{scores['captions_differ']} of {run['images']} | {scores['feature_cosine']['mean']:.4f} / "
                     f"{scores['feature_cosine']['min']:.4f}") if precision == "int8" else "- | -"
            lines.append(f"| {scores['name']} | {run['images']} | {precision} | {run['bleu4']:.4f} | "
                         f"{run['cider_d']:.4f} | {extra} |")
    lines.append("")
    for name, scores in result["sets"].items():
        limits = result["limits"][name]
        lines.append(f"- {scores['name']}: int8 loses " + ", ".join(
            f"{scores['losses'][m]:+.4f} {'BLEU-4' if m == 'bleu4' else 'CIDEr-D'} (limit {limits[m]})"
            for m in limits) + (": within the limits." if scores["within_limits"] else ": over the limit."))
    if result["int8_may_be_default"] is None:
        lines.append("- Dev sets: for choosing int8's settings; the verdict is taken on Flickr8k test.")
    else:
        lines.append(f"- Verdict: int8 {'may become' if result['int8_may_be_default'] else 'does not become'} the "
                     "default" + ("" if result["int8_may_be_default"] else "; fp32 stays the default and int8 is an "
                                  "option (`--precision int8`)") + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
