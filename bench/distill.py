"""Teacher captions for distilling a mix of GRU seeds into one GRU (sequence-level distillation), on train only.

    python bench/distill.py --partner CKPT [CKPT ...] [--checkpoint captioner/models/default.pt]
                            [--data-root DIR] [--weight 0.333] [--references 0] [--out runs/distill/teacher.csv]

A mix of seeds writes better captions than any one of them but costs a decoder step per member
(bench/seed_partner.py). Here the mix (the model's own decoder, weight w, and the partners, sharing
1 - w) captions every train photo at the model's decoding settings, photo decoder only, and its n best
captions become the train split of a csv dataset (with --references N, each photo's first N
references too). Dev and test keep their references, so a run trained on the csv picks its epochs on
the real dev captions:

    captioner train --config configs/flickr8k-gru-scst.yaml --set data.format=csv \\
        --set data.annotations=runs/distill/teacher.csv --set data.root=DATA/images \\
        --set train.objective=xe --set train.init_from=captioner/models/default.pt ...

The image paths are the dataset's own, so the feature cache is shared with the original runs.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tqdm import tqdm

from captioner.describe import decode_features
from captioner.inference import Captioner

from seed_partner import add_mix_arguments, load_mix, with_partners  # bench/seed_partner.py, beside this script
from tune_cells import featured_splits  # bench/tune_cells.py

BATCH = 256


def teacher_rows(captioner: Captioner, features, records, n_best: int, references: int) -> list[dict]:
    """The searched (mixed) decoder's n best captions per train photo, as csv rows, with `references` references."""
    searched, decode, rows = captioner.writer.searched, captioner.config.decode, []
    for start in tqdm(range(0, len(records), BATCH), desc="teacher captions", unit="batch"):
        written = decode_features(searched, captioner.vocab, features[start:start + BATCH], decode, n_best)
        for record, captions in zip(records[start:start + BATCH], written):
            texts = [c.text for c in captions] + record.captions[:references]
            rows += [{"image": record.path.name, "caption": text, "split": "train"} for text in texts]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mix_arguments(parser)
    parser.add_argument("--weight", type=float, default=1 / 3, help="the model's own decoder's share of the mix")
    parser.add_argument("--n-best", type=int, default=1, help="teacher captions per train photo (beam's n best)")
    parser.add_argument("--references", type=int, default=0, help="original references kept per train photo")
    parser.add_argument("--out", default="runs/distill/teacher.csv")
    args = parser.parse_args(argv)

    captioner, partners = load_mix(args)
    teacher = with_partners(captioner, partners, args.weight)
    splits = featured_splits(captioner, ("train", "dev", "test"))
    rows = teacher_rows(teacher, *splits["train"], args.n_best, args.references)
    for split in ("dev", "test"):
        rows += [{"image": r.path.name, "caption": text, "split": split} for r in splits[split][1] for text in r.captions]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows ({len(splits['train'][1])} train photos) -> {out}")


if __name__ == "__main__":
    main()
