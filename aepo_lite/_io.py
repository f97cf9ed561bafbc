"""Atomic writes and per-stage run bookkeeping: a killed run resumes and loses no finished stage.

Every write goes to a hidden temporary sibling ``.<name>.<random>.<pid>.tmp``, is flushed to disk,
then renamed over the target, so a reader sees the old file or the new one, never half of one.
The temporary file is removed on any exception (Ctrl-C, disk full, a failing ``savefig``). A
process killed outright (SIGKILL, power loss) cannot clean up; its orphan is removed by the next
write of the same file (:func:`_remove_stale_temps`). Reading a damaged file (:func:`read_json`,
:func:`torch_load`) raises a ``ValueError`` naming the file and what to do.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_torch_save", "atomic_save_figure", "read_json",
           "torch_load", "append_jsonl", "read_csv_rows", "atomic_write_csv", "merge_csv_rows", "RunLock", "results_lock", "STALE_TEMP_S"]

# A sibling temporary file this much older than ours, whose writer is gone, is an orphan.
STALE_TEMP_S = 60.0


_UMASK = os.umask(0)
os.umask(_UMASK)


def _pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (POSIX; elsewhere: assume it does)."""
    if sys.platform.startswith("win"):  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def _remove_stale_temps(path: Path, own: str) -> list[Path]:
    """Remove orphaned ``.<name>.*.tmp`` siblings of ``path`` left by killed writers.

    A sibling is an orphan when it was last written more than :data:`STALE_TEMP_S` before our own
    temporary file and its writer's process id (the last part of its name) is not running here
    (a file without one, from an older version, only needs the age). A concurrent writer keeps its
    file: it is either recent or its process is alive. On a folder shared between machines a
    writer on another machine that stalls for a minute could lose its temporary file; its rename
    then fails and it reports the error instead of writing a half file.
    """
    removed = []
    prefix, own_name = f".{path.name}.", os.path.basename(own)
    try:
        own_mtime = os.stat(own).st_mtime
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if name == own_name or not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        p = path.parent / name
        try:
            if own_mtime - p.stat().st_mtime < STALE_TEMP_S:
                continue
            pid = name[:-len(".tmp")].rsplit(".", 1)[-1]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            p.unlink()
            removed.append(p)
        except OSError:  # gone already, or not ours to remove: leave it
            continue
    return removed


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    f = None
    try:
        f = os.fdopen(fd, "wb")
        _remove_stale_temps(path, tmp)
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual mode
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C, disk full, a failing writer: no temporary file stays behind
        try:  # closing can fail again (a full disk flushes its buffer): the unlink still runs
            os.close(fd) if f is None else f.close()
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            # name the file being written: a full disk (torch.save, savefig) names none, os.replace our temporary
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
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


def json_close(a: Any, b: Any, *, rtol: float, atol: float = 0.0) -> bool:
    """Whether two JSON values have the same structure, the same keys, strings and booleans, and numbers equal
    within relative tolerance ``rtol`` or absolute tolerance ``atol`` (ints and floats alike)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_close(a[k], b[k], rtol=rtol, atol=atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_close(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return type(a) is type(b) and a == b


def write_json_unless_close(path, obj: Any, *, rtol: float, atol: float = 0.0) -> bool:
    """:func:`atomic_write_json`, unless ``path`` already holds the same result to relative tolerance ``rtol`` or
    absolute ``atol`` (:func:`json_close`; ``atol`` for values that are rounding errors themselves, such as an
    identity check's residual): then the file is left as it is, so a rerun on another CPU, whose floating-point
    rounding differs in the last digits, does not rewrite a committed result. True when it wrote."""
    path = Path(path)
    new = json.loads(json.dumps(obj, default=_default))
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and json_close(old, new, rtol=rtol, atol=atol):
            return False
    atomic_write_json(path, new)
    return True


def atomic_save_npz(path, **arrays) -> Path:
    """``np.savez`` of ``arrays`` written atomically."""
    import numpy as np
    return _atomic(path, lambda f: np.savez(f, **arrays))


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
    """Parse a JSON file; a damaged one (truncated, not JSON) is a ``ValueError`` naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else f"byte {e.start}"
        what = "is empty" if not raw.strip() else f"is not valid JSON ({type(e).__name__} at {where})"
        raise ValueError(f"{path} {what}: the file is damaged (an interrupted write or an edit); restore it, "
                         "or delete it so that the command that makes it writes it again") from None


def torch_load(path, **kw) -> Any:
    """``torch.load`` of a checkpoint or cache file; a damaged one is a ``ValueError`` naming it.

    Missing files, permission problems and memory errors pass through unchanged."""
    try:
        return torch.load(path, **kw)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:  # zip reader, unpickling, EOF, a tensor of the wrong size ...
        if isinstance(e, RuntimeError) and ("out of memory" in str(e) or "DefaultCPUAllocator" in str(e)):
            raise
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}): the file is damaged or "
                         "not a checkpoint; delete it so that the stage that makes it runs again") from None


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line (metrics logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_default) + "\n")


def read_csv_rows(path, columns, *, made_by: str, hint: str = "", optional: dict | None = None) -> list[dict]:
    """The rows of a results CSV as dicts of strings; a missing file or a missing column is an error naming
    the file (``made_by``: the command that makes it; ``hint``: what to do about missing columns). ``optional``:
    {column: value} for columns added later, read as that value from a CSV made before them."""
    import csv
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"csv_path: {path} is a folder, not a CSV file (the CSV is made by {made_by})")
    if not path.is_file():
        raise FileNotFoundError(f"csv_path: {path} does not exist (it is made by {made_by})")
    optional = optional or {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        have = reader.fieldnames or []
        missing = [c for c in columns if c not in have and c not in optional]
        if missing:
            raise ValueError(f"csv_path: {path} lacks the columns {missing}{hint}")
        fill = {c: v for c, v in optional.items() if c not in have}
        return [dict(r, **fill) for r in reader]


class RunLock:
    """An exclusive lock on a folder (``DIR/.lock``) or one entry in it: a second writer is refused at once.

    The operating system releases it when the process ends, however it ends.
    """

    def __init__(self, folder, what: str = "out", name: str = ".lock", wait: float = 0.0):
        """``name``: the lock file in ``folder``; one folder may hold several locks (one per cache entry).
        ``wait``: seconds to wait for another holder (0: refuse at once). A shared cache entry waits: the
        other process is training exactly what this one needs, and it is loaded once that finishes."""
        self.path, self.what, self.wait, self._fd = Path(folder) / name, what, float(wait), None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, said = time.monotonic() + self.wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ValueError(f"{self.what}: {self.path.parent} is being written by another aepo-lite "
                                     f"process (pid {other}); wait for it to finish or use another folder") from None
                if not said:
                    print(f"{self.what}: waiting for pid {other}, which is writing {self.path.parent}", flush=True)
                    said = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def results_lock(path) -> RunLock:
    """A lock for a read-merge-write of the results file ``path`` (``.<name>.lock`` beside it): processes that
    add rows to one CSV (two toy runs sharing a 2-core machine) then keep each other's rows. It waits for
    another holder, which holds it only while it merges."""
    path = Path(path)
    return RunLock(path.parent, what="csv_path", name=f".{path.name}.lock", wait=600)


def write_table(path, rows: list[dict], header: str, table, *, csv_path, made_by: str) -> list[Path]:
    """A generated markdown table (``header`` + ``table(rows)``) written atomically to ``path``; rows read from
    ``csv_path`` must not be empty (an error names ``made_by``, the command that makes them)."""
    if not rows:
        raise ValueError(f"{csv_path} has no rows: run {made_by} first")
    return [atomic_write_text(path, header + table(rows))]


def merge_csv_rows(path, new_rows: list[dict], columns, key, *, made_by: str, sort_key=None,
                   optional: dict | None = None) -> list[dict]:
    """Merge rows into a results CSV under :func:`results_lock`: a row whose ``key`` columns equal a saved one
    replaces it, the others are kept; written sorted (``sort_key``, default the key) and atomically. Returns
    every row. ``optional``: as in :func:`read_csv_rows` (a saved CSV without such a column gains it, and so does a
    new row without it)."""
    path = Path(path)
    new_rows = [{**(optional or {}), **r} for r in new_rows]
    ident = lambda r: tuple(str(r[k]) for k in key)  # noqa: E731
    with results_lock(path):
        saved = read_csv_rows(path, columns, made_by=made_by, optional=optional) if path.exists() else []
        rows = {ident(r): r for r in saved}
        rows.update({ident(r): r for r in new_rows})
        ordered = sorted(rows.values(), key=sort_key or ident)
        atomic_write_csv(path, ordered, columns)
    return ordered


def atomic_write_csv(path, rows: list[dict], columns) -> Path:
    """Rows (dicts) as a CSV with the header ``columns``, ``\\n`` line ends, written atomically."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
