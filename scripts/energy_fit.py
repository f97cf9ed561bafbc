"""Measure how well trained runs' energies follow E_t, the error budget's regression part in RL
(aepo_lite.rl.diagnostics.energy_fit_stats), into a CSV, and render its table beside it (``aepo-lite figures``
re-renders the table from the CSV alone). Rows already in ``--out`` (a run's dataset, label and seed) are kept and
not measured again; the others are added, the CSV rewritten as each run lands.

With ``--mixture-bandwidths H [H ...]`` it measures instead the mixture target at each bandwidth against the same
reference, with each run's critic and no training (the approximation part; ``mixture_bandwidth_rows``):

    python scripts/energy_fit.py --runs RUN [RUN ...] --k-ref 128 --out figures/rl_6c_ln/energy_fit.csv
    python scripts/energy_fit.py --runs RUN [RUN ...] --around-scale 10 --out figures/rl_6c_big/energy_fit.csv
    python scripts/energy_fit.py --runs RUN [RUN ...] --mixture-bandwidths 0 0.01 0.05 --out figures/rl_6c_big/mixture_bandwidth.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite._io import read_json
from aepo_lite.rl.diagnostics import ENERGY_FIT_COLUMNS, FIT_TIMES, MIXTURE_BANDWIDTH_COLUMNS, csv_per_run, \
    energy_fit_rows, mixture_bandwidth_rows, render_energy_fit, render_mixture_bandwidth


def _run_rows(run: str, measure, rows: list[dict], around: float = 0.0) -> list[dict]:
    """``measure(run)``'s rows with the run's dataset, label and seed, unless ``rows`` (the CSV so far) holds them
    (measured with a_t around the same guidance scale; older CSVs, without the column, around behaviour actions)."""
    res = read_json(Path(run) / "results.json")
    if any((r["dataset"], r["method"], str(r["seed"]), float(r.get("around_w") or 0))
           == (res["dataset"], res["label"], str(res["seed"]), around) for r in rows):
        print(f"kept {run}: its rows are in the CSV")
        return []
    return measure(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with an energy network and a critic")
    p.add_argument("--times", nargs="+", type=float, default=list(FIT_TIMES), help="diffusion times t")
    p.add_argument("--k-ref", type=int, default=128, help="behaviour actions per state in the reference E_t")
    p.add_argument("--around-scale", type=float, default=0.0,
                   help="draw a_t around each run's own guided action at this guidance scale w (default 0: around "
                        "behaviour actions)")
    p.add_argument("--mixture-bandwidths", nargs="+", type=float, default=None,
                   help="measure the mixture target at these bandwidths h >= 0 instead (runs need only a critic)")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    if a.mixture_bandwidths is None:
        measure, columns, render = energy_fit_rows, ENERGY_FIT_COLUMNS, render_energy_fit
        kw = {"times": a.times, "k_ref": a.k_ref, "around": a.around_scale}
    else:
        if a.around_scale:
            p.error("--around-scale: the mixture bandwidth sweep draws a_t around behaviour actions only")
        measure, columns, render = mixture_bandwidth_rows, MIXTURE_BANDWIDTH_COLUMNS, render_mixture_bandwidth
        kw = {"bandwidths": a.mixture_bandwidths, "times": a.times, "k_ref": a.k_ref}
    around = kw.get("around", 0.0)
    for path in csv_per_run(a.out, a.runs, lambda run, rows: _run_rows(run, lambda r: measure([r], **kw), rows, around),
                            columns, render):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
