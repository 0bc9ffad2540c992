"""Does forcing the top tag into the caption help? Constrained beam search (bench/constrained_search.py)
on the photos the model captions from the photo, scored on Flickr8k dev and captioned folders.

    python bench/constrained_tags.py --flickr8k DATA/flickr8k --folders DATA/coco-ood-dev [--above 0.3 0.5 0.7]

For each threshold: photos whose top tag is at least that probable, is a word the decoder can say
and is missing from its caption are decoded again with that word (singular or plural) required.
Captions from tags (the fallback) are left alone. Writes bench/results/constrained-tags.{md,json}.
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
from captioner.fallback import plural
from captioner.features import cached_features
from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.metrics import caption_scores, overlap_scores, without_person_dog
from captioner.text import tokenize

import constrained_search  # bench/constrained_search.py, beside this script


def constrain(captioner: Captioner, features: torch.Tensor, captions: list, above: float) -> tuple[list[str], list]:
    decode, words = captioner.config.decode, captioner.concept_words.words
    probability, top = captioner.concept_words.word_probabilities(captioner.encoder.classify(features)).max(1)
    rows, required = [], []
    for i, caption in enumerate(captions):
        word = words[top[i]]
        forms = [f for f in dict.fromkeys((word, plural(word))) if f in captioner.vocab.index]
        if caption.from_tags or probability[i] < above or not forms or set(caption.text.split()) & set(forms):
            continue
        rows.append(i)
        required.append([[captioner.vocab.index[f] for f in forms]])
    texts = [c.text for c in captions]
    if rows:
        found = constrained_search.constrained_beam_search(
            captioner.decoder, features[torch.tensor(rows)], required, beam_size=decode.beam_size,
            max_length=decode.max_length, min_length=decode.min_length,
            no_repeat_ngram_size=decode.no_repeat_ngram_size, length_penalty=decode.length_penalty)
        for i, hypotheses in zip(rows, found):
            texts[i] = " ".join(captioner.vocab.decode(hypotheses[0].tokens))
    return texts, [(captions[i].text, texts[i]) for i in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--flickr8k", help="Flickr8k folder: its dev split is scored")
    parser.add_argument("--folders", nargs="*", default=[], help="folders with refs.jsonl (e.g. coco-ood-dev)")
    parser.add_argument("--above", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    captioner = Captioner.from_checkpoint(args.checkpoint)
    sets = {"flickr8k dev": load_flickr8k(args.flickr8k).split("dev")} if args.flickr8k else {}
    sets.update({Path(folder).name: load_refs_folder(folder).split("test") for folder in args.folders})
    rows, examples = [], {}
    for name, records in sets.items():
        table = cached_features(captioner.encoder, [r.path for r in records], args.cache_dir, 4, 0, captioner.device,
                                True, grid=False)
        records = readable(records, table)
        features = table.lookup([r.path for r in records])
        captions = [c[0] for start in range(0, len(features), 128)
                    for c in captioner.describe(features[start:start + 128], captioner.config.decode)]
        references = [[tokenize(t) for t in r.captions] for r in records]
        subset = without_person_dog(references)
        for above in [None, *args.above]:
            texts, changed = (constrain(captioner, features, captions, above) if above is not None
                              else ([c.text for c in captions], []))
            hypotheses = [t.split() for t in texts]
            scores = caption_scores(references, hypotheses)
            row = {"set": name, "required_above": above, "changed": len(changed), "bleu4": scores["bleu4"],
                   "cider_d": scores["cider_d"], "person_dog_hallucination": scores["person_dog_hallucination"],
                   "cider_d_without_person_dog": overlap_scores([references[i] for i in subset],
                                                                [hypotheses[i] for i in subset])["cider_d"]
                   if subset else None}
            rows.append(row)
            print(json.dumps(row))
            if changed and above == args.above[len(args.above) // 2]:
                examples[name] = changed[:10]

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    columns = ["set", "required_above", "changed", "bleu4", "cider_d", "cider_d_without_person_dog",
               "person_dog_hallucination"]
    lines = [f"# Constrained beam search on the top tag: {args.checkpoint}", "",
             f"`python bench/constrained_tags.py` ({machine}); beam {captioner.config.decode.beam_size}; "
             "required_above `-`: the model as shipped.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    for name, changed in examples.items():
        lines += ["", f"## {name}: captions changed at {args.above[len(args.above) // 2]}", "",
                  "| before | with the tag required |", "|---|---|"] + [f"| {a} | {b} |" for a, b in changed]
    write_results(args.out, "constrained-tags", {"machine": machine, "rows": rows, "examples": examples},
                  "\n".join(lines) + "\n")
    print(f"wrote {Path(args.out) / 'constrained-tags.md'} and .json")


if __name__ == "__main__":
    main()
