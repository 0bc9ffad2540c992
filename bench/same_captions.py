"""Do two versions of captioner write the same rows? Compares `captioner caption` JSONL outputs.

    python bench/same_captions.py OLD.jsonl NEW.jsonl [OLD2.jsonl NEW2.jsonl ...] [--out FILE.md]

Rows are matched by file name; caption, score, confidence, unsure, from_tags and tags must be equal.
Every difference is listed. Exits 1 when any row differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIELDS = ("caption", "score", "confidence", "unsure", "from_tags", "tags", "error")


def rows_by_name(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {Path(row["path"]).name: row for row in rows}


def differences(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    found = [f"{name}: only in one file" for name in sorted(set(old) ^ set(new))]
    for name in sorted(set(old) & set(new)):
        for field in FIELDS:
            if old[name].get(field) != new[name].get(field):
                found.append(f"{name}: {field} {old[name].get(field)!r} -> {new[name].get(field)!r}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pairs: OLD.jsonl NEW.jsonl")
    parser.add_argument("--out", help="write the comparison as Markdown")
    args = parser.parse_args()
    if len(args.files) % 2:
        parser.error("give the files in pairs: OLD NEW")
    lines, total = ["| old | new | rows | differing fields |", "| --- | --- | --- | --- |"], []
    for old_path, new_path in zip(args.files[::2], args.files[1::2]):
        old, new = rows_by_name(Path(old_path)), rows_by_name(Path(new_path))
        found = differences(old, new)
        total += found
        lines.append(f"| {Path(old_path).name} | {Path(new_path).name} | {len(new)} | {len(found)} |")
    lines += [""] + [f"- {line}" for line in total] if total else ["", "Every row is identical."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
