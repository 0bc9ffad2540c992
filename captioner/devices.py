"""Which torch device a run uses: one rule and one error for the CLI, the app, training and evaluation."""
from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(device: str) -> torch.device:
    """auto (the GPU when torch sees one), cpu, cuda or cuda:N; a ConfigError that names the problem otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested, but torch {torch.__version__} sees no CUDA GPU here: "
                              f"use cpu (or auto)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r} requested, but this machine has {count} CUDA GPU(s): "
                              f"cuda:0 to cuda:{count - 1}")
    return resolved
