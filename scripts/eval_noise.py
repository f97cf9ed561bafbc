"""How noisy is one toy evaluation? Finished runs of the convergence curve, their distance drawn again.

Loads each run from the curve's stage cache (nothing is trained: a stage not in the cache is an error), draws
its distance at w = 1 ``--draws`` times (draw d: the sampler seed and exact target set of the run's seed + d, so
draw 0 is the one the run recorded), writes ``figures/toy2d_eval_noise.csv`` and its table.

    python scripts/eval_noise.py --steps 32000 --seed 0 --draws 6
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aepo_lite.toy import convergence as conv
from aepo_lite.toy import eval_noise as EN
from aepo_lite.toy import tasks as toy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=toy.task_names())
    ap.add_argument("--specs", nargs="+", default=["qgpo", "aepo:particles-K64-centered"])
    ap.add_argument("--steps", type=int, default=32000, help="energy steps of the curve's runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--cache-dir", default="runs/matched/cache", help="the curve's stage cache")
    ap.add_argument("--csv", default="figures/toy2d_eval_noise.csv", help="the draws (its table beside it)")
    a = ap.parse_args(argv)
    if a.draws < 2:
        ap.error(f"--draws: expected at least 2 (a spread needs two), got {a.draws}")
    torch.set_num_threads(1)
    cc = conv.ConvergenceConfig(tasks=tuple(a.tasks), specs=tuple(a.specs), steps=(a.steps,), seeds=(a.seed,),
                                preset=a.preset, device="cpu")
    rows = []
    for cfg in conv.spec_configs(cc):
        d = EN.draws(cfg, a.cache_dir, a.draws)
        rows += EN.rows_of(cfg, d)
        print(f"{cfg.task} seed {cfg.seed}: " + ", ".join(f"{x:.4f}" for x in d), flush=True)
    print(f"wrote {EN.write_rows(a.csv, rows)}")
    for p in EN.render(a.csv, Path(a.csv).parent):
        print(f"wrote {p}")
    print(EN.noise_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
