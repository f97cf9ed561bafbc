"""Measure mean ||grad_a f_phi(s, a_t, t)|| of trained runs by t (aepo_lite.rl.diagnostics) into a CSV, and render
its table beside it (``aepo-lite figures`` re-renders the table from the CSV alone).

    python scripts/energy_gradients.py --runs RUN [RUN ...] --out figures/rl_6c/energy_gradients.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite._io import atomic_write_csv
from aepo_lite.rl.diagnostics import CSV_COLUMNS, gradient_rows, render


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    atomic_write_csv(Path(a.out), gradient_rows(a.runs), CSV_COLUMNS)
    for path in [Path(a.out), *render(a.out, Path(a.out).parent)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
