"""Which part of the error budget a trained toy energy's plateau is (``figures/toy2d_plateau.{csv,md}``).

    python scripts/plateau_budget.py \
        --runs runs/convergence/checkerboard/aepo-particles-K64-centered-b10-reward-full-s0-e256000 \
        --cache-dir runs/matched/cache --ks 16 64 256 --draws 32

For each finished toy run (its folder's ``config.json``; its stages read from ``--cache-dir``, nothing trained):
the trained energy against E_t, against the mean of its regression target, and that mean target against E_t,
without the noise of a finite average of draws (:mod:`aepo_lite.toy.plateau`); for every K of ``--ks`` the
target of K support points in place of the run's own; with ``--true-reward``, for a run on a fitted critic,
the same target reading the true reward instead (what the critic adds to the target's bias). Rows are merged
into the CSV (a rerun replaces its own), then the table is rendered (``aepo-lite figures`` renders it too).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aepo_lite.toy import plateau


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="finished toy run folders (aepo or mse)")
    p.add_argument("--cache-dir", required=True, help="the stage cache the runs were trained into")
    p.add_argument("--ks", nargs="+", type=int, default=None, help="K of the targets compared (default: the run's)")
    p.add_argument("--draws", type=int, default=32, help="target draws per grid point, even (two halves)")
    p.add_argument("--times", nargs="+", type=float, default=None, help="default: the run's eval.error_times")
    p.add_argument("--true-reward", action="store_true",
                   help="also the rows of each run's target reading the true reward in place of its fitted critic")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the run's")
    p.add_argument("--csv", default="figures/toy2d_plateau.csv")
    p.add_argument("--figures-dir", default=None, help="default: the CSV's folder")
    args = p.parse_args(argv)
    num = lambda v: "-" if v == "" else f"{float(v):.4f}"  # noqa: E731  (a qgpo run has no target columns)
    try:
        for run in args.runs:
            t0 = time.time()
            rs = plateau.rows(run, args.cache_dir, ks=args.ks, draws=args.draws, times=args.times, device=args.device,
                               true_reward=args.true_reward)
            plateau.write_rows(args.csv, rs)
            for r in rs:
                print(f"{r['task']} {r['estimator'] or r['method']} seed {r['seed']} K={r['k'] or '-'} t={r['t']}"
                      f"{' (true reward)' if r['target_q'] else ''}: "
                      f"f vs E_t {num(r['vs_exact'])}, f vs target {num(r['vs_target'])}, target vs E_t "
                      f"{num(r['target_bias'])}, one draw's noise {num(r['target_sd'])}, gradient error "
                      f"{num(r['grad_vs_exact'])}")
            print(f"{run}: {time.time() - t0:.0f} s", flush=True)
        for path in plateau.render(args.csv, args.figures_dir or Path(args.csv).parent):
            print(f"wrote {path}")
    except ValueError as e:
        print(f"plateau_budget: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
