"""Caption image files and folders: one row per image, written as soon as it is produced.

Rows are {"path", "caption", "score", "confidence", "unsure", "from_tags", "tags"} or {"path", "error"}; printed
as tab-separated lines, or written to JSONL or CSV by the output file's extension. `tags` are the
photo's visual concepts as [word, probability] pairs (concepts.py); `confidence` is how familiar the
photo is to the model (confidence.py); `unsure` says not to trust the caption and `from_tags` that the tag
decoder wrote it from the tags instead of the photo decoder from the photo (routing.py). Rerunning with the same output file
keeps the rows already captioned and does the rest (errors are retried), so an interrupted run
loses nothing and no image gets two rows.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .describe import Caption
from .folders import caption_files
from .inference import Captioner
from .transform import AVIF_BRANDS, HEIF_BRANDS, media_brand

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
                  ".avif"}
EXIT_SOME_FAILED = 3
FIELDS = ["path", "caption", "score", "confidence", "unsure", "from_tags", "tags", "error"]


def looks_like_image(path: Path) -> bool:
    """Sniff the first bytes: JPEG, PNG, GIF, BMP, TIFF, WebP, HEIC/HEIF or AVIF, whatever the file is called."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return (head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or media_brand(head) in HEIF_BRANDS | AVIF_BRANDS)


def collect_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]], int]:
    """(image paths in a fixed order, [(path, problem)], number of non-image files skipped).

    In folders (searched recursively, sorted), a file is taken when its content is an image or
    its name says it is one (so a broken .jpg is reported, not silently skipped). Files named
    on the command line are always taken.
    """
    paths, problems, skipped = [], [], 0
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = []
            for child in sorted(path.rglob("*"), key=lambda p: str(p)):
                if child.is_dir():
                    continue
                if child.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(child):
                    found.append(str(child))
                else:
                    skipped += 1
            if not found:
                problems.append((given, f"{given}: no images found in this folder"))
            paths += found
        elif path.exists() or path.is_symlink():
            paths.append(str(path))
        else:
            problems.append((given, f"{given}: no such file or folder"))
    return list(dict.fromkeys(paths)), problems, skipped


def printable(path: str) -> str:
    """A file name as text for the output: undecodable bytes become backslash escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier output file; a last line cut off by an interruption is dropped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        return list(csv.DictReader(io.StringIO(complete, newline="")))
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RowWriter:
    """Writes each row at once and flushes it, so an interrupted run keeps what it did."""

    def __init__(self, out: str | None, keep: list[dict] = ()):
        self.out = out
        self.kind = "print" if not out else "csv" if out.lower().endswith(".csv") else "jsonl"
        if not out:
            self.handle = sys.stdout
            return
        temporary = Path(out).with_name(f".{Path(out).name}.tmp")
        try:
            temporary.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(temporary, "w", encoding="utf-8", newline="")
        except OSError as error:
            raise OSError(error.errno, f"cannot write {out}: {error.strerror or error}") from None
        if self.kind == "csv":
            self.csv = csv.DictWriter(self.handle, fieldnames=FIELDS)
            self.csv.writeheader()
        for row in keep:
            self.write(row)
        os.replace(temporary, out)  # the kept rows are on disk before any new work starts

    def write(self, row: dict) -> None:
        try:
            self._write(row)
        except OSError as error:  # e.g. a full disk: stop with a message, keep what is written
            if isinstance(error, BrokenPipeError) and not self.out:
                raise  # stdout's reader has gone (`captioner caption DIR | head`): cli.main stops quietly
            raise OSError(error.errno, f"could not write to {self.out or 'stdout'}: {error.strerror or error}") from None

    def _write(self, row: dict) -> None:
        if self.kind == "print":
            text = row["caption"] if row.get("caption") else f"ERROR {row['error']}"
            if row.get("unsure"):
                seen = tags_text(row.get("tags")) or "nothing the model knows"
                text += f"  [unsure, written from the tags: {seen}]" if row.get("from_tags") else \
                    f"  [unsure; the photo shows: {seen}]"
            self.handle.write(f"{row['path']}\t{text}\n")
        elif self.kind == "csv":
            self.csv.writerow({k: tags_text(row.get(k)) if k == "tags" else row.get(k, "") for k in FIELDS})
        else:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.out:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()


def is_folder_output(out: str | None) -> bool:
    """--out names a folder (ends with '/', or an existing folder without a suffix): Parquet files go there."""
    return bool(out) and (out.endswith(("/", os.sep)) or (not Path(out).suffix and Path(out).is_dir()))


@dataclass
class CaptionPlan:
    """What a run has to do: images still to caption, rows kept from an earlier run, inputs that failed."""

    todo: list[str]
    done: list[dict]
    problems: list[tuple[str, str]]  # (input, why it gave no images)
    skipped: int  # non-image files in folders


def plan_captioning(inputs: list[str], out: str | None = None, overwrite: bool = False) -> CaptionPlan:
    """Find the images; when `out` holds rows from an earlier run, keep its captions and plan only the rest."""
    paths, problems, skipped = collect_images(inputs)
    if not paths:
        raise FileNotFoundError("; ".join(problem for _, problem in problems) or "no inputs given")
    done: list[dict] = []
    if out and Path(out).is_file() and not overwrite:
        wanted = {printable(p) for p in paths}
        done = [r for r in read_rows(Path(out)) if r.get("caption") and r.get("path") in wanted]
        done = list({r["path"]: r for r in done}.values())
        if done:
            print(f"{out}: {len(done)} images already captioned, skipping them (--overwrite to redo)", file=sys.stderr)
    already = {r["path"] for r in done}
    return CaptionPlan([p for p in paths if printable(p) not in already], done, problems, skipped)


def tags_text(tags) -> str:
    """[[word, probability], ...] -> "cat 0.96; sofa 0.12" (a CSV cell); text read back from a CSV stays as it is."""
    if not tags or isinstance(tags, str):
        return tags or ""
    return "; ".join(f"{word} {probability:.2f}" for word, probability in tags)


def caption_row(path: str, caption: Caption) -> dict:
    row = {"path": printable(path), "caption": caption.text, "score": round(caption.score, 4)}
    if caption.confidence is not None:
        row["confidence"] = round(caption.confidence, 3)
    # A model without a familiarity profile still marks captions its tag checks route to the fallback.
    row.update(unsure=caption.unsure, from_tags=caption.from_tags)
    return {**row, "tags": [[word, probability] for word, probability in caption.tags]}


def error_row(path: str, error: str) -> dict:
    return {"path": printable(path), "error": printable(error)}


def write_captions(plan: CaptionPlan, rows: Iterable[dict], out: str | None = None, progress: bool = True) -> int:
    """Write the kept rows, one error row per problem, then `rows` (one per plan.todo) as they come.

    Returns the exit status: 0 all good, 3 some failed.
    """
    writer = RowWriter(out, plan.done)
    captioned, failed = 0, len(plan.problems)
    try:
        for given, problem in plan.problems:
            writer.write(error_row(given, problem))
            print(f"error: {printable(problem)}", file=sys.stderr)
        with tqdm(total=len(plan.todo), desc="captioning", unit="img", disable=not progress or not out,
                  file=sys.stderr) as bar:
            for row in rows:
                writer.write(row)
                if "error" in row:
                    print(f"error: {row['error']}", file=sys.stderr)
                    failed += 1
                else:
                    captioned += 1
                bar.update(1)
    finally:
        writer.close()
    print(f"captioned {captioned}, failed {failed}, skipped {plan.skipped} non-image files"
          + (f", {len(plan.done)} done before" if plan.done else "") + (f"; rows in {out}" if out else ""),
          file=sys.stderr)
    return 0 if failed == 0 else EXIT_SOME_FAILED


def caption_paths(captioner: Captioner, inputs: list[str], out: str | None = None, batch_size: int = 128,
                  num_workers: int | None = None, overwrite: bool = False, progress: bool = True,
                  **decode_options) -> int:
    """Caption everything under `inputs`; returns the exit status (0 all good, 3 some failed)."""
    plan = plan_captioning(inputs, out, overwrite)
    results = caption_files(captioner, plan.todo, batch_size, num_workers, **decode_options)
    rows = (caption_row(plan.todo[index], captions[0]) if error is None else error_row(plan.todo[index], error)
            for index, captions, error in results)
    return write_captions(plan, rows, out, progress)
