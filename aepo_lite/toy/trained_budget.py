"""Parts 4 and 5 of the error budget (docs/derivation.md 6b), measured on a trained toy run.

Parts 1-3 (:mod:`aepo_lite.toy.budget`) measure an estimator's *target*; these two measure what training
and sampling make of it, on the same grid of x_t weighted by mu_t, up to a constant per t:

4. ``regression``: the trained f_phi against its own target and against the exact E_t. The regression
   learns the mean of its target over the target's random draws, ybar_t(x_t) = E[y_t | x_t], so:
     - ``vs_target``: RMS(f - ybar): what the network and the optimiser leave (more steps, a bigger net);
     - ``target_bias``: RMS(ybar - E_t): the error of the target itself, bias included (a finite K, the
       Gaussian form, the critic), which no amount of regression removes;
     - ``vs_exact``: RMS(f - E_t), the energy error the tables report.
   AEPO's ybar is the average of ``draws`` draws of its target at each grid point (the centered regression
   noises its own support points, so each draw's support holds the point's source x_0 ~ p(x_0 | x_t) beside
   K - 1 uniform data points; up to a constant per t, ybar is then what it learns); MSE's is exact,
   beta E[Q(x_0) | x_t] from the data's posterior. QGPO's contrastive loss has no pointwise target: only
   ``vs_exact``.
5. ``sampler``: guided samples at w = 1 with the *exact* energy gradient (closed form, from the data)
   in place of f_phi: their distance to exact target samples, beside the floor and the trained energy's
   distance. What is left between this and the floor is the behaviour model and the sampler's
   discretisation, which no energy can remove.

:func:`trained_budget` returns both as a dict (``run_toy`` stores it in ``results.json`` under ``budget``);
``budget_rows`` / ``write_rows`` / ``render`` turn run results into ``figures/toy2d_budget_runs.{csv,md}``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from aepo_lite._io import atomic_write_text, merge_csv_rows, read_csv_rows
from aepo_lite.config import to_dict
from aepo_lite.toy import tasks as toy

__all__ = ["regression_part", "gradient_part", "band_distance", "sampler_part", "trained_budget", "budget_rows", "write_rows",
           "read_rows", "budget_markdown", "render"]

COLUMNS = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "t", "vs_exact", "vs_target",
           "target_bias", "distance", "exact_distance", "floor")
_KEY = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "t")


def _mean_target(models, pts: torch.Tensor, t: float, draws: int, g: torch.Generator) -> torch.Tensor:
    """ybar_t at the grid points: AEPO's mean over ``draws`` draws, MSE's exact beta E[Q(x_0) | x_t]."""
    from aepo_lite.toy.pipeline import data_q, energy_learner, support_batch
    cfg = models.cfg
    q = data_q(models)
    if cfg.method == "mse":
        n = cfg.eval.n_ref_data
        avg = toy.exact_posterior_average(pts, t, models.x[:n], q[:n, None], models.behaviour.schedule)
        return cfg.energy.beta * avg[:, 0]
    learner = energy_learner(cfg, models)
    learner.generator = g
    tt = torch.full((pts.shape[0],), float(t), device=pts.device, dtype=pts.dtype)
    ys = []
    for _ in range(draws):
        batch = {"s": None}
        if cfg.energy.posterior != "gaussian" and cfg.energy.centered:
            batch.update(_source_support(models, pts, t, cfg.support.k, g, q))
        elif cfg.energy.posterior != "gaussian":
            batch.update(support_batch(models, cfg.support.k, pts.shape[0], g, q))
        ys.append(learner.target(pts, tt, batch))
    return torch.stack(ys).mean(0)


def _source_support(models, pts: torch.Tensor, t: float, k: int, g: torch.Generator, q: torch.Tensor) -> dict:
    """The support a centered group gives a point x_t it noised: its own source x_0 ~ p(x_0 | x_t) (the exact
    posterior over the reference data) and k - 1 data points drawn uniformly, as in training."""
    from aepo_lite.toy.pipeline import support_batch
    n = models.cfg.eval.n_ref_data
    alpha, sigma = (float(v) for v in models.behaviour.schedule.alpha_sigma(torch.tensor(float(t))))
    logits = -torch.cdist(pts, alpha * models.x[:n]).pow(2) / (2 * sigma**2)  # (M, n): log p(x_0 = x^j | x_t) + c
    src = torch.multinomial(torch.softmax(logits, 1), 1, generator=g)  # (M, 1)
    out = {"support": models.x[src], "support_q": q[src]}
    if k > 1:
        rest = support_batch(models, k - 1, pts.shape[0], g, q)
        out = {key: torch.cat([out[key], rest[key]], 1) for key in out}
    return out


def regression_part(models, draws: int = 8, times=None, debias: bool = False) -> dict:
    """{t: {vs_exact, vs_target, target_bias}} (section 4 of the module docstring); {} without an energy.

    ``debias``: ybar from two disjoint halves of the ``draws`` (an even number >= 2), and ``vs_target`` and
    ``target_bias`` by :func:`aepo_lite.toy.tasks.energy_error_cross`, which removes the noise an average of
    finitely many draws keeps (without it both read high by the draws' variance over ``draws``); each row then
    also holds ``target_sd``, the RMS noise of one draw of the target about ybar (weighted, centered)."""
    cfg = models.cfg
    if models.energy is None:
        return {}
    if debias and (isinstance(draws, bool) or not isinstance(draws, int) or draws < 2 or draws % 2):
        raise ValueError(f"draws: debias splits the draws into two halves, so it needs an even number >= 2, "
                         f"got {draws!r}")
    from aepo_lite.toy.pipeline import BOX
    pts, _ = toy.make_grid(cfg.eval.grid_size, BOX, device=models.x.device)
    x, e = models.x[:cfg.eval.n_ref_data], models.e[:cfg.eval.n_ref_data]
    g = torch.Generator(device=models.x.device).manual_seed(70_000 + cfg.seed)
    out = {}
    for t in (cfg.eval.error_times if times is None else times):
        E, logp = toy.exact_intermediate_energy(pts, t, x, e, cfg.energy.beta, models.behaviour.schedule,
                                                return_log_density=True)
        with torch.no_grad():
            f = models.energy(None, pts, torch.full((pts.shape[0],), float(t), device=pts.device))
        row = {"vs_exact": toy.energy_error(f, E, logp), "vs_target": None, "target_bias": None}
        if cfg.method in ("aepo", "mse") and debias:
            a, b = (_mean_target(models, pts, t, draws // 2, g) for _ in range(2))
            # Var(a - b) = 4 Var(one draw) / draws, pointwise; energy_error centers and weights it as the rest
            row.update(vs_target=toy.energy_error_cross(a, b, f, logp),
                       target_bias=toy.energy_error_cross(a, b, E, logp), target_sd=toy.energy_error(a, b, logp) * (draws / 4) ** 0.5)
        elif cfg.method in ("aepo", "mse"):
            ybar = _mean_target(models, pts, t, draws, g)
            row.update(vs_target=toy.energy_error(f, ybar, logp), target_bias=toy.energy_error(ybar, E, logp))
        out[f"{t:g}"] = row
    return out


def gradient_part(models, times=None) -> dict:
    """{t: the trained energy's relative gradient error} (:func:`aepo_lite.toy.tasks.gradient_error`: RMS of
    grad f - grad E_t over RMS grad E_t, on the grid of :func:`regression_part`, weighted by mu_t): the quantity
    guidance reads, beside the values ``regression_part`` compares. {} without an energy."""
    cfg = models.cfg
    if models.energy is None:
        return {}
    from aepo_lite.toy.pipeline import BOX
    pts, _ = toy.make_grid(cfg.eval.grid_size, BOX, device=models.x.device)
    x, e = models.x[:cfg.eval.n_ref_data], models.e[:cfg.eval.n_ref_data]
    out = {}
    for t in (cfg.eval.error_times if times is None else times):
        _, logp = toy.exact_intermediate_energy(pts, t, x, e, cfg.energy.beta, models.behaviour.schedule,
                                                return_log_density=True)
        grad_e = toy.exact_energy_gradient(pts, t, x, e, cfg.energy.beta, models.behaviour.schedule)
        p = pts.clone().requires_grad_(True)
        with torch.enable_grad():
            f = models.energy(None, p, torch.full((p.shape[0],), float(t), device=p.device))
            grad_f, = torch.autograd.grad(f.sum(), p)
        out[f"{t:g}"] = toy.gradient_error(grad_f, grad_e, logp)
    return out


_SAMPLER_MEMO: dict = {}  # one exact-energy distance per behaviour model and evaluation settings, per process


def _sampler_key(models) -> str:
    cfg = models.cfg
    return json.dumps([cfg.task, cfg.data_seed, cfg.n_data, cfg.seed, to_dict(cfg.behaviour), to_dict(cfg.eval),
                       cfg.sampling.steps, cfg.sampling.solver, cfg.energy.beta, cfg.energy.clip, str(models.x.device)])


def sampler_part(models, targets: list[torch.Tensor]) -> float:
    """Distance to exact target samples of w = 1 samples guided by the exact grad E_t, the mean over draws as the
    run's own distance is (draw d: sampler seed seed + d against ``targets[d]``). It depends on the behaviour model
    and the evaluation settings only, so every method of a task and seed shares it."""
    key = _sampler_key(models)
    if key not in _SAMPLER_MEMO:
        _SAMPLER_MEMO[key] = sum(_sampler_distance(models, t, d) for d, t in enumerate(targets)) / len(targets)
    return _SAMPLER_MEMO[key]


def _sampler_distance(models, target: torch.Tensor, d: int) -> float:
    return _draw(models, _exact_guidance(models), d, target)[0]


def _exact_guidance(models):
    """The closed-form grad E_t of the run's data and beta, as the sampler's guidance callable."""
    cfg, sched = models.cfg, models.behaviour.schedule
    x, e = models.x[:cfg.eval.n_ref_data], models.e[:cfg.eval.n_ref_data]

    def exact(a_t: torch.Tensor, t: torch.Tensor, s) -> torch.Tensor:
        return toy.exact_energy_gradient(a_t, float(t.reshape(-1)[0]), x, e, cfg.energy.beta, sched).to(a_t.dtype)

    return exact


def _draw(models, guide, d: int, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Draw ``d`` at w = 1 under ``guide`` (sampler seed 50000 + seed + d, clipped as the run clips) against
    ``target``: (distance, samples)."""
    cfg = models.cfg
    g = torch.Generator(device=models.x.device).manual_seed(50_000 + cfg.seed + d)
    xs = models.behaviour.sample(cfg.eval.n_samples, n_steps=cfg.sampling.steps, solver=cfg.sampling.solver,
                                 guidance=guide, guidance_scale=1.0, generator=g).detach().cpu()
    if cfg.energy.clip is not None:
        xs = xs.clamp(-cfg.energy.clip, cfg.energy.clip)
    return toy.sliced_wasserstein(xs, target, cfg.eval.n_projections), xs


def band_distance(models, lo: float, hi: float, d: int = 0) -> tuple[float, torch.Tensor]:
    """Which diffusion times the trained energy's error costs: draw ``d`` of the distance at w = 1 when the sampler
    is guided by the exact grad E_t (closed form, as in part 5) everywhere but on the band lo <= t < hi, where the
    trained energy's own gradient guides. (distance, samples clipped to the box as the run clips them.)

    An empty band (lo = hi) is part 5's draw (it needs no trained energy: a bc run's behaviour model gives it too);
    a band over every t the sampler visits is the run's own draw at w = 1 (the same sampler seed, 50000 + seed + d,
    and target set)."""
    from aepo_lite.core.diffusion import energy_guidance
    from aepo_lite.toy.pipeline import draw_target
    cfg = models.cfg
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite diffusion time >= 0, got {v!r}")
    if hi < lo:
        raise ValueError(f"hi: the band's end {hi!r} is below its start lo = {lo!r}")
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < cfg.eval.draws:
        raise ValueError(f"d: expected one of the run's {cfg.eval.draws} distance draws (0 to {cfg.eval.draws - 1}), "
                         f"got {d!r}")
    if models.energy is None and hi > lo:
        raise ValueError(f"models: the {cfg.method} run has no trained energy to put in a band (only lo = hi)")
    trained = None if models.energy is None else energy_guidance(models.energy)
    exact = _exact_guidance(models)

    def guide(a_t: torch.Tensor, t: torch.Tensor, s) -> torch.Tensor:
        return trained(a_t, t, s) if lo <= float(t.reshape(-1)[0]) < hi else exact(a_t, t, s)

    return _draw(models, guide, d, draw_target(cfg, d))


def trained_budget(models, targets: list[torch.Tensor], draws: int = 8) -> dict:
    """Parts 4 and 5 of one trained run: {"regression": {t: {...}}, "exact_distance": float}; ``targets``: the exact
    target set of each distance draw (:func:`aepo_lite.toy.pipeline.draw_target`)."""
    return {"regression": regression_part(models, draws), "exact_distance": sampler_part(models, targets)}


def budget_rows(results: dict) -> list[dict]:
    """One run's ``results.json`` (with ``budget``) -> rows of ``toy2d_budget_runs.csv``, one per t."""
    if "budget" not in results:
        raise ValueError(f"results of {results.get('task')} {results.get('label')}: no 'budget' (made before "
                         "parts 4-5 were measured: run it again)")
    r1 = next((r for r in results["results"] if r["guidance_scale"] == 1.0), results["results"][0])
    base = dict(task=results["task"], method=results["method"], estimator=results["estimator"],
                critic=results["critic"], beta=f"{results['beta']:g}", seed=results["seed"], preset=results["preset"],
                distance=f"{r1['distance']:.6f}", exact_distance=f"{results['budget']['exact_distance']:.6f}",
                floor=f"{r1['floor']:.6f}")
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    return [dict(base, t=t, **{k: fmt(v) for k, v in part.items()})
            for t, part in results["budget"]["regression"].items()] or [dict(base, t="", vs_exact="", vs_target="",
                                                                              target_bias="")]


def read_rows(csv_path) -> list[dict]:
    return (read_csv_rows(csv_path, COLUMNS, made_by="aepo-lite toy-grid (with --budget-csv)")
            if Path(csv_path).exists() else [])


def write_rows(csv_path, new_rows: list[dict]) -> list[dict]:
    """Merge rows into the CSV (a row with the same key is replaced; others are kept), under a lock: processes
    that share the CSV keep each other's rows."""
    return merge_csv_rows(csv_path, new_rows, COLUMNS, _KEY, made_by="aepo-lite toy-grid (with --budget-csv)")


def _label(r: dict) -> str:
    return f"aepo({r['estimator']})" if r["method"] == "aepo" else r["method"]


def _mean(vals: list[str]) -> str:
    nums = [float(v) for v in vals if v != ""]
    return f"{sum(nums) / len(nums):.3f}" if nums else "-"


def budget_markdown(rows: list[dict], t: str = "0.05") -> str:
    """Per task and method (means over seeds): parts 4 at time ``t`` and part 5."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], _label(r), r["critic"], r["beta"], r["preset"]), []).append(r)
    lines = ["| task | method (Q) | f vs E_t | f vs own target | own target vs E_t | distance | exact-energy distance "
             "| floor |", "|---|---|---|---|---|---|---|---|"]
    for (task, label, critic, _, _), rs in sorted(groups.items()):
        at = [r for r in rs if r["t"] == t]
        lines.append(f"| {task} | {label} ({critic}) | {_mean([r['vs_exact'] for r in at])} | "
                     f"{_mean([r['vs_target'] for r in at])} | {_mean([r['target_bias'] for r in at])} | "
                     f"{_mean([r['distance'] for r in rs if r['t'] in (t, '')])} | "
                     f"{_mean([r['exact_distance'] for r in rs if r['t'] in (t, '')])} | "
                     f"{_mean([r['floor'] for r in rs if r['t'] in (t, '')])} |")
    return "\n".join(lines) + "\n"


def render(csv_path="figures/toy2d_budget_runs.csv", figures_dir="figures") -> list[Path]:
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows (made by aepo-lite toy-grid)")
    times = sorted({r["t"] for r in rows if r["t"] != ""}, key=float)
    text = (f"Error budget parts 4 (regression) and 5 (sampler) of docs/derivation.md 6b, generated from "
            f"`{Path(csv_path).name}` by `aepo_lite.toy.trained_budget.render` (do not edit by hand). Means over "
            "seeds. Energy errors: RMS against the reference on the 40x40 grid weighted by mu_t, up to a constant "
            "per t. `own target`: the mean of the method's regression target over its random draws (AEPO: 8 draws "
            "per point; MSE: exact); QGPO has none. An 8-draw mean keeps the draws' noise, so for AEPO both `f vs "
            "own target` and `own target vs E_t` read high by it (`toy2d_plateau.md` measures them without). "
            "Distances: sliced W2 to exact target samples at w = 1; "
            "`exact-energy distance` guides the same behaviour model and sampler with the exact grad E_t. "
            "Our measurement, not the paper's.\n")
    for t in times:
        text += f"\n### t = {t}\n\n" + budget_markdown(rows, t)
    return [atomic_write_text(Path(figures_dir) / "toy2d_budget_runs.md", text)]
