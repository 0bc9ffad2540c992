"""The captioner web app: `python app.py` serves the shipped model on http://127.0.0.1:7860.

The same as `captioner app` (webapp.serve); `python app.py --help` lists the options.
"""
from __future__ import annotations

import sys

from captioner.cli import main as captioner_main


def main(argv: list[str] | None = None) -> int:
    return captioner_main(["app", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
