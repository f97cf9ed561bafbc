"""Score a made dataset's own policy with action noise (aepo_lite.rl.datasets.snapshot_noise_scores): does the
return depend on the actions at the data's noise scale? Writes a CSV and its Markdown table beside it.

    python scripts/policy_noise.py --datasets local/hopper/medium-v0 --noises 0 0.1 0.2 \
        --out figures/rl_6c_ln/policy_noise.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aepo_lite._io import atomic_write_csv, atomic_write_text
from aepo_lite.rl.datasets import snapshot_noise_scores

COLUMNS = ("dataset", "snapshot", "noise", "episodes", "return_mean", "score_mean", "score_std")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", required=True, help="datasets made by aepo-lite make-dataset")
    p.add_argument("--noises", nargs="+", type=float, default=[0.0, 0.1, 0.2], help="action-noise stds")
    p.add_argument("--which", default="medium", choices=("medium", "expert"), help="the recipe's snapshot")
    p.add_argument("--episodes", type=int, default=30, help="episodes per noise (seeds 100000 + i)")
    p.add_argument("--out", required=True, help="the CSV to write (its .md table is written beside it)")
    a = p.parse_args(argv)
    if not a.out.endswith(".csv"):
        p.error(f"--out: expected a .csv path, got {a.out!r}")
    rows = [{"dataset": d, "snapshot": a.which, **r} for d in a.datasets
            for r in snapshot_noise_scores(d, a.noises, a.episodes, which=a.which)]
    atomic_write_csv(Path(a.out), rows, COLUMNS)
    lines = ["# A dataset's own policy with action noise\n", "The policy that made each dataset (its snapshot of the "
             "TD3 ladder), deterministic and with N(0, std^2) action noise, clipped to the box; normalised with the "
             f"dataset's reference scores (made by `python scripts/policy_noise.py`).\n",
             "| dataset | snapshot | noise std | episodes | return | normalised score |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['snapshot']} | {r['noise']:g} | {r['episodes']} | {r['return_mean']:.1f} "
              f"| {r['score_mean']:.1f} +- {r['score_std']:.1f} |" for r in rows]
    atomic_write_text(Path(a.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[3:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
