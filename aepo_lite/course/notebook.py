"""Small helpers the chapters share: the scale switch, checks that always run, Markdown tables.

- :func:`course_scale` reads ``AEPO_SCALE`` (``smoke`` unless set) and says which is in use;
- :func:`check` raises ``AssertionError`` when a condition is false. Unlike an ``assert``
  statement, it is not removed when Python runs with ``-O`` (``PYTHONOPTIMIZE``), so a chapter's
  numeric checks can never be silently skipped;
- :func:`markdown_table` formats rows as a Markdown table, for ``IPython.display.Markdown``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["SCALES", "DEFAULT_SCALE", "course_scale", "check", "markdown_table"]

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
