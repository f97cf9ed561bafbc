"""Which diffusion times a finished toy run's trained energy costs it (aepo_lite.toy.trained_budget.band_distance):
draw 0's distance at w = 1 when the sampler follows the exact grad E_t everywhere but one band of t, where the
trained energy guides; first with no band (the exact energy alone) and with every t (the run itself). With
``--threshold``, also the share of the samples above that line on ``--axis`` (and the exact target's). With
``--sampler-steps``, all of it again at each of those sampler step counts (the run's solver): whether the sampler or
the behaviour model holds the exact energy's distance. A run with no trained energy (bc) gives the exact energy's
rows alone.

    python scripts/toy_bands.py --runs RUN [RUN ...] --cache-dir runs/s68/toycache --bands 0 0.1 0.3 0.6 1 \\
        --axis x --threshold 0.4
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from aepo_lite.config import load_config_file
from aepo_lite.toy import pipeline as TT
from aepo_lite.toy.trained_budget import band_distance


def _bands(edges: list[float], trained: bool) -> list[tuple[str, float, float]]:
    """(label, lo, hi) of each row: the exact energy alone, then (with a trained energy) the run and each band."""
    if not trained:
        return [("exact energy", 0.0, 0.0)]
    close = lambda hi: hi + 1e-6 if hi >= 1.0 else hi  # noqa: E731  (a band ending at 1 keeps t = 1)
    return [("exact energy", 0.0, 0.0), ("trained energy", 0.0, 2.0)] + [
        (f"trained on [{lo:g}, {hi:g}{']' if hi >= 1.0 else ')'}", lo, close(hi))
        for lo, hi in zip(edges[:-1], edges[1:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished toy run folders (each with its config.json)")
    ap.add_argument("--cache-dir", required=True, help="the stage cache the runs trained into (nothing is trained)")
    ap.add_argument("--bands", nargs="+", type=float, default=[0.0, 0.1, 0.3, 0.6, 1.0],
                    help="band edges in t, increasing: each pair of neighbours is one band (the last includes t = 1)")
    ap.add_argument("--axis", default="x", choices=("x", "y"))
    ap.add_argument("--threshold", type=float, default=None, help="also print the share above this line")
    ap.add_argument("--draw", type=int, default=0, help="which evaluation draw (0: the first)")
    ap.add_argument("--sampler-steps", nargs="+", type=int, default=None,
                    help="sampler steps to draw with (default: the run's own)")
    a = ap.parse_args(argv)
    edges = a.bands
    if len(edges) < 2 or any(not math.isfinite(v) or v < 0 for v in edges) or edges != sorted(set(edges)):
        ap.error(f"--bands: expected two or more increasing, finite times >= 0, got {edges}")
    if a.threshold is not None and not math.isfinite(a.threshold):
        ap.error(f"--threshold: expected a finite number, got {a.threshold}")
    if a.sampler_steps is not None and any(n < 1 for n in a.sampler_steps):
        ap.error(f"--sampler-steps: expected step counts >= 1, got {a.sampler_steps}")
    torch.set_num_threads(1)
    i = 0 if a.axis == "x" else 1
    for run in a.runs:
        if not (Path(run) / "config.json").is_file():
            ap.error(f"--runs: {run} has no config.json (not a toy run folder)")
        cfg = load_config_file(Path(run) / "config.json", TT.ToyConfig)
        try:
            m = TT.train_toy(cfg, cache_dir=a.cache_dir, progress=False, trained_only=True)
            target = TT.draw_target(cfg, a.draw)
            above = lambda pts: float((pts[:, i] > a.threshold).double().mean())  # noqa: E731
            print(run + ("" if a.threshold is None else f" (exact target: {a.axis} > {a.threshold:g} "
                                                        f"{above(target):.3f})"))
            for n in a.sampler_steps or [cfg.sampling.steps]:
                m.cfg = replace(cfg, sampling=replace(cfg.sampling, steps=n))
                if a.sampler_steps is not None:
                    print(f" {n} sampler steps ({cfg.sampling.solver}):")
                for label, lo, hi in _bands(edges, trained=m.energy is not None):
                    dist, xs = band_distance(m, lo, hi, d=a.draw)
                    share = "" if a.threshold is None else f", {a.axis} > {a.threshold:g} {above(xs):.3f}"
                    print(f"  {label}: distance {dist:.4f}{share}", flush=True)
        except ValueError as e:
            print(f"toy_bands: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
