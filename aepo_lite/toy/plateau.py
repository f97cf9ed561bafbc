"""Where a toy energy's plateau comes from: the regression part of the error budget, without draw noise.

When more energy steps no longer lower a run's energy error (``figures/toy2d_convergence.md``), what is left is
either the regression (the network and optimiser have not reached the mean of their target, ybar_t) or the
target itself (ybar_t is off E_t: a finite K, the Gaussian form, the critic). Part 4 of the budget
(:func:`aepo_lite.toy.trained_budget.regression_part`) tells them apart, but its default averages 8 draws of
the target, and that average keeps the draws' noise: both of its columns read high by the noise over 8. Here
the same part runs with ``debias=True`` (two halves of the draws and a cross product, exact in expectation),
on a finished run's cached stages, for the run's own K and for other K of the same target (the trained f is
then compared with the target it would have had), so that a plateau is named by its part and a larger K's
target bias says how far it could fall.

``rows(run_dir, cache_dir, ...)`` measures one run, ``write_rows`` merges rows into
``figures/toy2d_plateau.csv``, ``render`` writes ``figures/toy2d_plateau.md``. ``scripts/plateau_budget.py``
is the command.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from aepo_lite._io import atomic_write_text, merge_csv_rows, read_csv_rows

__all__ = ["COLUMNS", "rows", "write_rows", "read_rows", "means_over_t", "is_runs_k", "render"]

COLUMNS = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "energy_steps", "k", "t", "draws",
           "vs_exact", "vs_target", "target_bias", "target_sd", "critic_steps", "target_q", "grad_vs_exact")
_KEY = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "energy_steps", "k", "t", "critic_steps",
        "target_q")
# added later, read so from rows made before them: critic_steps blank where the run read the true reward;
# target_q blank where the target reads the run's own Q, "reward" where it reads the true reward instead
# grad_vs_exact: the trained f's relative gradient error (blank in rows made before it)
OPTIONAL = {"critic_steps": "", "target_q": "", "grad_vs_exact": ""}
MADE_BY = "python scripts/plateau_budget.py"


def _check_ks(ks) -> list[int]:
    if ks is None:
        return []
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise ValueError(f"ks: every K must be an integer >= 1, got {list(ks)!r}")
    return sorted(set(ks))


def rows(run_dir, cache_dir, ks=None, draws: int = 32, times=None, device: str | None = None,
         true_reward: bool = False) -> list[dict]:
    """One row per K and t for the finished toy run in ``run_dir`` (its ``config.json``; stages from
    ``cache_dir``, nothing trained): the trained f against E_t (``vs_exact``), against the mean target of K
    support points (``vs_target``), that mean target against E_t (``target_bias``) and one draw's noise about
    it (``target_sd``), from ``draws`` draws (even) without their noise, and the trained f's relative gradient
    error (``grad_vs_exact``, :func:`aepo_lite.toy.trained_budget.gradient_part`). ``ks``: default the run's own K;
    only particle and mixture targets have a K (other AEPO targets and MSE get one row per t, k blank). A qgpo
    run's contrastive energy has no pointwise target: its rows hold ``vs_exact`` and ``grad_vs_exact`` alone.
    ``true_reward``: for a run with a fitted critic, also the rows of the same target reading the true reward
    e(x) in place of the critic (``target_q`` "reward"; the same behaviour model, K and draws), so that the
    target's bias splits into what the critic adds and what the target's form leaves with the exact Q."""
    from aepo_lite.config import ToyConfig, apply_overrides, from_dict
    from aepo_lite.toy.pipeline import estimator, train_toy
    from aepo_lite.toy.trained_budget import gradient_part, regression_part
    ks = _check_ks(ks)
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"run_dir: {run_dir} holds no config.json (a toy run folder, e.g. "
                         "runs/convergence/<task>/...)")
    cfg = from_dict(ToyConfig, json.loads(path.read_text()))
    if cfg.method not in ("aepo", "mse", "qgpo"):
        raise ValueError(f"run_dir: {run_dir} is a {cfg.method} run, which trains no energy (aepo, mse and qgpo "
                         "runs do)")
    target = cfg.method != "qgpo"  # QGPO's contrastive loss has no pointwise target: its rows hold f alone
    if not target and (ks or true_reward):
        raise ValueError(f"{'ks' if ks else 'true_reward'}: the run in {run_dir} is a qgpo run, whose energy has "
                         "no regression target to vary (only its error and gradient error are measured)")
    if device is not None:
        cfg = apply_overrides(cfg, {"device": device})
    models = train_toy(cfg, cache_dir=cache_dir, progress=False, trained_only=True)
    has_k = cfg.method == "aepo" and cfg.energy.posterior != "gaussian"
    if ks and not has_k:
        raise ValueError(f"ks: the run in {run_dir} ({estimator(cfg) if cfg.method == 'aepo' else 'mse'}) has no "
                         "support points, so no K to vary")
    if true_reward and models.critic is None:
        raise ValueError(f"true_reward: the run in {run_dir} reads the true reward already (critic "
                         f"{cfg.critic.kind!r}), so there is no critic to swap for it")
    grads = gradient_part(models, times=times)  # of the trained f alone: one value per t, whatever the target
    out = []
    for k, q in itertools.product((ks or [cfg.support.k]) if has_k else [None],
                                  ["", "reward"] if true_reward else [""]):
        m = models if k in (None, cfg.support.k) else dataclasses.replace(
            models, cfg=apply_overrides(cfg, {"support": {"k": k}}))
        if q == "reward":  # every Q the target reads (at its Gaussian samples, at its support points) is e(x)
            m = dataclasses.replace(m, critic=None)
        for t, part in regression_part(m, draws=draws, times=times, debias=True).items():
            out.append({"task": cfg.task, "method": cfg.method, "estimator": estimator(cfg) if cfg.method == "aepo"
                        else "", "critic": cfg.critic.kind, "beta": f"{cfg.energy.beta:g}", "seed": cfg.seed,
                        "preset": _preset(run_dir),
                        "energy_steps": cfg.energy.steps, "k": "" if k is None else k, "t": t,
                        "draws": draws if target else "",
                        **{c: "" if part.get(c) is None else f"{part[c]:.6f}"
                           for c in ("vs_exact", "vs_target", "target_bias", "target_sd")},
                        "critic_steps": cfg.critic.steps if cfg.critic.kind == "regression" else "",
                        "target_q": q, "grad_vs_exact": f"{grads[t]:.6f}"})
    return out


def _preset(run_dir) -> str:
    """The preset the run was made from, as its results record it (blank when they do not)."""
    res = Path(run_dir) / "results.json"
    return json.loads(res.read_text()).get("preset", "") if res.exists() else ""


def read_rows(csv_path) -> list[dict]:
    return read_csv_rows(csv_path, COLUMNS, made_by=MADE_BY, optional=OPTIONAL) if Path(csv_path).exists() else []


def write_rows(csv_path, new_rows: list[dict]) -> list[dict]:
    """Merge ``new_rows`` into the CSV (a row with the same key replaced) and return all of them."""
    return merge_csv_rows(csv_path, new_rows, COLUMNS, _KEY, made_by=MADE_BY, optional=OPTIONAL,
                          sort_key=lambda r: (r["task"], r["estimator"], r["critic"], int(r["critic_steps"] or 0),
                                              int(r["seed"]), int(r["energy_steps"]), float(r["t"]),
                                              int(r["k"] or 0), r["target_q"]))


def is_runs_k(r: dict) -> bool:
    """Whether the row compares the run with its own target (the K it was trained with, or a target without K)."""
    return not r["k"] or f"K{r['k']}-" in r["estimator"] + "-"


def means_over_t(rs: list[dict]) -> list[dict]:
    """One row per run and K: its key fields, ``times`` (the t measured) and the mean over them of ``vs_exact``,
    ``vs_target`` and ``target_bias`` (floats), and ``grad_vs_exact`` per t (a list, not a mean: a relative error
    is large where grad E_t is small, at large t, and would swamp a mean; None where a row lacks it), in the
    rows' order."""
    groups: dict = {}
    for r in rs:
        groups.setdefault(tuple(r[c] for c in _KEY if c != "t"), []).append(r)
    return [{**{c: g[0][c] for c in _KEY if c != "t"}, "times": [x["t"] for x in g],
             **{c: sum(float(x[c]) for x in g) / len(g) if all(x[c] for x in g) else None
                for c in ("vs_exact", "vs_target", "target_bias")},
             "grad_vs_exact": [float(x["grad_vs_exact"]) for x in g] if all(x["grad_vs_exact"] for x in g) else None}
            for g in groups.values()]


def _k(r: dict) -> str:
    """The row's K, marked "(run's)" where it is the K the run was trained with."""
    if not r["k"]:
        return "-"
    return r["k"] + (" (run's)" if is_runs_k(r) else "")


def _label(r: dict) -> str:
    return f"aepo({r['estimator']})" if r["method"] == "aepo" else r["method"]


def _critic(r: dict) -> str:
    """The run's Q: ``reward`` (the true reward) or the fitted critic with its training steps."""
    return r["critic"] + (f", {r['critic_steps']} steps" if r["critic_steps"] else "")


def _num(v, digits: int) -> str:
    """A table cell: ``-`` for a blank (a qgpo run's target columns; a column a row was made before)."""
    return "-" if v in ("", None) else f"{float(v):.{digits}f}"


def _target_q(r: dict) -> str:
    if r["method"] == "qgpo":
        return "-"
    return "true reward" if r["target_q"] == "reward" else "run's"


def render(csv_path="figures/toy2d_plateau.csv", figures_dir="figures") -> list[Path]:
    """``toy2d_plateau.md`` from the CSV alone: per t, each run's energy error beside its parts."""
    rs = read_rows(csv_path)
    if not rs:
        raise ValueError(f"{csv_path}: no rows (made by {MADE_BY})")
    text = (f"Where a trained toy energy's error comes from, generated from `{Path(csv_path).name}` by "
            "`aepo_lite.toy.plateau.render` (do not edit by hand). Error budget part 4 (docs/derivation.md 6b) on "
            "a finished run, without the noise of averaging finitely many target draws (two halves of the draws "
            "and their cross product: `aepo_lite.toy.tasks.energy_error_cross`). Energy errors: RMS on the 40x40 "
            "grid weighted by mu_t, up to a constant per t. `f vs E_t`: the trained energy's error (the "
            "convergence table's); `f vs target`: what the regression leaves, against the mean target of K "
            "support points (0.000: below the draws' noise); `target vs E_t`: the error of that mean target "
            "itself, which no training removes; `one draw's noise`: the RMS spread of a single draw of the target. "
            "A K other than the run's own compares the trained f with the target it would have had; so does the "
            "target's Q `true reward` for a run trained on a fitted critic (the same target reading e(x) in its "
            "place). `grad f vs grad E_t`: the trained energy's gradient error, RMS of grad f - grad E_t over RMS "
            "grad E_t on the same grid and weights (0: exact; 1: the error of no guidance at all), what the sampler "
            "reads (`-`: a row made before it was measured). Our measurement, not the paper's.\n")
    for t in sorted({r["t"] for r in rs}, key=float):
        text += ("\n### t = " + t + "\n\n| task | method (Q) | seed | energy steps | K | target's Q | draws "
                 "| f vs E_t | f vs target "
                 "| target vs E_t | one draw's noise | grad f vs grad E_t |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in (r for r in rs if r["t"] == t):
            text += (f"| {r['task']} | {_label(r)} ({_critic(r)}) | {r['seed']} | {r['energy_steps']} | "
                     f"{_k(r)} | {_target_q(r)} | {r['draws'] or '-'} | "
                     + " | ".join(_num(r[c], 3) for c in ("vs_exact", "vs_target", "target_bias", "target_sd"))
                     + f" | {_num(r['grad_vs_exact'], 2)} |\n")
    text += ("\n### Mean over t\n\nEach column's mean over the times of its row: over the run's own error times "
             "(0.05, 0.2, 0.5) `f vs E_t` is the convergence table's energy error, and `target vs E_t` where that "
             "error settles once the regression has reached that target. The gradient error is listed at each t "
             "instead (relative to grad E_t, which is small at large t).\n\n"
             "| task | method (Q) | seed | energy steps | K | target's Q | times | f vs E_t | f vs target "
             "| target vs E_t | grad f vs grad E_t at each t |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in means_over_t(rs):
        text += (f"| {r['task']} | {_label(r)} ({_critic(r)}) | {r['seed']} | {r['energy_steps']} | {_k(r)} | "
                 f"{_target_q(r)} | "
                 f"{', '.join(r['times'])} | "
                 + " | ".join(_num(r[c], 4) for c in ("vs_exact", "vs_target", "target_bias"))
                 + f" | {' / '.join(_num(v, 2) for v in r['grad_vs_exact'] or [''])} |\n")
    return [atomic_write_text(Path(figures_dir) / "toy2d_plateau.md", text)]
