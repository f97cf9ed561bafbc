"""One device switch (``auto|cpu|cuda``), seeding, and the per-device Adam. Nothing else in the library
names a device."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["resolve_device", "seed_everything", "adam", "DEVICE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Map ``auto|cpu|cuda`` (or ``cuda:N``) to a :class:`torch.device`.

    ``auto`` picks CUDA when available, else the CPU. Asking for CUDA on a machine without it
    is an error, not a silent fallback.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
        return torch.device(spec)
    raise ValueError(f"device: expected one of {DEVICE_CHOICES} (or 'cuda:N'), got {spec!r}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU :class:`torch.Generator` seeded the same."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return torch.Generator().manual_seed(seed)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam for parameters on any device: the fused kernel on CUDA (one launch for all parameters),
    torch's default on the CPU (its foreach variant measured no faster there: 1.96 vs 2.52 ms per step
    for a 3 x 256 TwinQ, 6.54 vs 5.24 ms for the default NoiseNet)."""
    params = list(params)
    return torch.optim.Adam(params, lr=lr, fused=True if any(p.is_cuda for p in params) else None)
