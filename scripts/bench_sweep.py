"""Overhead of `aepo-lite sweep` per run on the local backend (issue 13's target: under 5 s).

Runs a sweep of toy runs twice into a scratch folder: the first time every run trains (the overhead
is the sweep's wall time minus the runs' own time, per run), the second time every run is finished
and skipped (the whole time is overhead). Prints both, with the machine's load.

    python scripts/bench_sweep.py [--workers 1] [--runs 4]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from aepo_lite.rl.sweep import SweepConfig, run_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runs", type=int, default=4, help="seeds of one small toy run (bc, 150 behaviour steps)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.json"
        small.write_text(json.dumps({"behaviour": {"steps": 150}, "eval": {"n_samples": 500, "n_ref_data": 2000}}))
        cfg = SweepConfig(datasets=("toy:moons",), methods=("bc",), seeds=tuple(range(args.runs)), preset="smoke",
                          out=str(Path(tmp) / "sweep"), workers=args.workers, overrides=str(small))
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        first = run_sweep(cfg, echo=lambda *a: None)
        wall = time.perf_counter() - t0
        inside = sum(r["seconds"] for r in first["done"])
        t0 = time.perf_counter()
        again = run_sweep(cfg, echo=lambda *a: None)
        wall2 = time.perf_counter() - t0
    n = args.runs
    print(f"local backend, {args.workers} worker(s), {n} runs, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"  first sweep: {wall:.1f} s wall, runs' own time {inside:.1f} s; overhead per run "
          f"{(wall * args.workers - inside) / n:.2f} s")
    print(f"  rerun (all {len(again['skipped'])} finished, skipped): {wall2:.2f} s, {wall2 / n:.2f} s per run")


if __name__ == "__main__":
    main()
