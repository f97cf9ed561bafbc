"""How much the toy noise floor varies from seed to seed (``figures/toy2d_floor_spread.{csv,md}``), what
single-seed ratios to it meant, and the floors of saved toy results restated as the expected floor.

    python scripts/floor_spread.py --csv figures/toy2d_floor_spread.csv \
        [--convergence figures/toy2d_convergence.csv --steps 64000]

``--convergence``/``--steps`` print each run of the curve at that step count against its own seed's floor draw
and against the expected one. ``--refloor CSV ...`` only rewrites the ``floor`` column of toy results CSVs (the
toy grid's, the convergence curve's, the budget runs') with :func:`aepo_lite.toy.tasks.expected_floor` of each
row's task, beta and evaluation settings: rows written before the floor was an expectation hold one seed's draw.
Nothing else in them changes.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from aepo_lite._io import atomic_write_csv, results_lock
from aepo_lite.toy import convergence as conv
from aepo_lite.toy import floors
from aepo_lite.toy import tasks as toy


def refloor(csv_path) -> int:
    """Rewrite the ``floor`` column of a toy results CSV with the expected floor of each row; returns the rows
    changed. Each row's size is its ``n_eval`` (the toy grid's CSVs) or its preset's ``eval.n_samples``."""
    from aepo_lite.toy.pipeline import make_config
    with results_lock(csv_path):
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames, list(reader)
        if not columns or "floor" not in columns:
            raise ValueError(f"csv: {csv_path} has no floor column (not a toy results CSV)")
        changed = 0
        for r in rows:
            ev = make_config(r["task"], "bc", r.get("preset") or "full").eval
            n = int(r["n_eval"]) if r.get("n_eval") else ev.n_samples
            new = toy.expected_floor(r["task"], float(r["beta"]), n, pool_size=ev.pool_size,
                                     n_projections=ev.n_projections)
            changed += f"{new:.6f}" != r["floor"]
            r["floor"] = f"{new:.6f}"
        atomic_write_csv(csv_path, rows, columns)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default="figures/toy2d_floor_spread.csv", help="the floor draws (its table beside it)")
    ap.add_argument("--tasks", nargs="+", default=toy.task_names())
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=2000, help="points a set (the full preset's eval.n_samples)")
    ap.add_argument("--seeds", type=int, default=toy.FLOOR_PAIRS, help="draws a task (default: the pairs "
                    "expected_floor averages, so the mean column is the tables' floor)")
    ap.add_argument("--pool-size", type=int, default=100_000)
    ap.add_argument("--n-projections", type=int, default=128)
    ap.add_argument("--convergence", default=None, help="a toy-convergence CSV whose runs to set against the floor")
    ap.add_argument("--steps", type=int, default=None, help="with --convergence: the energy step count")
    ap.add_argument("--refloor", nargs="+", default=None, metavar="CSV",
                    help="only rewrite these toy results CSVs' floor column with the expected floor")
    a = ap.parse_args(argv)
    if a.refloor:
        for p in a.refloor:
            print(f"{p}: {refloor(p)} floors restated")
        return 0
    if a.seeds < 3:
        ap.error(f"--seeds: expected at least 3 (the mean of seeds 0-2 is one column), got {a.seeds}")
    if (a.convergence is None) != (a.steps is None):
        ap.error("--convergence and --steps go together")
    rows = floors.spread_rows(a.tasks, a.beta, a.n, a.seeds, a.pool_size, a.n_projections)
    print(f"wrote {floors.write_rows(a.csv, rows)}")
    for p in floors.render(a.csv, Path(a.csv).parent):
        print(f"wrote {p}")
    print(floors.spread_markdown(rows))
    if a.convergence:
        runs = [r for r in conv.read_rows(a.convergence) if int(r["energy_steps"]) == a.steps]
        if not runs:
            ap.error(f"--steps {a.steps}: no run of {a.convergence} has that many energy steps")
        print(f"Runs of {a.convergence} at {a.steps} energy steps (w = 1):\n")
        print(floors.against_floors(runs, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
