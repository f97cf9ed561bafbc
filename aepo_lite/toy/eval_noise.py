"""How noisy one toy evaluation is (``figures/toy2d_eval_noise.{csv,md}``).

A toy run's distance is one draw: guided samples from the run's sampler seed against one exact target set.
:func:`draws` loads a finished run from its stage cache (nothing is trained) and draws the distance again with
other sampler seeds and target sets; ``scripts/eval_noise.py`` makes the CSV, ``aepo-lite figures`` renders
the table (draw 0, the mean and spread over draws, the mean over the expected floor).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from aepo_lite._io import atomic_write_csv, read_csv_rows, write_table
from aepo_lite.toy import pipeline as P

__all__ = ["COLUMNS", "draws", "rows_of", "write_rows", "read_rows", "noise_markdown", "render"]

COLUMNS = ("task", "method", "seed", "energy_steps", "draw", "distance", "floor")


def _check_cached(cfg, cache_dir) -> None:
    """Refuse (before any training) a run whose stages are not all finished in the cache."""
    from aepo_lite.training import StageStore, stage_hash
    device = torch.device("cpu")
    x, e = P._data(cfg, device)
    store = StageStore(Path(cache_dir) / cfg.task, keyed=True)
    stages = P.build_stages(cfg, P._models(cfg, x, e, device), device)
    missing = [st.name for st in stages if not store.is_complete(st.name, stage_hash(st))]
    if missing:
        raise ValueError(f"cache_dir: {cfg.task} {P.estimator_label(cfg)} seed {cfg.seed} energy.steps="
                         f"{cfg.energy.steps} has no finished {', '.join(missing)} stage in {cache_dir}: train it "
                         "first (aepo-lite toy-convergence)")


def draws(cfg, cache_dir, n_draws: int) -> list[float]:
    """The run's distance at w = 1, once per draw d: sampler seed and exact target set of seed + d, as the run's
    own evaluation draws them for d = 0."""
    _check_cached(cfg, cache_dir)
    m = P.train_toy(cfg, cache_dir=cache_dir, progress=False)
    return [P.draw_distance(m, 1.0, d)[0] for d in range(n_draws)]


def rows_of(cfg, distances: list[float]) -> list[dict]:
    floor = P.run_floor(cfg)
    return [dict(task=cfg.task, method=P.estimator_label(cfg), seed=cfg.seed, energy_steps=cfg.energy.steps, draw=d,
                 distance=f"{x:.6f}", floor=f"{floor:.6f}") for d, x in enumerate(distances)]


def write_rows(csv_path, rows: list[dict]) -> Path:
    return atomic_write_csv(csv_path, rows, COLUMNS)


def read_rows(csv_path) -> list[dict]:
    return read_csv_rows(csv_path, COLUMNS, made_by="python scripts/eval_noise.py")


def noise_markdown(rows: list[dict]) -> str:
    runs: dict[tuple, dict[int, float]] = {}
    floors = {}
    for r in rows:
        k = (r["task"], r["method"], str(r["seed"]), str(r["energy_steps"]))
        runs.setdefault(k, {})[int(r["draw"])] = float(r["distance"])
        floors[k] = float(r["floor"])
    lines = ["| task | method | seed | energy steps | draws | draw 0 | mean over draws | std | std / mean | "
             "mean / floor |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, by in runs.items():
        d = [by[i] for i in sorted(by)]
        m, sd = statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {len(d)} | {by.get(0, float('nan')):.4f} | {m:.4f} | "
                     f"{sd:.4f} | {sd / m:.2f} | {m / floors[k]:.2f} |")
    return "\n".join(lines) + "\n"


HEADER = ("Evaluation noise of the toy distance, generated from `toy2d_eval_noise.csv` by "
          "`aepo_lite.toy.eval_noise.render` (do not edit by hand; the CSV is made by `python scripts/eval_noise.py`). "
          "Each draw d samples the run's trained energy at w = 1 with the sampler seed and exact target set of the "
          "run's seed + d; draw 0 is the distance the run recorded. floor: the expected one. Our measurement.\n\n")


def render(csv_path, figures_dir) -> list[Path]:
    """``toy2d_eval_noise.md`` from the CSV alone (``aepo-lite figures``)."""
    return write_table(Path(figures_dir) / "toy2d_eval_noise.md", read_rows(csv_path), HEADER, noise_markdown,
                       csv_path=csv_path, made_by="scripts/eval_noise.py")
