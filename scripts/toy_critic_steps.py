"""The toy fitted critic by its training steps: held-out RMS against the true reward, per task.

Trains only the critic stage of each task (the stage a ``--critic regression`` toy run trains, cached in
``--cache-dir`` and shared with those runs) for each step count, and merges one row per task and count into the
CSV (a rerun skips the rows it has); the table and figure beside it (``aepo-lite figures`` renders them again).

    python scripts/toy_critic_steps.py --steps 1500 6000 24000 96000 --cache-dir runs/toy_cache \\
        --csv figures/toy2d_critic_steps.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aepo_lite.toy import critic_steps as CS
from aepo_lite.toy import tasks as toy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=toy.task_names())
    ap.add_argument("--steps", nargs="+", type=int, default=[1500, 6000, 24000, 96000], help="critic step counts")
    ap.add_argument("--hidden", type=int, default=None, help="critic width (default: the preset's)")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--cache-dir", default=None, help="stage cache (default: runs/toy_cache)")
    ap.add_argument("--csv", default="figures/toy2d_critic_steps.csv", help="the rows (table and figure beside it)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    try:
        cfgs = CS.configs(a.tasks, a.steps, preset=a.preset, hidden=a.hidden)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(1)
    rows = CS.measure(cfgs, a.csv, cache_dir=a.cache_dir, progress=not a.quiet)
    for p in CS.render(a.csv, Path(a.csv).parent):
        print(f"wrote {p}")
    print(CS.critic_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
