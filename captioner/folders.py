"""Many photos at speed: decoding, the CNN and the search overlap (`captioner caption`, the app, Ray).

    files -> worker processes decode and transform them (features.iter_image_batches)
          -> the CNN encodes a few at a time, the features gather into batches of `batch_size`
          -> each batch is searched in a thread while the CNN goes on with the next one

The captions are the same as Captioner.caption's one photo at a time (the search is exact per photo).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .describe import Caption
from .features import iter_image_batches
from .inference import DECODE_BATCH, Captioner

GPU_DECODE_WORKERS = 8


def default_workers(device: torch.device) -> int:
    """Processes decoding image files. On a GPU, where the CNN and the search take milliseconds a batch and
    decoding sets the pace, one per spare core up to GPU_DECODE_WORKERS (bench/gpu_folder.py, an H200 with
    16 cores: 198 images/s with 1, 951 with 8, 1,048 with 15). On a CPU whose cores torch's threads already
    fill, none (there a decoding process only takes turns with the CNN, and costs more than it hides:
    bench/speed.py); one where the CNN leaves CPU time over."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cpu":
        return max(1, min(GPU_DECODE_WORKERS, cpus - 1))
    return 0 if torch.get_num_threads() >= cpus else 1


def use_device_in_thread(device: torch.device) -> None:
    """Make the model's GPU current in a new thread (else cuBLAS warns that the thread has no CUDA context)."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())


@torch.inference_mode()
def caption_files(captioner: Captioner, paths: Sequence[str | Path], batch_size: int = DECODE_BATCH,
                  num_workers: int | None = None, n_best: int = 1, cells: Sequence[str] = (),
                  word_probs: bool = False, **options) -> Iterator[tuple[int, list[Caption] | None, str | None]]:
    """(index, captions, None) or (index, None, error) per path, as each batch of `batch_size` is done.

    `cells` (decode.cells settings, e.g. ["rnn", "lstm", "gru"]) caption each photo once per setting from the
    same features: its captions are then the first setting's n best, then the next's, and so on. `word_probs`
    adds each word's probability to the photo decoder's captions (Caption.word_probs).

    `num_workers` processes (None: default_workers) decode the files while the CNN encodes them a few at a
    time (Captioner.encoder_batch_size). A batch is searched in a thread while the CNN goes on with the next
    batch: the search's bookkeeping and the image decoding each leave a core idle that the other can use
    (with the decoding thread of iter_image_batches, 7-14% more images/s on 2 cores in bench/speed.py).
    A batch's captions come once the next batch is encoded, or at the end; an unreadable file's error
    comes as soon as it is found.
    """
    decodes = [captioner.decode_options(**options, cells=setting) for setting in cells or [None]]
    chunk = captioner.encoder_batch_size(batch_size)
    num_workers = default_workers(captioner.device) if num_workers is None else num_workers
    waiting: list[int] = []  # indices of the encoded photos not yet searched
    pooled: list[torch.Tensor] = []  # their features, in chunks
    searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-search",
                                  initializer=use_device_in_thread, initargs=(captioner.device,))
    searching: list[Future] = []  # the previous batch's search, at most one

    def search(indices: list[int], features: torch.Tensor) -> list[tuple[int, list[Caption], None]]:
        written = [captioner.describe(features, decode, n_best, word_probs) for decode in decodes]
        return [(index, [c for captions in per_setting for c in captions], None)
                for index, per_setting in zip(indices, zip(*written))]

    def finish_search():
        while searching:
            yield from searching.pop().result()

    def flush():
        if waiting:
            batch = (list(waiting), torch.cat(pooled))
            waiting.clear()
            pooled.clear()
            yield from finish_search()
            searching.append(searcher.submit(search, *batch))

    try:
        for indices, images, errors in iter_image_batches([str(p) for p in paths], captioner.encoder.transform,
                                                          chunk, num_workers):
            for index, reason in errors:
                yield index, None, reason
            if images is not None:
                pooled.append(captioner.encode(images))
                waiting += indices
            if len(waiting) >= batch_size:
                yield from flush()
        yield from flush()
        yield from finish_search()
    finally:
        searcher.shutdown(wait=True, cancel_futures=True)
