"""One training process, or many under torchrun: which rank this is, and how ranks share results.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Without them nothing here talks to anyone and
training runs as a single process. Work is split by `shard` (every world_size-th item from
this rank's offset) and put back in the original order by `unshard`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError
from .features import FeatureTable
from .devices import resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def setup(device_setting: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); the device for this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_setting)
    if world_size == 1:
        return SINGLE, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started process {local_rank} on this machine, which has "
                              f"{torch.cuda.device_count()} CUDA GPU(s): --nproc_per_node at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, world_size), device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items, ranks: Ranks):
    return items[ranks.rank::ranks.world_size]


def all_gather(value, ranks: Ranks) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    values = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def unshard(part: list, ranks: Ranks) -> list:
    """The inverse of `shard`: every rank gets the whole list back in its original order."""
    parts = all_gather(part, ranks)
    whole = [None] * sum(len(p) for p in parts)
    for rank, items in enumerate(parts):
        whole[rank::ranks.world_size] = items
    return whole


def unshard_features(table: FeatureTable, ranks: Ranks) -> FeatureTable:
    """Each rank encoded a shard of the (sorted) image list; every rank gets the full table."""
    parts = all_gather((table.paths, table.features, table.failed), ranks)
    count = sum(len(paths) for paths, _, _ in parts)
    paths, features, failed = [None] * count, torch.empty(count, *table.features.shape[1:], dtype=table.features.dtype), {}
    for rank, (part_paths, part_features, part_failed) in enumerate(parts):
        paths[rank::ranks.world_size] = part_paths
        features[rank::ranks.world_size] = part_features
        failed.update(part_failed)
    return FeatureTable(paths, features, failed)
