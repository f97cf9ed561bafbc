"""Diagnostics of trained offline-RL runs: how large each run's guidance is, by diffusion time.

``energy_gradient_norms`` measures the mean of ||grad_{a_t} f_phi(s, a_t, t)|| over dataset states and
dataset actions noised to time t (a_t = alpha_t a + sigma_t eps). The exact E_t hardly depends on a_t at
large t (the posterior forgets a_t), so a well-fitted energy's gradient falls toward 0 as t grows;
QGPO's contrastive energy does. ``scripts/energy_gradients.py`` measures it for a set of runs
(``figures/rl_6c/energy_gradients.csv``, rendered to ``.md`` by :func:`render`, docs/derivation.md section 4b, the centered regression).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aepo_lite.core.diffusion import energy_guidance

__all__ = ["energy_gradient_norms", "gradient_rows", "gradient_table", "render"]

TIMES = (0.05, 0.2, 0.5, 0.9)


def energy_gradient_norms(run_dir, times=TIMES, n: int = 512, seed: int = 0) -> dict[float, float]:
    """Mean ||grad_{a_t} f_phi|| over ``n`` dataset transitions (drawn with ``seed``) at each t in ``times``."""
    from aepo_lite.rl.agent import load_run
    agent, cfg, data = load_run(run_dir, device="cpu")
    if agent.energy is None:
        raise ValueError(f"run: {run_dir} ({cfg.method}) has no energy network")
    T = data.tensors(agent.device)
    rng = np.random.default_rng(seed)
    i = torch.as_tensor(rng.choice(T["a"].shape[0], min(n, T["a"].shape[0]), replace=False))
    s, a0 = T["obs"][T["idx"][i]], T["a"][i]
    g = torch.Generator().manual_seed(seed)
    grad = energy_guidance(agent.energy)
    out = {}
    for t0 in times:
        t = torch.full((a0.shape[0],), float(t0))
        alpha, sigma = agent.behaviour.schedule.alpha_sigma(t)
        a_t = alpha[:, None] * a0 + sigma[:, None] * torch.randn(a0.shape, generator=g)
        out[float(t0)] = float(grad(a_t, t, s).norm(dim=-1).mean())
    return out


CSV_COLUMNS = ("dataset", "method", "seed", "t", "grad_norm")
HEADER = ("# Guidance size by diffusion time\n\nMean ||grad_a f_phi(s, a_t, t)|| over 512 dataset transitions, "
          "a_t = alpha_t a + sigma_t eps (measured by `scripts/energy_gradients.py` into `energy_gradients.csv`; "
          "docs/derivation.md section 4b).\n\n")


def gradient_rows(run_dirs, times=TIMES) -> list[dict]:
    """One CSV row per run and t: dataset, the run's label, seed, t, the mean gradient norm."""
    from aepo_lite._io import read_json
    rows = []
    for d in run_dirs:
        res = read_json(Path(d) / "results.json")
        for t, v in energy_gradient_norms(d, times).items():
            rows.append({"dataset": res["dataset"], "method": res["label"], "seed": res["seed"], "t": t, "grad_norm": v})
    return rows


def gradient_table(rows) -> str:
    """A Markdown table from :func:`gradient_rows` (or the CSV's rows): one line per run, one column per t."""
    times = sorted({float(r["t"]) for r in rows})
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["method"], str(r["seed"])), {})[float(r["t"])] = float(r["grad_norm"])
    lines = ["| dataset | method | seed | " + " | ".join(f"t = {t:g}" for t in times) + " |",
             "|---|---|---|" + "---|" * len(times)]
    for (ds, m, seed), v in cells.items():
        lines.append(f"| {ds} | {m} | {seed} | " + " | ".join(f"{v[t]:.3g}" if t in v else "n/a" for t in times) + " |")
    return "\n".join(lines) + "\n"


def render(csv_path, figures_dir) -> list[Path]:
    """``energy_gradients.md`` beside the CSV, from the CSV alone (``aepo-lite figures``)."""
    import csv
    from aepo_lite._io import write_table
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return write_table(Path(csv_path).with_suffix(".md"), rows, HEADER, gradient_table, csv_path=csv_path,
                       made_by="scripts/energy_gradients.py")
