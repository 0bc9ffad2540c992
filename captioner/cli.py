"""The `captioner` command: train, evaluate, caption, download."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError

EXIT_ERROR = 1
EXIT_BROKEN_PIPE = 141  # what a shell reports for a tool ended by SIGPIPE


def _decode_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults: the checkpoint's config)")
    group.add_argument("--beam-size", type=int, help="1 = greedy")
    group.add_argument("--max-length", type=int, help="most words per caption")
    group.add_argument("--min-length", type=int)
    group.add_argument("--length-penalty", type=float, help="score = log-prob / length**penalty")
    group.add_argument("--no-repeat-ngram-size", type=int, help="block repeated n-grams (0: off)")


def _runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how the CNN and the decoder's steps run on a CPU (default: the "
                                      "checkpoint's encoder config, auto and fp32)")
    group.add_argument("--runtime", choices=["auto", "torch", "onnx"],
                       help="auto: ONNX Runtime when installed (faster), torch otherwise; a GPU always runs torch")
    group.add_argument("--precision", choices=["fp32", "int8"],
                       help="int8: the CNN quantized by `captioner calibrate-int8` (ONNX Runtime)")


def _runtime_overrides(args) -> list[str]:
    return [f"encoder.{key}={value}" for key, value in (("runtime", args.runtime), ("precision", args.precision))
            if value]


def _decode_options(args) -> dict:
    return {"beam_size": args.beam_size, "max_length": args.max_length, "min_length": args.min_length,
            "length_penalty": args.length_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size}


def _scores_text(scores: dict) -> str:
    return (", ".join(f"BLEU-{n} {scores[f'bleu{n}']:.4f}" for n in range(1, 5))
            + f", CIDEr-D {scores['cider_d']:.4f}, ROUGE-L {scores['rouge_l']:.4f}")


def _hallucination_text(result: dict) -> str:
    if result["person_dog_hallucination"] is None:
        return "person/dog hallucination n/a (every image's references name a person or a dog)"
    return (f"person/dog hallucination {result['person_dog_hallucination']:.4f} on the "
            f"{result['images_without_person_dog']} images whose references name neither, there "
            + _scores_text(result["without_person_dog"]))


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 1 to 65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a decoder on cached encoder features")
    train.add_argument("--config", help="YAML config (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in train.out_dir from last.pt, under the run's own config: --config and "
                            "--set may change only train.epochs, train.patience, train.device, train.threads and "
                            "train.cache_dir; any other setting that differs from the run's is an error")
    train.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="BLEU-1..4, CIDEr-D, ROUGE-L and person/dog hallucination "
                                                    "of a checkpoint on a split")
    evaluate.add_argument("--checkpoint", help="default: the model shipped with captioner")
    evaluate.add_argument("--data", metavar="DIR", help="score on a folder of captioned images: DIR/refs.jsonl "
                          '({"image": NAME, "refs": [captions]} per line) and the images in DIR/images/ or DIR '
                          "(sets data.format=refs, data.root=DIR, split test)")
    evaluate.add_argument("--split", choices=["train", "dev", "val", "test"], help="default: test")
    evaluate.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override the checkpoint's config, e.g. data.root=/data/flickr8k")
    evaluate.add_argument("--out", help="write the generated captions as JSONL")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--no-progress", action="store_true")
    _decode_arguments(evaluate)
    _runtime_arguments(evaluate)

    caption = commands.add_parser("caption", help="caption image files and folders")
    caption.add_argument("paths", nargs="+", metavar="PATH")
    caption.add_argument("--checkpoint", help="default: the model shipped with captioner")
    caption.add_argument("--out", help="write rows to FILE.jsonl or FILE.csv (default: print)")
    caption.add_argument("--batch-size", type=int, default=128,
                         help="images captioned together: beam search runs on the whole batch, the CNN on chunks "
                              "of 4 of them on a CPU (fastest there); a batch's rows are written once the next batch is encoded "
                              "(its search runs meanwhile) or at the end")
    caption.add_argument("--workers", type=int, help="processes decoding image files (local engine); default: 0 "
                         "on a CPU whose cores torch already uses (decoding there only takes turns with the CNN), else 1")
    caption.add_argument("--overwrite", action="store_true", help="redo images already captioned in --out")
    caption.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="ray: a pool of Ray actors, one model each; --out FOLDER/ then writes Parquet "
                              "(needs pip install -e .[scale])")
    caption.add_argument("--address", help="with --engine ray: join this Ray cluster (default: start a local one)")
    caption.add_argument("--device", default="cpu")
    caption.add_argument("--no-progress", action="store_true")
    _decode_arguments(caption)
    _runtime_arguments(caption)

    fallback = commands.add_parser("train-fallback", help="train the decoder that captions unsure photos from "
                                   "their tags, on captions alone (no photos)")
    fallback.add_argument("--captions", required=True, help="a caption text file: TSV with a caption column "
                          "(e.g. COCO captions), or lines ending in a caption (Flickr8k.token.txt)")
    fallback.add_argument("--out", required=True, help="run folder (best.pt, metrics.jsonl)")
    fallback.add_argument("--for-model", help="the model it will be exported into (default: the shipped model): "
                          "its encoder is used")
    fallback.add_argument("--dev-data", help="a refs.jsonl folder of photos unlike Flickr8k's: pick the epoch by its "
                          "CIDEr-D")
    fallback.add_argument("--without-people", action="store_true", help="leave out captions that name a person "
                          "(the tags cannot tell whether one is there)")
    fallback.add_argument("--epochs", type=int, default=3)
    fallback.add_argument("--seed", type=int, default=0)
    fallback.add_argument("--no-progress", action="store_true")

    export = commands.add_parser("export", help="copy a checkpoint for shipping (fp16, no optimizer state), or "
                                 "write it as ONNX graphs for other runtimes (--format onnx)")
    export.add_argument("checkpoint")
    export.add_argument("out", help="the checkpoint file to write, or with --format onnx a folder")
    export.add_argument("--format", choices=["pt", "onnx"], default="pt",
                        help="onnx: encoder.onnx (and encoder-int8.onnx when calibrated), decoder_init.onnx, "
                             "decoder_step.onnx and captioner.json (vocabulary, decoding defaults, image transform)")
    export.add_argument("--int8", action="store_true", help="with --format onnx: require the int8 encoder "
                        "(made by `captioner calibrate-int8`); without it, it is included when there is one")
    export.add_argument("--fp32", action="store_true", help="keep float32 weights")
    export.add_argument("--set", action="append", default=[], metavar="decode.KEY=VALUE",
                        help="change a stored decoding default, e.g. decode.length_penalty=0.5, or where "
                             "the model's data is (data.root=data/flickr8k, evaluate's default)")
    export.add_argument("--fit-confidence", action="store_true",
                        help="(re)compute the familiarity profile behind each caption's confidence from the "
                             "checkpoint's training data (its train and dev photos; encoded once, cached)")
    export.add_argument("--fallback", help="a decoder from `captioner train-fallback` to caption unsure photos "
                        "from their tags")
    export.add_argument("--data-root", help="with --fit-confidence: where that data is, if not at the checkpoint's "
                        "data.root")

    calibrate = commands.add_parser("calibrate-int8", help="quantize the CNN to int8 (ONNX Runtime, static, "
                                    "per-channel), calibrated on a sample of a dataset's training photos or of "
                                    "your own")
    photos = calibrate.add_mutually_exclusive_group(required=True)
    photos.add_argument("--data-root", help="the dataset (the checkpoint's data.format), e.g. data/flickr8k: "
                        "its training photos")
    photos.add_argument("--folder", help="a folder of your own photos instead (searched as `captioner caption` "
                        "searches one), e.g. the kind of photos you will caption")
    calibrate.add_argument("--checkpoint", help="whose encoder to quantize (default: the shipped model)")
    calibrate.add_argument("--images", type=int, default=256, help="photos to calibrate on (a fixed sample)")
    calibrate.add_argument("--float-convolutions", type=int, default=3, metavar="N",
                           help="the first N convolutions stay fp32 (the stem and first block are the most "
                                "sensitive to rounding; bench/int8.py)")
    calibrate.add_argument("--depthwise-weight-bits", type=int, choices=[7, 8], default=8,
                           help="bits of the depthwise convolutions' weights (the others have 7, which x86 CPUs "
                                "without VNNI need; ONNX Runtime's depthwise kernels widen before multiplying, "
                                "so 8 cannot saturate there)")
    calibrate.add_argument("--out", help="also write the int8 graph here (it is always kept where --precision "
                           "int8 finds it)")
    calibrate.add_argument("--no-progress", action="store_true")

    app = commands.add_parser("app", help="serve the web app (what `python app.py` does), offline on the CPU by "
                              "default, at http://127.0.0.1:7860")
    app.add_argument("--checkpoint", help="default: the model shipped with captioner")
    app.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    app.add_argument("--port", type=_port, default=7860)
    app.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    app.add_argument("--device", default="cpu")
    _runtime_arguments(app)

    download = commands.add_parser("download", help="fetch a dataset (needs internet)")
    download.add_argument("dataset", choices=["flickr8k"])
    download.add_argument("--root", required=True, help="folder to unpack into")
    download.add_argument("--base-url", help="where the release archives are served")
    return parser


def run(args) -> int:
    if args.command == "train":
        from .config import load_config
        from .train import train

        train(load_config(args.config, args.set), resume=args.resume, progress=not args.no_progress)
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate

        overrides = [*args.set, *_runtime_overrides(args)]
        if args.data:
            if args.split not in (None, "test"):
                raise ConfigError(f"--data scores every image of {args.data} as split test; leave out --split")
            # quoted: --set values are read as YAML, where a bare "a #b" would lose its comment-like tail
            overrides = [*overrides, "data.format=refs", f"data.root={json.dumps(args.data)}"]
        result = evaluate(args.checkpoint, args.split or "test", overrides,
                          _decode_options(args), args.out, args.device, progress=not args.no_progress)
        print(f"{result['dataset']} {result['split']} ({result['images']} images), beam {result['beam_size']}: "
              + _scores_text(result) + "; " + _hallucination_text(result))
        print(json.dumps(result))
        return 0
    if args.command == "caption":
        from .caption import caption_paths, is_folder_output
        from .inference import Captioner

        if args.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if args.workers is not None and args.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if args.engine == "ray":
            from .ray_engine import caption_with_ray

            return caption_with_ray(args.paths, args.checkpoint, args.out, args.batch_size, args.overwrite,
                                    progress=not args.no_progress, address=args.address, device=args.device,
                                    **_decode_options(args))
        if args.address:
            raise ConfigError("--address is for --engine ray")
        if is_folder_output(args.out):
            raise ConfigError(f"--out {args.out}: Parquet output to a folder needs --engine ray; "
                              f"use FILE.jsonl or FILE.csv")
        captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, runtime=args.runtime,
                                              precision=args.precision)
        return caption_paths(captioner, args.paths, args.out, args.batch_size, args.workers, args.overwrite,
                             progress=not args.no_progress, **_decode_options(args))
    if args.command == "train-fallback":
        from .train_fallback import train_fallback

        if args.epochs < 1:
            raise ConfigError("--epochs must be >= 1")
        from .checkpoint import load_checkpoint
        from .inference import DEFAULT_CHECKPOINT

        encoder = load_checkpoint(args.for_model or DEFAULT_CHECKPOINT)[0].encoder
        best = train_fallback(args.captions, args.out, encoder, epochs=args.epochs, seed=args.seed,
                              dev_folder=args.dev_data, without_people=args.without_people,
                              progress=not args.no_progress)
        print(f"fallback decoder: {best}")
        return 0
    if args.command == "export" and args.format == "onnx":
        from .export_onnx import export_onnx

        if args.fp32 or args.fit_confidence or args.fallback or args.data_root:
            raise ConfigError("--format onnx writes fp32 graphs of the model as it is; --fp32, --fit-confidence, "
                              "--fallback and --data-root are for checkpoints")
        manifest = export_onnx(args.checkpoint or None, args.out, args.set, int8=True if args.int8 else None)
        files = [graph["file"] for graph in manifest["graphs"].values()] + ["captioner.json"]
        print(f"wrote {', '.join(files)} to {args.out}")
        return 0
    if args.command == "export":
        from .checkpoint import export_checkpoint, load_checkpoint

        domain = None
        if args.fit_confidence:
            from .train import fit_domain_profile

            config = load_checkpoint(args.checkpoint)[0]
            if args.data_root:
                config.data.root = args.data_root
            domain = fit_domain_profile(config, "cpu").to_dict()
        elif args.data_root:
            raise ConfigError("--data-root is for --fit-confidence")
        export_checkpoint(args.checkpoint, args.out, half=not args.fp32, decode_overrides=args.set, domain=domain,
                          fallback=args.fallback)
        size = Path(args.out).stat().st_size / 1e6
        print(f"wrote {args.out} ({size:.1f} MB)")
        return 0
    if args.command == "calibrate-int8":
        from .checkpoint import load_checkpoint
        from .data import load_dataset
        from .encoder import encoder_from_config
        from .inference import DEFAULT_CHECKPOINT
        from .quantize import calibrate_int8

        if args.images < 1:
            raise ConfigError("--images must be >= 1")
        config = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)[0]
        config.encoder.runtime, config.encoder.precision = "onnx", "fp32"
        if args.folder:
            from .caption import collect_images

            photos, problems, _ = collect_images([args.folder])
            if problems:
                raise ConfigError(problems[0][1])
            source = f"photos of {args.folder}"
        else:
            config.data.root = args.data_root
            photos = [str(record.path) for record in load_dataset(config.data).split("train")]
            source = f"training photos of {args.data_root}"
        written, used = calibrate_int8(encoder_from_config(config.encoder), photos, count=args.images,
                                       progress=not args.no_progress, float_convolutions=args.float_convolutions,
                                       depthwise_weight_bits=args.depthwise_weight_bits)
        if args.out:
            import shutil

            shutil.copyfile(written, args.out)
        print(f"int8 encoder calibrated on {used} {source}: "
              f"{args.out or written}; use it with --precision int8")
        return 0
    if args.command == "app":
        from .webapp import serve

        return serve(args.checkpoint, args.host, args.port, args.share, args.device, args.runtime, args.precision)
    if args.command == "download":
        from .download import DEFAULT_BASE_URL, download_flickr8k

        root = download_flickr8k(args.root, base_url=args.base_url or DEFAULT_BASE_URL)
        print(f"Flickr8k is ready in {root}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .download import DownloadError
    from .encoder import EncoderError
    from .train import TrainingError
    from .transform import ImageLoadError

    expected = (ConfigError, CheckpointError, DatasetError, DownloadError, EncoderError, TrainingError,
                ImageLoadError, OSError)
    try:
        return run(args)
    except BrokenPipeError:  # stdout's reader stopped early (`... | head`): stop the work, quietly, as other tools do
        try:  # Python's flush of stdout at exit would fail again and print a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except expected as error:
        print(f"captioner: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
