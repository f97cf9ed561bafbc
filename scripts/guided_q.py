"""Measure where guidance takes trained runs' policies by their own critics (aepo_lite.rl.diagnostics.guided_q_stats)
into a CSV, and render its table beside it (``aepo-lite figures`` re-renders the table from the CSV alone).

    python scripts/guided_q.py --runs RUN [RUN ...] --scales 0.1 1 --k 16 --out figures/rl_6c_ln/guided_q.csv
"""
from __future__ import annotations

import argparse

from aepo_lite.rl.diagnostics import GUIDED_Q_COLUMNS, guided_q_rows, render_guided_q, write_csv_and_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network and a critic")
    p.add_argument("--scales", nargs="+", type=float, default=[0.1, 1.0], help="guidance scales w (w = 0 is always in)")
    p.add_argument("--k", type=int, default=16, help="behaviour actions per state to compare with")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    for path in write_csv_and_table(a.out, guided_q_rows(a.runs, a.scales, a.k), GUIDED_Q_COLUMNS, render_guided_q):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
