"""Measure how well trained runs' energies follow E_t, the error budget's regression part in RL
(aepo_lite.rl.diagnostics.energy_fit_stats), into a CSV, and render its table beside it (``aepo-lite figures``
re-renders the table from the CSV alone). Rows already in ``--out`` (a run's dataset, label and seed) are kept and
not measured again; the others are added, the CSV rewritten as each run lands.

    python scripts/energy_fit.py --runs RUN [RUN ...] --k-ref 128 --out figures/rl_6c_ln/energy_fit.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite._io import read_json
from aepo_lite.rl.diagnostics import ENERGY_FIT_COLUMNS, FIT_TIMES, csv_per_run, energy_fit_rows, render_energy_fit


def _run_rows(run: str, times, k_ref: int, rows: list[dict]) -> list[dict]:
    """The run's rows, unless ``rows`` (the CSV so far) holds its dataset, label and seed already."""
    res = read_json(Path(run) / "results.json")
    if any((r["dataset"], r["method"], str(r["seed"])) == (res["dataset"], res["label"], str(res["seed"]))
           for r in rows):
        print(f"kept {run}: its rows are in the CSV")
        return []
    return energy_fit_rows([run], times, k_ref)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network and a critic")
    p.add_argument("--times", nargs="+", type=float, default=list(FIT_TIMES), help="diffusion times t")
    p.add_argument("--k-ref", type=int, default=128, help="behaviour actions per state in the reference E_t")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    for path in csv_per_run(a.out, a.runs, lambda run, rows: _run_rows(run, a.times, a.k_ref, rows),
                            ENERGY_FIT_COLUMNS, render_energy_fit):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
