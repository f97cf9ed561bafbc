"""Small helpers the chapters share: the scale switch, checks that always run, Markdown tables.

- :func:`course_scale` reads ``AEPO_SCALE`` (``smoke`` unless set) and says which is in use;
- :func:`check` raises ``AssertionError`` when a condition is false. Unlike an ``assert``
  statement, it is not removed when Python runs with ``-O`` (``PYTHONOPTIMIZE``), so a chapter's
  numeric checks can never be silently skipped;
- :func:`markdown_table` formats rows as a Markdown table, for ``IPython.display.Markdown``;
- :func:`scratch_dir` makes a private folder in the system's temp folder that is removed when the
  kernel (or any Python process) exits, or earlier by :func:`remove_scratch`.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aepo_lite._io import _pid_alive

__all__ = ["SCALES", "DEFAULT_SCALE", "course_scale", "check", "markdown_table", "scratch_dir",
           "remove_scratch"]

SCALES = ("smoke", "full")
DEFAULT_SCALE = "smoke"  # the one default of every chapter (and of the test suite)


def course_scale(verbose: bool = True) -> str:
    """The chapter's scale: ``AEPO_SCALE`` if set (``smoke`` or ``full``), else ``smoke``.

    Raises:
        ValueError if ``AEPO_SCALE`` is set to anything else.
    """
    raw = os.environ.get("AEPO_SCALE")
    scale = DEFAULT_SCALE if raw is None or raw.strip() == "" else raw.strip()
    if scale not in SCALES:
        raise ValueError(f"AEPO_SCALE: expected one of {SCALES}, got {raw!r}")
    if verbose:
        how = "set in the environment" if raw else "the default; set AEPO_SCALE=full before starting for full size"
        print(f"AEPO_SCALE = {scale} ({how})")
    return scale


def check(condition, message: str = "") -> None:
    """Raise ``AssertionError(message)`` unless ``condition`` is true (kept under ``python -O``)."""
    if not bool(condition):
        raise AssertionError(f"check failed: {message}" if message else "check failed")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table. ``align``: one character per column, ``l`` or ``r`` (default: text left,
    numbers right). Cells are used as given (format numbers before passing them)."""
    if not headers:
        raise ValueError("headers: expected at least one column")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"rows: row {i} has {len(row)} cells, expected {len(headers)}")
    if align is None:
        first = rows[0] if rows else ["" for _ in headers]
        align = "".join("r" if isinstance(c, (int, float)) or _numeric(c) else "l" for c in first)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align: expected {len(headers)} characters from 'l'/'r', got {align!r}")
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(cell) -> bool:
    text = str(cell).strip().split(" ")[0].rstrip("%").replace(",", "")
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- scratch folders

_OWNER = ".owner-pid"  # inside each scratch folder: the id of the process that made it
_SCRATCH: set[str] = set()  # this process's scratch folders not yet removed


def scratch_dir(prefix: str) -> Path:
    """A new private folder ``<temp>/<prefix>XXXXXXXX``, removed when this process exits.

    The removal runs at exit (``atexit``): a kernel shut down or restarted from JupyterLab, the end
    of a test's kernel, a script's end; :func:`remove_scratch` removes it earlier (a chapter's last
    cell). A process killed outright (SIGKILL) runs no exit handler, so the folders of the same
    prefix whose owner process no longer runs are removed here first.
    """
    if not prefix or os.sep in prefix:
        raise ValueError(f"prefix: expected a plain file name prefix, got {prefix!r}")
    _remove_orphans(prefix)
    path = tempfile.mkdtemp(prefix=prefix)
    (Path(path) / _OWNER).write_text(str(os.getpid()))
    if not _SCRATCH:
        atexit.unregister(_remove_all)  # registered once, however many folders
        atexit.register(_remove_all)
    _SCRATCH.add(path)
    return Path(path)


def remove_scratch(path: str | os.PathLike) -> bool:
    """Remove a folder made by :func:`scratch_dir` (nothing if it is already gone). Returns True
    when the folder no longer exists."""
    path = str(path)
    shutil.rmtree(path, ignore_errors=True)
    _SCRATCH.discard(path)
    return not os.path.exists(path)


def _remove_all() -> None:
    for path in list(_SCRATCH):
        remove_scratch(path)


def _remove_orphans(prefix: str) -> None:
    """Remove ``<temp>/<prefix>*`` folders of this user whose owner process has ended. A folder
    without an owner file (made by something else, or still being set up) is left alone."""
    for d in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
            pid = int((d / _OWNER).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
