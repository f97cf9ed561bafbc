"""Input validation shared by the library: every public function fails early, with a
``ValueError`` that names the argument and what was expected."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["check_tensor", "check_finite", "check_positive_definite", "check_scalar", "check_time", "check_seed",
           "check_int", "SEED_MAX"]

SEED_MAX = 2**63 - 1  # torch, numpy and random all accept seeds in [0, 2**63 - 1]


def check_tensor(name: str, x, ndim: int | None = None, shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of the given rank/shape (``None`` = any size)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(x.shape)}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
            parts = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise if ``x`` holds NaN or inf (the first place a non-finite value appears)."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {n_bad} NaN/inf entries")
    return x


def check_positive_definite(name: str, S: torch.Tensor, semi: bool = False) -> torch.Tensor:
    """Check that ``S`` (d, d) is symmetric and positive (semi-)definite."""
    check_tensor(name, S, ndim=2)
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"{name}: expected a square (d, d) matrix, got shape {tuple(S.shape)}")
    check_finite(name, S)
    tol = 1e-6 if S.dtype == torch.float32 else 1e-10
    scale = float(S.abs().max()) if S.numel() else 0.0
    if not torch.allclose(S, S.T, atol=tol * max(scale, 1.0)):
        raise ValueError(f"{name}: expected a symmetric matrix")
    eig_min = float(torch.linalg.eigvalsh(S.double()).min())
    if semi and eig_min < -tol * max(scale, 1.0):
        raise ValueError(f"{name}: expected a positive semi-definite matrix, smallest eigenvalue is {eig_min:.3g}")
    if not semi and eig_min <= 0:
        raise ValueError(f"{name}: expected a positive definite matrix, smallest eigenvalue is {eig_min:.3g}")
    return S


def check_scalar(name: str, x, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """Check a finite python/tensor scalar, optionally inside [low, high] (or (low, high])."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(x.shape)}")
        x = float(x)
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    if low is not None and (x < low or (low_open and x == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name}: expected a value {bound}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"{name}: expected a value <= {high}, got {x}")
    return x


def check_time(name: str, t: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """Check diffusion times lie in [t_min, t_max] (a small float tolerance is allowed)."""
    check_finite(name, t)
    eps = 1e-6 if t.dtype == torch.float32 else 1e-12
    if bool((t < t_min - eps).any()) or bool((t > t_max + eps).any()):
        raise ValueError(
            f"{name}: expected diffusion times in [t_min={t_min:g}, t_max={t_max:g}], "
            f"got values in [{float(t.min()):.4g}, {float(t.max()):.4g}]")
    return t


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """Check an integer (a bool, a float or a string is refused, even ``3.0``) in [low, high]."""
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else ("2**63-1" if high == SEED_MAX else str(high))
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def check_seed(name: str, value) -> int:
    """A random seed: an integer in [0, 2**63-1] (what torch, numpy and ``random`` all accept).

    ``1e20`` or ``-1`` fail here, naming the argument, instead of deep inside ``torch.manual_seed``
    ("Overflow when unpacking long long") or numpy ("expected non-negative integer")."""
    return check_int(name, value, low=0, high=SEED_MAX)
