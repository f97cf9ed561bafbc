"""Score a made dataset's own policy with action noise (aepo_lite.rl.oracle.snapshot_noise_scores): does the
return depend on the actions at the data's noise scale? Writes a CSV and its Markdown table beside it
(``aepo-lite figures`` re-renders the table from the CSV alone).

    python scripts/policy_noise.py --datasets local/hopper/medium-v0 --noises 0 0.1 0.2 \
        --out figures/rl_6c_ln/policy_noise.csv
"""
from __future__ import annotations

import argparse

from aepo_lite.rl.oracle import snapshot_noise_scores
from aepo_lite.rl.diagnostics import POLICY_NOISE_COLUMNS, render_policy_noise, write_csv_and_table


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
    for path in write_csv_and_table(a.out, rows, POLICY_NOISE_COLUMNS, render_policy_noise):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
