"""Image files -> encoder features, batched, with a progress bar, cached on disk in fp16.

The cache is keyed by the encoder (name, weights fingerprint, transform, runtime and precision) and by the list of
files (path, size, mtime), so training epochs and later evaluations never run the CNN again.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .encoder import Encoder
from .files import atomic_save
from .transform import ImageLoadError, ImageSource, ImageTransform


class _ImageFiles(Dataset):
    def __init__(self, sources: Sequence[ImageSource], transform: ImageTransform):
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:
            return index, self.transform.load(self.sources[index]), None
        except ImageLoadError as error:
            return index, None, str(error)


def _collate(items):
    good = [(i, t) for i, t, _ in items if t is not None]
    errors = [(i, e) for i, _, e in items if e is not None]
    images = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], images, errors


IN_PROCESS_UP_TO = 64  # starting a worker process costs 0.1-0.4 s, more than decoding this many small JPEGs


def iter_image_batches(sources: Sequence[ImageSource], transform: ImageTransform, batch_size: int,
                       num_workers: int) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Decode and transform images in worker processes: yields (indices, batch, [(index, error)]).

    Without worker processes the next batch is decoded in a thread while the caller encodes this one (Pillow
    releases the interpreter lock while it decodes): part of caption_files' gain in bench/speed.py."""
    in_memory = any(not isinstance(s, (str, Path)) for s in sources)
    workers = 0 if in_memory or len(sources) <= max(batch_size, IN_PROCESS_UP_TO) else num_workers
    loader = DataLoader(_ImageFiles(sources, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, persistent_workers=False)
    if workers:
        yield from loader
        return
    batches = iter(loader)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-decode") as decoder:
        upcoming = decoder.submit(next, batches, None)
        while (batch := upcoming.result()) is not None:
            upcoming = decoder.submit(next, batches, None)
            yield batch


@torch.inference_mode()
def extract_features(encoder: Encoder, paths: Sequence[ImageSource], batch_size: int = 16, num_workers: int = 1,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "encoding images",
                     grid: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """Features in fp16, pooled [N, D] or grid cells [N, H * W, D] (zeros where an image failed), and
    {index: reason} for failures."""
    encoder = encoder.to(device)
    features = None if grid else torch.zeros(len(paths), encoder.feature_dim, dtype=torch.float16)
    failed: dict[int, str] = {}
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for indices, images, errors in iter_image_batches(paths, encoder.transform, batch_size, num_workers):
            failed.update(errors)
            if images is not None:
                encoded = encoder.encode(images.to(device), grid).to("cpu", torch.float16)
                if features is None:  # the grid's size is known once the CNN has run
                    features = torch.zeros(len(paths), *encoded.shape[1:], dtype=torch.float16)
                features[indices] = encoded
            bar.update(len(indices) + len(errors))
    if features is None:  # no image could be read: a grid of no cells
        features = torch.zeros(len(paths), 0, encoder.feature_dim, dtype=torch.float16)
    return features, failed


@dataclass
class FeatureTable:
    """Features of a set of image files, looked up by path."""

    paths: list[str]
    features: torch.Tensor  # [N, D] fp16
    failed: dict[str, str]  # path -> reason the image could not be read

    def __post_init__(self):
        self.row = {p: i for i, p in enumerate(self.paths)}

    def lookup(self, paths: Sequence[str | Path]) -> torch.Tensor:
        return self.features[[self.row[str(p)] for p in paths]]


def cached_features(encoder: Encoder, paths: Sequence[str | Path], cache_dir: str | Path, batch_size: int = 16,
                    num_workers: int = 1, device: str | torch.device = "cpu", progress: bool = True,
                    grid: bool = False) -> FeatureTable:
    paths = sorted({str(p) for p in paths})
    listing = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        listing.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    folder = Path(cache_dir) / (encoder.cache_key(device) + ("-grid" if grid else ""))
    cache_file = folder / f"{listing.hexdigest()[:20]}.pt"
    if cache_file.is_file():
        try:
            saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            if saved["paths"] == paths:
                return FeatureTable(saved["paths"], saved["features"], saved["failed"])
        except Exception as error:  # a damaged cache is rebuilt, not trusted
            print(f"warning: ignoring unreadable feature cache {cache_file}: {error}", file=sys.stderr)
    features, failed = extract_features(encoder, paths, batch_size, num_workers, device, progress,
                                        desc=f"encoding {len(paths)} images ({encoder.name})", grid=grid)
    table = FeatureTable(paths, features, {paths[i]: reason for i, reason in failed.items()})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save({"paths": table.paths, "features": table.features, "failed": table.failed}, cache_file)
    return table
