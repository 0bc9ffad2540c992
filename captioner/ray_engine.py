"""`captioner caption --engine ray`: caption image files on a Ray cluster, or on a local Ray instance.

The flow:
1. The driver (this process) finds the images and the rows an earlier run already wrote exactly as the
   local engine does (caption.plan_captioning): same images, same order, same resume.
2. The paths still to do become a Ray dataset of file names, not of decoded images: each actor reads its
   own files, so a corrupt file becomes an error row (the local engine's ImageLoadError text) instead of a
   failed read task that stops the whole pipeline.
3. map_batches runs a fixed pool of CaptionActor: each loads the model once, in __init__, and captions one
   batch per call with folders.caption_files, the code the local engine runs.
4. Rows come back in input order. To FILE.jsonl / FILE.csv (or stdout) the driver writes them one by one with
   caption.write_captions, so an interrupted run resumes. To a folder, Ray writes Parquet files (write_parquet)
   with the same columns: path, caption, score, confidence, unsure, from_tags, tags, error (null where not set).

Images, checkpoint and the captioner package must be reachable under the same paths on every node (a shared
filesystem); relative paths are taken from the driver's working directory.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch

from .caption import (EXIT_SOME_FAILED, CaptionPlan, caption_row, error_row, is_folder_output, plan_captioning,
                      write_captions)
from .config import ConfigError
from .folders import caption_files
from .inference import Captioner

ROWS_PER_PARQUET_FILE = 100_000  # not one small file per batch


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as error:
        raise ConfigError(f"--engine ray needs Ray Data ({error}); install it with: pip install -e .[scale]") from None
    return ray


def pool_layout(cluster_cpus: float) -> tuple[int, float, int]:
    """(actors, CPUs each actor reserves, torch threads per actor) for a cluster with this many CPUs.

    The actors together reserve one CPU less than the cluster has: Ray needs a free CPU to schedule its
    own tasks (reads, Parquet writes, block shuffles), and on a small machine the driver and Ray's daemons
    need it too. Were the actors to reserve every CPU, those tasks would wait forever: on a 2-core machine
    the run hangs. Each actor runs torch on one thread: batches are small, more actors scale better than
    more threads, and on a busy machine torch's threads spin against each other (bench/ray_vs_local.py).
    """
    actors = max(1, int(cluster_cpus) - 1)
    cpus_each = min(1.0, max(cluster_cpus - 1, 0.5) / actors)
    return actors, cpus_each, 1


class CaptionActor:
    """One model per actor process, loaded once; each call captions one batch of file names."""

    def __init__(self, checkpoint: str | None, settings: list[str], decode_options: dict, torch_threads: int,
                 driver_cwd: str):
        torch.set_num_threads(torch_threads)
        if os.path.isdir(driver_cwd):  # relative paths then name the files the driver found
            os.chdir(driver_cwd)
        self.captioner = Captioner.from_checkpoint(checkpoint, settings=settings)
        self.decode_options = decode_options

    def __call__(self, batch):
        paths = [os.fsdecode(name) for name in batch["file"].to_pylist()]  # bytes: any file name survives Arrow
        rows = [None] * len(paths)
        for index, captions, error in caption_files(self.captioner, paths, len(paths), 0, **self.decode_options):
            rows[index] = caption_row(paths[index], captions[0]) if error is None else error_row(paths[index], error)
        return rows_table(rows)


def rows_table(rows: list[dict]):
    import pyarrow as pa

    tag = pa.struct([("word", pa.string()), ("probability", pa.float64())])
    types = {"path": pa.string(), "caption": pa.string(), "score": pa.float64(), "confidence": pa.float64(),
             "unsure": pa.bool_(), "from_tags": pa.bool_(), "tags": pa.list_(tag), "error": pa.string()}
    values = {name: [row.get(name) for row in rows] for name in types}
    values["tags"] = [None if tags is None else [{"word": w, "probability": p} for w, p in tags] for tags in values["tags"]]
    return pa.table({name: pa.array(values[name], kind) for name, kind in types.items()})


def table_rows(table) -> list[dict]:
    """Arrow rows -> the local engine's dicts: {"path", "caption", "score", ...} or {"path", "error"}."""
    rows = [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
    for row in rows:
        if "tags" in row:
            row["tags"] = [[tag["word"], tag["probability"]] for tag in row["tags"]]
    return rows


def start_ray(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local instance; True when this call started Ray."""
    if ray.is_initialized():  # e.g. a notebook or test that set Ray up itself
        return False
    options = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **options)
    else:
        # "local": a new instance here, never a cluster that RAY_ADDRESS or `ray start` left behind
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **options)
    return True


def caption_with_ray(inputs: list[str], checkpoint: str | None = None, out: str | None = None,
                     batch_size: int = 16, overwrite: bool = False, progress: bool = True,
                     address: str | None = None, device: str = "cpu", settings: list[str] = (),
                     **decode_options) -> int:
    """Caption everything under `inputs` with a pool of Ray actors; returns the exit status (0 or 3)."""
    ray = import_ray()
    if device != "cpu":
        raise ConfigError(f"--engine ray captions on CPUs only; drop --device {device}")
    parquet = is_folder_output(out)
    if parquet:
        prepare_parquet_folder(Path(out), overwrite)
    # A bad setting fails here, once, not inside every actor.
    Captioner.from_checkpoint(checkpoint, settings=settings).decode_options(**decode_options)
    plan = plan_captioning(inputs, None if parquet else out, overwrite)
    if not plan.todo and not parquet:
        return write_captions(plan, [], out, progress)
    started = start_ray(ray, address)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = progress and parquet  # JSONL/CSV: write_captions shows its own bar
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        captions = caption_dataset(ray, plan.todo, checkpoint, list(settings), decode_options, batch_size)
        if parquet:
            return write_parquet(ray, plan, captions, out)
        rows = (row for table in captions.iter_batches(batch_size=None, batch_format="pyarrow")
                for row in table_rows(table))
        return write_captions(plan, rows, out, progress)
    finally:
        if started:
            ray.shutdown()


def caption_dataset(ray, paths: list[str], checkpoint: str | None, settings: list[str], decode_options: dict,
                    batch_size: int):
    actors, cpus_each, threads = pool_layout(ray.cluster_resources().get("CPU", 1))
    files = ray.data.from_items([{"file": os.fsencode(path)} for path in paths],
                                override_num_blocks=max(1, math.ceil(len(paths) / batch_size)))
    checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None
    return files.map_batches(CaptionActor, batch_size=batch_size, batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_each,
                             fn_constructor_kwargs=dict(checkpoint=checkpoint, settings=settings,
                                                        decode_options=decode_options, torch_threads=threads,
                                                        driver_cwd=os.getcwd()))


def prepare_parquet_folder(folder: Path, overwrite: bool) -> None:
    """Parquet output goes to an empty (or new) folder; --overwrite first removes the .parquet files there."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}/: a file of that name exists, so it cannot be a folder for Parquet output")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {folder}/: the folder is not empty; choose a new folder, or pass --overwrite "
                          f"to replace its .parquet files (Parquet output does not resume)")
    for old in folder.glob("*.parquet"):
        old.unlink()


def write_parquet(ray, plan: CaptionPlan, captions, out: str) -> int:
    """Parquet files in `out` with the local engine's rows; the exit status from their error column."""
    if plan.problems:
        problems = rows_table([error_row(given, problem) for given, problem in plan.problems])
        captions = ray.data.from_arrow(problems).union(captions)
    rows = captions.materialize()  # captioned once: written, then counted
    total = rows.count()
    rows.repartition(max(1, math.ceil(total / ROWS_PER_PARQUET_FILE))).write_parquet(out)
    failed = 0
    for table in rows.select_columns(["error"]).iter_batches(batch_size=None, batch_format="pyarrow"):
        for error in table["error"].drop_null().to_pylist():
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    print(f"captioned {total - failed}, failed {failed}, skipped {plan.skipped} non-image files; "
          f"Parquet files in {out}", file=sys.stderr)
    return 0 if failed == 0 else EXIT_SOME_FAILED
