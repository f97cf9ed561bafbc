"""Atomic writes and per-stage run bookkeeping: a killed run resumes and loses no finished stage."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_torch_save", "atomic_save_figure", "read_json",
           "append_jsonl"]


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write text to ``path`` via a temporary file and an atomic rename."""
    return _atomic(path, lambda f: f.write(text.encode()))


def _default(o):
    if is_dataclass(o):
        return asdict(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path, obj: Any) -> Path:
    """JSON with sorted keys and a trailing newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")


def atomic_torch_save(path, obj: Any) -> Path:
    """``torch.save`` written atomically (a killed run never leaves a half checkpoint)."""
    return _atomic(path, lambda f: torch.save(obj, f))


# No software version or date in a saved figure: the same data gives the same bytes (a clean git tree).
_FIXED_METADATA = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
                   "svg": {"Creator": None, "Date": None}}


def atomic_save_figure(path, fig, dpi: int = 110) -> Path:
    """``fig.savefig`` written atomically, in the format of ``path``'s suffix (png, pdf, svg), with
    fixed metadata (no version, no date), so the same figure always gives the same bytes."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return _atomic(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt, metadata=_FIXED_METADATA.get(fmt)))


def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line (metrics logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_default) + "\n")
