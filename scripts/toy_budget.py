"""The toy error budget, parts 1-3 (``figures/toy2d_budget.{csv,md,png}``), at chosen sizes.

:func:`aepo_lite.toy.budget.run_budget` on every toy task: the approximation, moments and critic parts of
docs/derivation.md 6b for every estimator. Its behaviour model and smooth critic are trained into ``--cache`` (a
rerun loads them). The committed table is the CPU size below (10000 reference points, a 24 x 24 grid, the behaviour
model trained 1500 steps) with the critic trained 24000 steps, as the toy preset's is:

    python scripts/toy_budget.py --n-ref-data 10000 --grid-size 24 --behaviour-steps 1500 --critic-steps 24000 \\
        --out-dir figures
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from aepo_lite.toy.budget import BudgetConfig, run_budget
from aepo_lite.training import StageStore


def main(argv=None) -> int:
    d = BudgetConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(d.tasks))
    ap.add_argument("--n-ref-data", type=int, default=d.n_ref_data, help="data points behind the exact E_t")
    ap.add_argument("--grid-size", type=int, default=d.grid_size, help="grid points per axis")
    ap.add_argument("--behaviour-steps", type=int, default=d.behaviour.steps)
    ap.add_argument("--critic-steps", type=int, default=d.critic.steps)
    ap.add_argument("--cache", default="runs/budget_cache", help="the behaviour models' and critics' stage cache")
    ap.add_argument("--out-dir", default="figures", help="where toy2d_budget.{csv,md,png} go")
    a = ap.parse_args(argv)
    for name in ("behaviour_steps", "critic_steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive step count, got {getattr(a, name)}")
    cfg = BudgetConfig(tasks=tuple(a.tasks), n_ref_data=a.n_ref_data, grid_size=a.grid_size,
                       behaviour=replace(d.behaviour, steps=a.behaviour_steps),
                       critic=replace(d.critic, steps=a.critic_steps))
    try:
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(1)
    run_budget(cfg, out_dir=a.out_dir, store=StageStore(a.cache, keyed=True))
    print(f"wrote {a.out_dir}/toy2d_budget.csv, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
