"""The captioner web app: `python app.py` serves the shipped model on http://127.0.0.1:7860."""
from __future__ import annotations

import argparse
import errno
import socket
import sys

from captioner.checkpoint import CheckpointError
from captioner.inference import Captioner
from captioner.webapp import MAX_FILE_SIZE, build_app, warm_up


def port_number(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 1 to 65535")
    return port


def cannot_serve_on(host: str, port: int) -> str | None:
    """Why the app could not listen on host:port (in use, or an address this machine does not have), or None."""
    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is in use (another app.py running?): use --port N"
        return f"cannot serve on {host}:{port}: {error.strerror or error} (check --host)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="default: the model shipped with captioner")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    problem = cannot_serve_on(args.host, args.port)  # before the model loads: say it at once
    if problem:
        print(f"app: error: {problem}", file=sys.stderr)
        return 1
    try:
        captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"app: error: {error}", file=sys.stderr)
        return 1
    warm_up(captioner)
    try:
        build_app(captioner).launch(server_name=args.host, server_port=args.port, share=args.share,
                                    max_file_size=MAX_FILE_SIZE, show_error=True)
    except OSError as error:  # the port was taken while the model loaded
        print(f"app: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
