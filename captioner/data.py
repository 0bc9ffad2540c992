"""Caption datasets: (image path, reference captions) per image, for the train/dev/test splits.

Four formats read into the same shape:
- flickr8k: the original release layout (an images folder, Flickr8k.token.txt, three split files);
- karpathy: Karpathy's split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json);
- csv: `image,caption[,split]` rows, several per image, for users' own data;
- refs: a folder of captioned images to score on (refs.jsonl, every image in split test).
Problems in the data (captions without an image, images in no split, identical files) are
reported in `CaptionDataset.notes`, never silently dropped.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig

SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"train": "train", "restval": "train", "dev": "dev", "val": "dev", "valid": "dev",
                  "validation": "dev", "test": "test"}


class DatasetError(ValueError):
    """A dataset that cannot be read: missing files, malformed lines, an empty split."""


@dataclass
class ImageRecord:
    path: Path
    captions: list[str]


@dataclass
class CaptionDataset:
    name: str
    splits: dict[str, list[ImageRecord]]
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[ImageRecord]:
        name = _SPLIT_ALIASES.get(name, name)
        records = self.splits.get(name, [])
        if not records:
            raise DatasetError(f"{self.name}: split '{name}' has no images")
        return records


def load_dataset(config: DataConfig) -> CaptionDataset:
    loaders = {"flickr8k": load_flickr8k, "karpathy": load_karpathy_json, "csv": load_csv}
    if config.format == "flickr8k":
        return load_flickr8k(config.root)
    if config.format == "refs":
        return load_refs_folder(config.root)
    if not config.annotations:
        raise DatasetError(f"data.format={config.format} needs data.annotations (the {config.format} file)")
    return loaders[config.format](config.annotations, config.root)


def load_flickr8k(root: str | Path) -> CaptionDataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Flickr8k folder not found: {root} (get it with: captioner download flickr8k --root {root})")
    image_dir = next((root / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset") if (root / d).is_dir()), None)
    if image_dir is None:
        raise DatasetError(f"{root}: no images folder (expected images/ or Flicker8k_Dataset/)")
    token_file = root / "Flickr8k.token.txt"
    captions: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(_read_lines(token_file), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name = key.rsplit("#", 1)[0]
        if not tab or "#" not in key or not caption.strip():
            raise DatasetError(f"{token_file}:{number}: expected '<image>#<n><TAB><caption>', got {line[:80]!r}")
        captions[name].append(caption.strip())

    notes = []
    splits: dict[str, list[ImageRecord]] = {}
    in_split: set[str] = set()
    for split, filename in zip(SPLITS, ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")):
        names = [n.strip() for n in _read_lines(root / filename) if n.strip()]
        in_split.update(names)
        records = []
        for name in names:
            path = image_dir / name
            if name not in captions:
                notes.append(f"{split}: {name} has no captions; left out")
            elif not path.is_file():
                notes.append(f"{split}: {name} has captions but no image file; left out")
            else:
                records.append(ImageRecord(path, captions[name]))
        splits[split] = records
    missing = sorted(n for n in captions if n not in in_split and not (image_dir / n).is_file())
    notes += [f"{n} has captions but no image file (and is in no split)" for n in missing]
    unsplit = [n for n in captions if n not in in_split and (image_dir / n).is_file()]
    if unsplit:
        notes.append(f"{len(unsplit)} captioned images belong to no split; not used")
    dataset = CaptionDataset("flickr8k", splits, notes)
    dataset.notes += find_identical_images(dataset)
    return dataset


def load_karpathy_json(annotations: str | Path, image_root: str | Path) -> CaptionDataset:
    annotations, image_root = Path(annotations), Path(image_root)
    try:
        data = json.loads(_read_text(annotations))
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(f"{annotations}: not a Karpathy split JSON ({error})") from None
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    notes = []
    for entry in images:
        try:
            split = _SPLIT_ALIASES[entry["split"]]
            path = image_root / entry.get("filepath", "") / entry["filename"]
            captions = [s.get("raw") or " ".join(s["tokens"]) for s in entry["sentences"]]
        except KeyError as error:
            raise DatasetError(f"{annotations}: image entry without {error}: {str(entry)[:120]}") from None
        if not path.is_file():
            notes.append(f"{split}: {path} listed but not found; left out")
        elif captions:
            splits[split].append(ImageRecord(path, captions))
    return CaptionDataset(data.get("dataset", annotations.stem), splits, notes)


def load_csv(annotations: str | Path, image_root: str | Path = "") -> CaptionDataset:
    """Rows of image,caption[,split]. Without a split column, images are split 90/5/5 by a hash of their name."""
    annotations = Path(annotations)
    image_root = Path(image_root) if str(image_root) else annotations.parent
    rows = list(csv.DictReader(_read_text(annotations).splitlines()))
    if not rows or not {"image", "caption"} <= set(rows[0]):
        raise DatasetError(f"{annotations}: expected a header with columns image,caption (and optionally split)")
    captions: dict[str, list[str]] = defaultdict(list)
    split_of: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
        if not image or not caption:
            raise DatasetError(f"{annotations}:{number}: empty image or caption")
        captions[image].append(caption)
        raw_split = (row.get("split") or "").strip().lower()
        if raw_split and raw_split not in _SPLIT_ALIASES:
            raise DatasetError(f"{annotations}:{number}: unknown split {raw_split!r} (use train, dev or test)")
        split_of[image] = _SPLIT_ALIASES[raw_split] if raw_split else _hash_split(image)
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    notes = []
    for image, texts in captions.items():
        path = image_root / image
        if path.is_file():
            splits[split_of[image]].append(ImageRecord(path, texts))
        else:
            notes.append(f"{path} listed but not found; left out")
    return CaptionDataset(annotations.stem, splits, notes)


def load_refs_folder(root: str | Path) -> CaptionDataset:
    """A folder with refs.jsonl, one `{"image": NAME, "refs": [caption, ...]}` line per image, and the
    images in images/ or beside refs.jsonl. Every image is in split test: the folder is scored, not trained on."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"refs folder not found: {root}")
    refs_file = root / "refs.jsonl"
    image_dir = root / "images" if (root / "images").is_dir() else root
    records, notes, seen = [], [], set()
    for number, line in enumerate(_read_lines(refs_file), start=1):
        if not line.strip():
            continue
        where = f"{refs_file}:{number}"
        try:
            entry = json.loads(line)
            name, captions = entry["image"], entry["refs"]
        except (json.JSONDecodeError, KeyError, TypeError):
            name, captions = None, None
        if not isinstance(name, str) or not name or not isinstance(captions, list) \
                or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f'{where}: expected {{"image": "NAME.jpg", "refs": ["caption", ...]}}, '
                               f"got {line[:80]!r}")
        captions = [c.strip() for c in captions if c.strip()]
        if not captions:
            raise DatasetError(f"{where}: {name} has no reference captions")
        if name in seen:
            raise DatasetError(f"{where}: {name} is listed twice")
        seen.add(name)
        path = image_dir / name
        if path.is_file():
            records.append(ImageRecord(path, captions))
        else:
            notes.append(f"test: {path} listed but not found; left out")
    return CaptionDataset(root.resolve().name, {"train": [], "dev": [], "test": records}, notes)


def find_identical_images(dataset: CaptionDataset) -> list[str]:
    """Byte-identical image files, flagged as leakage when they sit in different splits."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for split, records in dataset.splits.items():
        for record in records:
            by_size[record.path.stat().st_size].append((split, record.path))
    notes = []
    for group in by_size.values():
        if len(group) < 2:
            continue
        by_hash: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for split, path in group:
            by_hash[hashlib.sha256(path.read_bytes()).hexdigest()].append((split, path))
        for same in by_hash.values():
            if len(same) > 1:
                splits = sorted({s for s, _ in same})
                kind = "LEAKAGE across splits" if len(splits) > 1 else f"both in {splits[0]}"
                notes.append(f"identical image files ({kind}): " + ", ".join(p.name for _, p in same))
    return notes


def _hash_split(name: str) -> str:
    bucket = int(hashlib.md5(name.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "dev" if bucket < 95 else "test"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None


def _read_lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()
