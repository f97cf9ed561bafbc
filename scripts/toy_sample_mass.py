"""Where finished toy runs' guided samples put their mass against the exact target's
(aepo_lite.toy.pipeline.sample_mass): the share of each beyond a line, and both sets' quartiles, for the draw
whose distance the run recorded. Reads each run's config.json and its stages from the stage cache (a stage the
cache lacks is trained again, with a progress bar).

    python scripts/toy_sample_mass.py --runs runs/s68/critic24000/moons/aepo-gaussian-fit-sampled-b10-regression-full-s0-e128000 \\
        --cache-dir runs/s68/toycache --axis x --threshold 0.4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aepo_lite.config import load_config_file
from aepo_lite.toy import pipeline as TT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="toy run folders (each with its config.json)")
    ap.add_argument("--cache-dir", required=True, help="the stage cache the runs trained into")
    ap.add_argument("--axis", default="x", choices=("x", "y"))
    ap.add_argument("--threshold", type=float, required=True, help="the line: share with coordinate above it")
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--draw", type=int, default=0, help="which evaluation draw (0: the first)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for run in a.runs:
        cfg_path = Path(run) / "config.json"
        if not cfg_path.is_file():
            ap.error(f"--runs: {run} has no config.json (not a toy run folder)")
        cfg = load_config_file(cfg_path, TT.ToyConfig)
        m = TT.train_toy(cfg, cache_dir=a.cache_dir, progress=True)
        r = TT.sample_mass(m, a.axis, a.threshold, guidance_scale=a.guidance_scale, d=a.draw)
        fmt = lambda qs: "; ".join(f"{k} " + " / ".join(f"{v:.3f}" for v in vs) for k, vs in qs.items())  # noqa: E731
        print(f"{run}: {a.axis} > {a.threshold:g}, samples {r['samples_share']:.3f}, target {r['target_share']:.3f} "
              f"(w = {a.guidance_scale:g}, draw {a.draw}); quartiles, samples: {fmt(r['samples_quartiles'])}; "
              f"target: {fmt(r['target_quartiles'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
