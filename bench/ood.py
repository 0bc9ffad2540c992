"""Photos outside Flickr8k: one model scored on Flickr8k and on captioned folders side by side.

    python bench/ood.py --flickr8k DATA/flickr8k --folders DATA/coco-ood-dev [--checkpoint CKPT] [--name NAME]

Each photo goes through the same path as `captioner caption` (Captioner.describe: caption, tags,
confidence). Per set: BLEU-1/4, CIDEr-D, the person/dog hallucination rate and CIDEr-D of the photos
whose references name neither, and how many captions are marked unsure. The first 20 photos of each
folder are listed by file name with their caption, tags and first reference. Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from captioner.data import load_flickr8k, load_refs_folder
from captioner.evaluate import readable
from captioner.features import cached_features
from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.metrics import caption_scores, overlap_scores, without_person_dog
from captioner.text import tokenize


def score_records(captioner: Captioner, records, cache_dir: str) -> tuple[dict, list]:
    table = cached_features(captioner.encoder, [r.path for r in records], cache_dir, 4, 0, captioner.device, True,
                            grid=captioner.decoder.uses_grid)
    records = readable(records, table)
    features = table.lookup([r.path for r in records])
    captions = []
    for start in range(0, len(features), 128):
        captions += [c[0] for c in captioner.describe(features[start:start + 128])]
    references = [[tokenize(t) for t in r.captions] for r in records]
    hypotheses = [c.text.split() for c in captions]
    subset = without_person_dog(references)
    result = {"images": len(records), **caption_scores(references, hypotheses),
              "unsure": sum(c.unsure for c in captions) / len(captions)}
    if subset:
        sub = overlap_scores([references[i] for i in subset], [hypotheses[i] for i in subset])
        result.update(cider_d_without_person_dog=sub["cider_d"], bleu4_without_person_dog=sub["bleu4"],
                      unsure_without_person_dog=sum(captions[i].unsure for i in subset) / len(subset))
    rows = [{"image": r.path.name, "caption": c.text, "tags": c.tags, "confidence": c.confidence,
             "unsure": c.unsure, "reference": r.captions[0]} for r, c in zip(records, captions)]
    return result, rows


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--flickr8k", help="Flickr8k folder: its dev and test splits are scored")
    parser.add_argument("--splits", nargs="+", default=["dev"], help="Flickr8k splits to score (test: once, at the end)")
    parser.add_argument("--folders", nargs="*", default=[], help="folders with refs.jsonl (e.g. coco-ood-dev)")
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="ood")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="score with a setting changed, e.g. routing.unseen_dog_below=0 (the dog check off)")
    args = parser.parse_args()

    captioner = Captioner.from_checkpoint(args.checkpoint, settings=args.set)
    sets = {}
    if args.flickr8k:
        flickr8k = load_flickr8k(args.flickr8k)
        sets.update({f"flickr8k {split}": flickr8k.split(split) for split in args.splits})
    for folder in args.folders:
        sets[Path(folder).name] = load_refs_folder(folder).split("test")
    results, listings = {}, {}
    for name, records in sets.items():
        results[name], rows = score_records(captioner, records, args.cache_dir)
        listings[name] = sorted(rows, key=lambda row: row["image"])[:20]
        print(name, json.dumps(results[name]))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    columns = ["images", "bleu1", "bleu4", "cider_d", "person_dog_hallucination", "images_without_person_dog",
               "cider_d_without_person_dog", "unsure", "unsure_without_person_dog"]
    lines = [f"# {args.name}: {args.checkpoint}{''.join(' --set ' + o for o in args.set)}", "", f"`python bench/ood.py` ({machine}); decoding: the model's "
             f"defaults (beam {captioner.config.decode.beam_size}).", "",
             "| set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for name, r in results.items()]
    for name, rows in listings.items():
        if name.startswith("flickr8k"):
            continue
        lines += ["", f"## {name}: the first 20 photos by file name", "", "| photo | caption | tags | unsure | a reference |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['image']} | {r['caption']} | {', '.join(f'{w} {p:.2f}' for w, p in r['tags'])} | "
                  f"{'yes' if r['unsure'] else ''} | {r['reference']} |" for r in rows]
    write_results(args.out, args.name, {"checkpoint": args.checkpoint, "machine": machine, "results": results,
                                        "first_20": listings}, "\n".join(lines) + "\n")
    print(f"wrote {Path(args.out) / args.name}.md and .json")


if __name__ == "__main__":
    main()
