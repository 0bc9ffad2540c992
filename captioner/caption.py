"""Caption image files and folders: one row per image, written as soon as it is produced.

Rows are {"path", "caption", "score"} or {"path", "error"}; printed as lines, or written to
JSONL or CSV by the output file's extension.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .inference import Captioner

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXIT_SOME_FAILED = 3


def collect_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths in a deterministic order (folders recursively, sorted) and (path, problem) pairs."""
    paths, problems = [], []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not found:
                problems.append((given, f"{given}: no images found in this folder"))
            paths += found
        elif path.exists() or path.is_symlink():
            paths.append(str(path))
        else:
            problems.append((given, f"{given}: no such file or folder"))
    return list(dict.fromkeys(paths)), problems


class RowWriter:
    """Writes each row at once and flushes, so an interrupted run keeps what it did."""

    def __init__(self, out: str | None):
        self.out = out
        self.kind = "print" if not out else "csv" if out.lower().endswith(".csv") else "jsonl"
        self.handle = open(out, "w", encoding="utf-8", newline="") if out else sys.stdout
        if self.kind == "csv":
            self.csv = csv.DictWriter(self.handle, fieldnames=["path", "caption", "score", "error"])
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.kind == "print":
            text = row["caption"] if "caption" in row else f"ERROR {row['error']}"
            self.handle.write(f"{row['path']}\t{text}\n")
        elif self.kind == "csv":
            self.csv.writerow(row)
        else:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.out:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()


def caption_paths(captioner: Captioner, inputs: list[str], out: str | None = None, batch_size: int = 16,
                  num_workers: int = 1, progress: bool = True, **decode_options) -> int:
    """Caption everything under `inputs`; returns the exit status (0 all good, 3 some failed)."""
    paths, problems = collect_images(inputs)
    if not paths:
        raise FileNotFoundError("; ".join(problem for _, problem in problems) or "no inputs given")
    writer = RowWriter(out)
    captioned, failed = 0, len(problems)
    try:
        for given, problem in problems:
            writer.write({"path": given, "error": problem})
            print(f"error: {problem}", file=sys.stderr)
        with tqdm(total=len(paths), desc="captioning", unit="img", disable=not progress or not out,
                  file=sys.stderr) as bar:
            for index, captions, error in captioner.caption_files(paths, batch_size, num_workers, **decode_options):
                if error is None:
                    writer.write({"path": paths[index], "caption": captions[0].text, "score": round(captions[0].score, 4)})
                    captioned += 1
                else:
                    writer.write({"path": paths[index], "error": error})
                    print(f"error: {error}", file=sys.stderr)
                    failed += 1
                bar.update(1)
    finally:
        writer.close()
    print(f"captioned {captioned}, failed {failed}" + (f"; rows in {out}" if out else ""), file=sys.stderr)
    return 0 if failed == 0 else EXIT_SOME_FAILED
