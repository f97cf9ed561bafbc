"""Measure how well trained runs' energies follow E_t, the error budget's regression part in RL
(aepo_lite.rl.diagnostics.energy_fit_stats), into a CSV, and render its table beside it (``aepo-lite figures``
re-renders the table from the CSV alone).

    python scripts/energy_fit.py --runs RUN [RUN ...] --k-ref 128 --out figures/rl_6c_ln/energy_fit.csv
"""
from __future__ import annotations

import argparse

from aepo_lite.rl.diagnostics import ENERGY_FIT_COLUMNS, FIT_TIMES, energy_fit_rows, render_energy_fit, \
    write_csv_and_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network and a critic")
    p.add_argument("--times", nargs="+", type=float, default=list(FIT_TIMES), help="diffusion times t")
    p.add_argument("--k-ref", type=int, default=128, help="behaviour actions per state in the reference E_t")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    for path in write_csv_and_table(a.out, energy_fit_rows(a.runs, a.times, a.k_ref), ENERGY_FIT_COLUMNS,
                                    render_energy_fit):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
