"""The error budget's sampler part, split between the behaviour model and the sampler: the exact grad E_t (closed
form, from the data) guides behaviour models trained for different step counts, drawn with different sampler step
counts, and each draw's distance at w = 1 is read against the floor. Part 5 of the budget
(aepo_lite.toy.trained_budget) is one cell of this grid: the preset's behaviour steps and sampler steps.

The behaviour stage depends on the task's data and its own settings only (not on the method or the seed), so the
models are the ones every run of the preset shares, trained into the cache when missing; draw d uses sampler seed
50000 + seed + d against exact target set 20000 + seed + d, as a run's draw d does.

    python scripts/behaviour_share.py --tasks moons swissroll --behaviour-steps 3000 12000 --sampler-steps 20 80 \\
        --draws 4 --cache-dir runs/s68/toycache --csv figures/toy2d_behaviour_share.csv
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from aepo_lite._io import merge_csv_rows, read_csv_rows, write_table
from aepo_lite.toy import pipeline as TT
from aepo_lite.toy import tasks as toy
from aepo_lite.toy.trained_budget import band_distance

COLUMNS = ("task", "beta", "seed", "preset", "behaviour_steps", "sampler_steps", "solver", "draws", "distance",
           "distances", "floor", "ratio")
_KEY = ("task", "beta", "seed", "preset", "behaviour_steps", "sampler_steps", "solver", "draws")
MADE_BY = "python scripts/behaviour_share.py"


def _order(r: dict) -> tuple:
    return (r["task"], float(r["beta"]), int(r["seed"]), r["preset"], int(r["behaviour_steps"]),
            int(r["sampler_steps"]), r["solver"], int(r["draws"]))


def share_rows(task: str, behaviour_steps: list[int], sampler_steps: list[int], *, draws: int = 4, seed: int = 0,
               beta: float = 10.0, preset: str = "full", cache_dir=None, progress: bool = False,
               overrides: dict | None = None) -> list[dict]:
    """One row per (behaviour steps, sampler steps): the mean over ``draws`` draws of the exact energy's distance
    at w = 1, its draws, the floor and their ratio. ``overrides``: further config fields (as for
    :func:`aepo_lite.toy.pipeline.make_config`; the tests' small sizes)."""
    rows = []
    for b in behaviour_steps:
        more = dict(overrides or {})
        cfg = TT.make_config(task, "bc", preset, **{**more, "seed": seed,
                                                     "behaviour": {**more.get("behaviour", {}), "steps": b},
                                                     "energy": {**more.get("energy", {}), "beta": beta},
                                                     "eval": {**more.get("eval", {}), "draws": draws}})
        m = TT.train_toy(cfg, cache_dir=cache_dir, progress=progress)
        floor = TT.run_floor(cfg)
        for n in sampler_steps:
            m.cfg = replace(cfg, sampling=replace(cfg.sampling, steps=n))
            dists = [band_distance(m, 0.0, 0.0, d)[0] for d in range(draws)]
            mean = sum(dists) / draws
            rows.append(dict(task=task, beta=f"{beta:g}", seed=seed, preset=preset, behaviour_steps=b,
                             sampler_steps=n, solver=cfg.sampling.solver, draws=draws, distance=f"{mean:.6f}",
                             distances=" ".join(f"{v:.6f}" for v in dists), floor=f"{floor:.6f}",
                             ratio=f"{mean / floor:.3f}"))
    return rows


def markdown(rows: list[dict]) -> str:
    """The CSV as a table: one line per task and seed, one column per (behaviour steps, sampler steps)."""
    cols = sorted({(int(r["behaviour_steps"]), int(r["sampler_steps"])) for r in rows})
    cell = {(r["task"], r["beta"], r["seed"], int(r["behaviour_steps"]), int(r["sampler_steps"])): r for r in rows}
    lines = ["# The sampler part of the error budget: behaviour model or sampler", "",
             f"Made by `{MADE_BY}`. The exact grad E_t guiding behaviour models of the preset's settings "
             "trained for B steps, drawn with S sampler steps: distance at w = 1 (mean over the draws) and its ratio "
             "to the floor. Every method's run of a task shares its behaviour model; no trained energy is involved.",
             "",
             "| task | beta | seed | floor | " + " | ".join(f"B = {b}, S = {s}" for b, s in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for task, beta, seed in sorted({(r["task"], r["beta"], r["seed"]) for r in rows}):
        got = [cell.get((task, beta, seed, b, s)) for b, s in cols]
        floor = next(r["floor"] for r in got if r)
        lines.append(f"| {task} | {beta} | {seed} | {float(floor):.4f} | " + " | ".join(
            "-" if r is None else f"{float(r['distance']):.4f} ({float(r['ratio']):.2f}x)" for r in got) + " |")
    return "\n".join(lines) + "\n"


def render(csv_path, figures_dir="figures") -> list[Path]:
    """The table (``<csv stem>.md`` in ``figures_dir``) from the CSV alone: ``aepo-lite figures``' renderer."""
    rows = read_csv_rows(csv_path, COLUMNS, made_by=MADE_BY)
    return write_table(Path(figures_dir) / (Path(csv_path).stem + ".md"), rows, "", markdown, csv_path=csv_path,
                       made_by=MADE_BY)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(toy.task_names()), help="toy tasks (default: all)")
    ap.add_argument("--behaviour-steps", nargs="+", type=int, required=True, help="behaviour models' step counts")
    ap.add_argument("--sampler-steps", nargs="+", type=int, default=[20], help="sampler step counts (the preset's 20)")
    ap.add_argument("--draws", type=int, default=4, help="distance draws per cell (a run's eval.draws)")
    ap.add_argument("--seed", type=int, default=0, help="the seed whose draws are taken (behaviour models are shared)")
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--cache-dir", default=None, help="the stage cache (behaviour models missing there are trained)")
    ap.add_argument("--csv", required=True, help="rows merge into this CSV; the table goes beside it (.md)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    for name in ("behaviour_steps", "sampler_steps"):
        if any(n < 1 for n in getattr(a, name)):
            ap.error(f"--{name.replace('_', '-')}: expected step counts >= 1, got {getattr(a, name)}")
    if a.draws < 1 or a.seed < 0:
        ap.error(f"--draws / --seed: expected draws >= 1 and seed >= 0, got {a.draws} / {a.seed}")
    unknown = sorted(set(a.tasks) - set(toy.task_names()))
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; registered: {', '.join(toy.task_names())}")
    torch.set_num_threads(1)
    try:
        for task in a.tasks:
            new = share_rows(task, a.behaviour_steps, a.sampler_steps, draws=a.draws, seed=a.seed, beta=a.beta,
                             cache_dir=a.cache_dir, progress=not a.quiet)
            for r in new:
                print(f"{task} B={r['behaviour_steps']} S={r['sampler_steps']}: distance {float(r['distance']):.4f} "
                      f"({r['ratio']}x the floor {float(r['floor']):.4f})", flush=True)
            merge_csv_rows(a.csv, new, COLUMNS, _KEY, made_by=MADE_BY, sort_key=_order)
            render(a.csv, Path(a.csv).parent)
    except ValueError as e:
        print(f"behaviour_share: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
