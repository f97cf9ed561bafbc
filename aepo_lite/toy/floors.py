"""The toy noise floor, seed by seed: how much one draw of it varies (``figures/toy2d_floor_spread.{csv,md}``).

The floor of a toy table is the expected sliced-W2 distance between two independent exact target sets
(:func:`aepo_lite.toy.tasks.expected_floor`, a mean over pairs). Toy results written before it was an expectation
held one seed's draw (:func:`aepo_lite.toy.tasks.distance_floor`); this module measures that draw's spread and
sets single runs against both (``scripts/floor_spread.py`` makes the CSV; ``aepo-lite figures`` renders it).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from aepo_lite._io import atomic_write_csv, read_csv_rows, write_table
from aepo_lite.toy import tasks as toy

__all__ = ["COLUMNS", "spread_rows", "write_rows", "read_rows", "spread_markdown", "against_floors", "render"]

COLUMNS = ("task", "beta", "n", "pool_size", "n_projections", "seed", "floor")


def spread_rows(tasks, beta: float = 10.0, n: int = 2000, seeds: int = 20, pool_size: int = 100_000,
                n_projections: int = 128) -> list[dict]:
    """One row per task and seed 0 .. seeds-1: that seed's floor draw."""
    return [dict(task=t, beta=f"{beta:g}", n=n, pool_size=pool_size, n_projections=n_projections, seed=s,
                 floor=f"{toy.distance_floor(t, beta, n, seed=s, pool_size=pool_size, n_projections=n_projections):.6f}")
            for t in tasks for s in range(seeds)]


def write_rows(csv_path, rows: list[dict]) -> Path:
    return atomic_write_csv(csv_path, rows, COLUMNS)


def read_rows(csv_path) -> list[dict]:
    return read_csv_rows(csv_path, COLUMNS, made_by="python scripts/floor_spread.py")


def _by_task(rows: list[dict]) -> dict[tuple, list[float]]:
    """{(task, beta, n): [floor of seed 0, 1, ...]}"""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        out.setdefault((r["task"], r["beta"], str(r["n"])), {})[int(r["seed"])] = float(r["floor"])
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def spread_markdown(rows: list[dict]) -> str:
    lines = ["| task | beta | points a set | seeds | mean (expected floor) | std | std / mean | min | max | "
             "mean of seeds 0-2 | seeds 0, 1, 2 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (t, beta, n), f in _by_task(rows).items():
        m, sd = statistics.mean(f), statistics.stdev(f) if len(f) > 1 else 0.0
        lines.append(f"| {t} | {beta} | {n} | {len(f)} | {m:.4f} | {sd:.4f} | {sd / m:.2f} | {min(f):.4f} | "
                     f"{max(f):.4f} | {statistics.mean(f[:3]):.4f} | " + ", ".join(f"{x:.4f}" for x in f[:3]) + " |")
    return "\n".join(lines) + "\n"


def against_floors(runs: list[dict], rows: list[dict]) -> str:
    """Runs (rows of ``toy2d_convergence.csv``: task, method, estimator, seed, distance) against their own seed's
    floor draw and the mean over the spread's seeds (the expected floor), as a Markdown table."""
    floors = {t: f for (t, _, _), f in _by_task(rows).items()}
    runs = [r for r in runs if r["task"] in floors and int(r["seed"]) < len(floors[r["task"]])]
    if not runs:
        raise ValueError("runs: none on a task and seed the floor spread has")
    lines = ["| task | method | seed | distance | its seed's floor | / it | expected floor | / it |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    within = [0, 0]
    for r in sorted(runs, key=lambda r: (r["task"], r["method"], r["estimator"], int(r["seed"]))):
        f = floors[r["task"]]
        d, own, exp = float(r["distance"]), f[int(r["seed"])], statistics.mean(f)
        within[0] += d / own <= 2.0
        within[1] += d / exp <= 2.0
        label = f"aepo({r['estimator']})" if r["method"] == "aepo" else r["method"]
        lines.append(f"| {r['task']} | {label} | {r['seed']} | {d:.4f} | {own:.4f} | {d / own:.2f} | {exp:.4f} | "
                     f"{d / exp:.2f} |")
    lines += ["", f"Within 2x: {within[0]}/{len(runs)} runs against their own seed's floor, {within[1]}/{len(runs)} "
              "against the expected floor."]
    return "\n".join(lines) + "\n"


HEADER = ("The toy noise floor seed by seed, generated from `toy2d_floor_spread.csv` by `aepo_lite.toy.floors.render` "
          "(do not edit by hand; the CSV is made by `python scripts/floor_spread.py`). Each seed's floor is one draw: "
          "the sliced-W2 distance between two independent exact target sets of that size. The toy tables report the "
          "expected floor, the mean over pairs (`aepo_lite.toy.tasks.expected_floor`); a ratio to one seed's draw is "
          "off by as much as the draws vary. Our measurement.\n\n")


def render(csv_path, figures_dir) -> list[Path]:
    """``toy2d_floor_spread.md`` from the CSV alone (``aepo-lite figures``)."""
    return write_table(Path(figures_dir) / "toy2d_floor_spread.md", read_rows(csv_path), HEADER, spread_markdown,
                       csv_path=csv_path, made_by="scripts/floor_spread.py")
