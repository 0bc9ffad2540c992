"""The captioner web app: `python app.py` serves the shipped model on http://127.0.0.1:7860."""
from __future__ import annotations

import argparse
import sys

from captioner.checkpoint import CheckpointError
from captioner.inference import Captioner
from captioner.webapp import MAX_FILE_SIZE, build_app, warm_up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="default: the model shipped with captioner")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"app: error: {error}", file=sys.stderr)
        return 1
    warm_up(captioner)
    build_app(captioner).launch(server_name=args.host, server_port=args.port, share=args.share,
                                max_file_size=MAX_FILE_SIZE, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
