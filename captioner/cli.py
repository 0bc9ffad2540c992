"""The `captioner` command: train, evaluate, caption, export, calibrate int8, serve the app, download.

Each command is an `add_*` function that declares its options and a `run_*` function that runs it.
`--set SECTION.KEY=VALUE` means one thing everywhere: change a config value. For `train` it changes
the run's config; for commands that use a trained model (caption, evaluate, app, export) it changes
that model's stored config for this run (export: in the file it writes), except what describes the
model itself (the decoder, the encoder's name and image size). The decoding and runtime flags are
shorthands for such settings (--beam-size 5 is --set decode.beam_size=5).

The run_* functions import what they need when they run, so that `captioner --help` and argument
errors answer at once, without importing torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError

EXIT_ERROR = 1
EXIT_BROKEN_PIPE = 141  # what a shell reports for a tool ended by SIGPIPE
DECODE_FLAGS = ("cells", "beam_size", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size")


# Options shared by commands

def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"change a config value, e.g. {example} (repeatable)")


def add_model_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """--checkpoint, --set and --device: which trained model, under which settings, where."""
    parser.add_argument("--checkpoint", help="default: the model shipped with captioner")
    add_set_option(parser, "routing.unsure_below=0.1 or decode.beam_size=5")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults: the checkpoint's decode settings)")
    group.add_argument("--cell", dest="cells", metavar="CELL", help="the photo decoder that writes: rnn, lstm or gru, "
                       "among the cells the model holds, or several together with weights, e.g. gru:0.6,lstm:0.4")
    group.add_argument("--beam-size", type=int, help="1 = greedy")
    group.add_argument("--max-length", type=int, help="most words per caption")
    group.add_argument("--min-length", type=int)
    group.add_argument("--length-penalty", type=float, help="score = log-prob / length**penalty")
    group.add_argument("--no-repeat-ngram-size", type=int, help="block repeated n-grams (0: off)")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how the CNN and the decoder's steps run on a CPU (default: the "
                                      "checkpoint's encoder settings, auto and fp32)")
    group.add_argument("--runtime", choices=["auto", "torch", "onnx"],
                       help="auto: ONNX Runtime when installed (faster), torch otherwise; a GPU always runs torch")
    group.add_argument("--precision", choices=["fp32", "int8"],
                       help="int8: the CNN quantized by `captioner calibrate-int8` (ONNX Runtime)")


def model_settings(args) -> list[str]:
    """--set, and the decoding and runtime flags given, as settings for Captioner.from_checkpoint."""
    flags = [(f"decode.{name}", getattr(args, name, None)) for name in DECODE_FLAGS]
    flags += [(f"encoder.{name}", getattr(args, name, None)) for name in ("runtime", "precision")]
    return [*args.set, *(f"{key}={value}" for key, value in flags if value is not None)]


def port_number(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 1 to 65535")
    return port


# train

def add_train(commands) -> None:
    train = commands.add_parser("train", help="train a decoder: the photo decoder on a dataset's photos (cached "
                                "features), or the tag decoder on captions alone (configs/tag-decoder.yaml)")
    train.add_argument("--config", help="YAML config (see configs/)")
    add_set_option(train, "train.epochs=5")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in train.out_dir from last.pt, under the run's own config: --config and "
                            "--set may change only train.epochs, train.patience, train.device, train.threads and "
                            "train.cache_dir; any other setting that differs from the run's is an error")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=run_train)


def run_train(args) -> int:
    from .config import load_config
    from .train import train

    train(load_config(args.config, args.set), resume=args.resume, progress=not args.no_progress)
    return 0


# evaluate

def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="BLEU-1..4, CIDEr-D, ROUGE-L and person/dog hallucination "
                                                    "of a checkpoint on a split")
    add_model_options(evaluate)
    evaluate.add_argument("--data", metavar="DIR", help="score on a folder of captioned images: DIR/refs.jsonl "
                          '({"image": NAME, "refs": [captions]} per line) and the images in DIR/images/ or DIR '
                          "(sets data.format=refs, data.root=DIR, split test)")
    evaluate.add_argument("--split", choices=["train", "dev", "val", "test"], help="default: test")
    evaluate.add_argument("--out", help="write the generated captions as JSONL")
    evaluate.add_argument("--no-progress", action="store_true")
    add_decode_options(evaluate)
    add_runtime_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from .evaluate import evaluate, scores_text

    settings = model_settings(args)
    if args.data:
        if args.split not in (None, "test"):
            raise ConfigError(f"--data scores every image of {args.data} as split test; leave out --split")
        # quoted: settings are read as YAML, where a bare "a #b" would lose its comment-like tail
        settings += ["data.format=refs", f"data.root={json.dumps(args.data)}"]
    result = evaluate(args.checkpoint, args.split or "test", settings, out=args.out, device=args.device,
                      progress=not args.no_progress)
    print(scores_text(result))
    print(json.dumps(result))
    return 0


# caption

def add_caption(commands) -> None:
    caption = commands.add_parser("caption", help="caption image files and folders")
    caption.add_argument("paths", nargs="+", metavar="PATH")
    add_model_options(caption)
    caption.add_argument("--out", help="write rows to FILE.jsonl or FILE.csv (default: print)")
    caption.add_argument("--batch-size", type=int, default=128,
                         help="images captioned together: beam search runs on the whole batch, the CNN on chunks "
                              "of 4 of them on a CPU (fastest there); a batch's rows are written once the next "
                              "batch is encoded (its search runs meanwhile) or at the end")
    caption.add_argument("--workers", type=int, help="processes decoding image files (local engine); default: 0 "
                         "on a CPU whose cores torch already uses (decoding there only takes turns with the CNN), "
                         "else 1")
    caption.add_argument("--overwrite", action="store_true", help="redo images already captioned in --out")
    caption.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="ray: a pool of Ray actors, one model each; --out FOLDER/ then writes Parquet "
                              "(needs pip install -e .[scale])")
    caption.add_argument("--address", help="with --engine ray: join this Ray cluster (default: start a local one)")
    caption.add_argument("--no-progress", action="store_true")
    add_decode_options(caption)
    add_runtime_options(caption)
    caption.set_defaults(run=run_caption)


def run_caption(args) -> int:
    from .caption import caption_paths, is_folder_output

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be >= 0")
    if args.engine == "ray":
        return run_caption_with_ray(args)
    if args.address:
        raise ConfigError("--address is for --engine ray")
    if is_folder_output(args.out):
        raise ConfigError(f"--out {args.out}: Parquet output to a folder needs --engine ray; "
                          f"use FILE.jsonl or FILE.csv")
    from .inference import Captioner

    captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, settings=model_settings(args))
    return caption_paths(captioner, args.paths, args.out, args.batch_size, args.workers, args.overwrite,
                         progress=not args.no_progress)


def run_caption_with_ray(args) -> int:
    from .ray_engine import caption_with_ray

    if args.workers is not None:
        raise ConfigError("--workers is for the local engine: each Ray actor reads its own files")
    return caption_with_ray(args.paths, args.checkpoint, args.out, args.batch_size, args.overwrite,
                            progress=not args.no_progress, address=args.address, device=args.device,
                            settings=model_settings(args))


# export

def add_export(commands) -> None:
    export = commands.add_parser("export", help="copy a checkpoint for shipping (fp16, no optimizer state), or "
                                 "write it as ONNX graphs for other runtimes (--format onnx)")
    export.add_argument("checkpoint")
    export.add_argument("out", help="the checkpoint file to write, or with --format onnx a folder")
    add_set_option(export, "decode.length_penalty=0.5 or routing.unsure_below=0.1 (stored in the export)")
    export.add_argument("--format", choices=["pt", "onnx"], default="pt",
                        help="onnx: encoder.onnx (and encoder-int8.onnx when calibrated), decoder_init.onnx, "
                             "decoder_step.onnx and captioner.json (vocabulary, decoding defaults, image transform)")
    export.add_argument("--int8", action="store_true", help="with --format onnx: require the int8 encoder "
                        "(made by `captioner calibrate-int8`); without it, it is included when there is one")
    export.add_argument("--fp32", action="store_true", help="keep float32 weights")
    export.add_argument("--fit-confidence", action="store_true",
                        help="(re)compute the familiarity profile behind each caption's confidence from the "
                             "checkpoint's training data (its train and dev photos; encoded once, cached)")
    export.add_argument("--fallback", metavar="TAG_DECODER", help="a tag decoder (best.pt of a run of "
                        "configs/tag-decoder.yaml) to caption unfamiliar photos from their tags")
    export.add_argument("--data-root", help="with --fit-confidence: where that data is, if not at the checkpoint's "
                        "data.root")
    export.add_argument("--add-cell", action="append", default=[], metavar="CHECKPOINT",
                        help="a photo decoder of another cell, trained on the same data and encoder, to ship beside "
                             "the checkpoint's own (`--cell` picks it); repeatable")
    export.set_defaults(run=run_export)


def run_export(args) -> int:
    if args.format == "onnx":
        return run_export_onnx(args)
    from .checkpoint import export_checkpoint

    domain = None
    if args.fit_confidence:
        from .checkpoint import load_checkpoint
        from .train import fit_domain_profile

        config = load_checkpoint(args.checkpoint)[0]
        if args.data_root:
            config.data.root = args.data_root
        domain = fit_domain_profile(config, "cpu").to_dict()
    elif args.data_root:
        raise ConfigError("--data-root is for --fit-confidence")
    export_checkpoint(args.checkpoint, args.out, half=not args.fp32, settings=args.set, domain=domain,
                      fallback=args.fallback, cells=args.add_cell)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


def run_export_onnx(args) -> int:
    from .export_onnx import export_onnx

    if args.fp32 or args.fit_confidence or args.fallback or args.data_root:
        raise ConfigError("--format onnx writes fp32 graphs of the model as it is; --fp32, --fit-confidence, "
                          "--fallback and --data-root are for checkpoints")
    manifest = export_onnx(args.checkpoint or None, args.out, args.set, int8=True if args.int8 else None)
    files = [graph["file"] for graph in manifest["graphs"].values()] + ["captioner.json"]
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


# calibrate-int8

def add_calibrate_int8(commands) -> None:
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
    calibrate.set_defaults(run=run_calibrate_int8)


def run_calibrate_int8(args) -> int:
    if args.images < 1:
        raise ConfigError("--images must be >= 1")
    written, used, source = calibrate_checkpoint(args)
    if args.out:
        import shutil

        shutil.copyfile(written, args.out)
    print(f"int8 encoder calibrated on {used} {source}: {args.out or written}; use it with --precision int8")
    return 0


def calibrate_checkpoint(args):
    """int8 for the CNN of --checkpoint (the shipped model), calibrated on the photos of --folder or on the
    training photos of --data-root: (the file written, how many photos calibrated it, where they came from)."""
    from .caption import collect_images
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .inference import DEFAULT_CHECKPOINT
    from .onnx_runtime import encoder_from_config
    from .quantize import calibrate_int8

    config = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)[0]
    config.encoder.runtime, config.encoder.precision = "onnx", "fp32"
    if args.folder:
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
    return written, used, source


# app and download

def add_app(commands) -> None:
    app = commands.add_parser("app", help="serve the web app (what `python app.py` does), offline on the CPU by "
                              "default, at http://127.0.0.1:7860")
    add_model_options(app)
    app.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    app.add_argument("--port", type=port_number, default=7860)
    app.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    app.add_argument("--password-file", metavar="FILE",
                     help="a file whose first line is the password the page and the API ask for (or set "
                     "CAPTIONER_APP_PASSWORD); without one, --share or a --host others can reach is open to anyone")
    add_runtime_options(app)
    app.set_defaults(run=run_app)


def run_app(args) -> int:
    from .webapp import read_password, serve

    return serve(args.checkpoint, args.host, args.port, args.share, args.device, settings=model_settings(args),
                 password=read_password(args.password_file))


def add_download(commands) -> None:
    download = commands.add_parser("download", help="fetch a dataset (needs internet)")
    download.add_argument("dataset", choices=["flickr8k"])
    download.add_argument("--root", required=True, help="folder to unpack into")
    download.add_argument("--base-url", help="where the release archives are served")
    download.set_defaults(run=run_download)


def run_download(args) -> int:
    from .download import DEFAULT_BASE_URL, download_flickr8k

    root = download_flickr8k(args.root, base_url=args.base_url or DEFAULT_BASE_URL)
    print(f"Flickr8k is ready in {root}")
    return 0


COMMANDS = (add_train, add_evaluate, add_caption, add_export, add_calibrate_int8, add_app, add_download)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


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
        return args.run(args)
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
