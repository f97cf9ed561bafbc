"""The closed-form guidance demo (docs/derivation.md sections 3-4): checks that print PASS/FAIL and one figure.

``run_demo`` needs no data and no training. On a 2D Gaussian behaviour mu = N(m, S) with a concave
quadratic critic Q(a) = c + g^T a - a^T H a / 2 it checks, in float64:

  1. ``routes``: the two closed forms of E_t (posterior integral, and log pi_t - log mu_t + log Z) agree;
  2. ``mc``: Monte Carlo of log E_{N(m~, S~)} exp(beta Q) agrees with the closed form (in standard errors);
  3. ``aepo_linear``: AEPO's first-order target with the exact Gaussian eps and the Tweedie covariance
     equals E_t when Q is linear;
  4. ``sampler``: DPM-Solver++ 2M with the exact grad E_t (guidance scale 1) returns samples whose
     mean and covariance match pi_{t_min} (in standard errors);

then draws guided samples for a few guidance scales against the exact pi contours and writes
``closed_form_guidance.png`` and ``closed_form_checks.json`` (atomically). A failed check raises.

The figure's samples come from their own generator (seeded with ``seed``), so ``render`` (what
``aepo-lite figures`` calls) redraws the same figure, byte for byte, from the JSON alone. The JSON
holds no timing, and a rerun keeps it as it is when every number agrees to ``RERUN_RTOL`` / ``RERUN_ATOL`` (another CPU's float
rounding), so re-running the demo leaves the repository unchanged.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from aepo_lite.core import guidance as G
from aepo_lite._io import atomic_save_figure, write_json_unless_close
from aepo_lite.core.aepo import aepo_target
from aepo_lite.core.diffusion import sample
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.device import torch_threads

__all__ = ["gaussian_problem", "run_demo", "render", "SCALES", "DEFAULT_SCALE"]

SCALES = {
    # n_mc: posterior Monte Carlo samples per point; n_sampler: guided samples for the moment check;
    # n_plot: guided samples drawn per panel; sampler_steps: DPM-Solver++ 2M network evaluations.
    "smoke": dict(n_mc=1_000_000, n_sampler=20_000, n_plot=2_000, sampler_steps=50),
    "full": dict(n_mc=1_000_000, n_sampler=200_000, n_plot=4_000, sampler_steps=50),
}
# The demo's default is ``full`` (a few seconds on a CPU): it reproduces the committed
# figures/closed_form_checks.json, so ``make run`` leaves the tree clean. Byte for byte on one CPU; another CPU's
# float rounding moves the last digits (3e-12 relative between an AMD EPYC and an Intel Xeon), so the file is
# rewritten only when some number moves by more than RERUN_RTOL relative and RERUN_ATOL absolute (the identity
# checks' residuals, about 1e-13 to 1e-11, are rounding themselves). The chapters' switch AEPO_SCALE (default smoke,
# aepo_lite.course.notebook) does not apply to the demo.
DEFAULT_SCALE = "full"
RERUN_RTOL = 1e-9
RERUN_ATOL = 1e-10

# Tolerances: float64 identities, and Monte Carlo agreement in standard errors.
TOL_ROUTES = 1e-9
TOL_AEPO_LINEAR = 1e-10
TOL_MC_SE = 4.5
TOL_MEAN_SE = 4.0
TOL_COV_SE = 5.0


def gaussian_problem(dtype=torch.float64) -> dict:
    """The course's running example: behaviour N(m, S) in 2D and a concave quadratic critic.

    Returns a dict with m (2,), S (2, 2), c, g (2,), H (2, 2), beta.
    """
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return dict(m=t([-0.2, 0.1]), S=t([[0.10, 0.04], [0.04, 0.06]]), c=0.0,
                g=t([1.0, 0.6]), H=t([[1.5, 0.4], [0.4, 1.0]]), beta=3.0)


def _quadratic(a, c, g, H):
    """Q(a) = c + g^T a - a^T H a / 2 for a (B, d) -> (B,); H = None is the linear critic."""
    q = c + a @ g
    return q if H is None else q - 0.5 * ((a @ H) * a).sum(-1)


def _mc_log_expectation(mean, cov, c, g, H, beta, n, gen):
    """Monte Carlo log E exp(beta Q(x)), x ~ N(mean (d,), cov): returns (estimate, standard error)."""
    L = torch.linalg.cholesky(cov)
    z = torch.randn((n, mean.shape[0]), generator=gen, dtype=mean.dtype)
    x = mean + z @ L.T
    lw = beta * _quadratic(x, c, g, H)
    mx = lw.max()
    w = torch.exp(lw - mx)
    est = float(torch.log(w.mean()) + mx)
    se = float(w.std() / (w.mean() * math.sqrt(n)))  # delta method: sd(log mean w) = sd(w) / (mean w sqrt n)
    return est, se


def _moment_errors(x, mean, cov):
    """Largest |sample mean - mean| and |sample cov - cov| entries, in standard errors."""
    n = x.shape[0]
    se_m = (torch.diag(cov) / n).sqrt()
    z_mean = float(((x.mean(0) - mean) / se_m).abs().max())
    dg = torch.diag(cov)
    se_c = ((dg[:, None] * dg[None, :] + cov**2) / n).sqrt()  # sd of a Gaussian sample covariance entry
    C = torch.cov(x.T)
    z_cov = float(((C - cov) / se_c).abs().max())
    rel_cov = float(torch.linalg.norm(C - cov) / torch.linalg.norm(cov))
    return z_mean, z_cov, rel_cov


def _guidance_fn(P, schedule):
    """grad_{a_t} E_t of the Gaussian problem, in the sampler's (a_t, t, cond) -> (B, d) interface."""
    def guidance(x, t, cond):
        alpha, sigma = schedule.alpha_sigma(t[0])
        return G.gaussian_intermediate_energy_grad(x, P["m"], P["S"], P["c"], P["g"], P["H"], P["beta"],
                                                   float(alpha), float(sigma))
    return guidance


def _figure(P, schedule, samples: dict, m_pi, S_pi):
    """Behaviour samples, exact pi contours and guided samples, one panel per guidance scale."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    ws = list(samples)
    fig = Figure(figsize=(3.2 * len(ws), 3.6))
    axes = fig.subplots(1, len(ws), sharex=True, sharey=True)
    lo, hi = -1.2, 1.0
    grid = torch.linspace(lo, hi, 161, dtype=torch.float64)
    X, Y = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    dens_mu = G.mvn_log_prob(pts, P["m"], P["S"]).exp().reshape(X.shape).numpy()
    dens_pi = G.mvn_log_prob(pts, m_pi, S_pi).exp().reshape(X.shape).numpy()
    X, Y = X.numpy(), Y.numpy()
    behaviour = samples[0.0].numpy() if 0.0 in samples else None
    for ax, w in zip(axes, ws):
        if behaviour is not None and w != 0.0:
            ax.scatter(behaviour[:, 0], behaviour[:, 1], s=1, c="0.75", alpha=0.5, rasterized=True)
        x = samples[w].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1, c="C0" if w == 0 else "C1", alpha=0.4, rasterized=True)
        ax.contour(X, Y, dens_pi, levels=4, colors="k", linewidths=0.9)
        ax.contour(X, Y, dens_mu, levels=4, colors="C0", linewidths=1.0, linestyles="dashed")
        q_mean = float(_quadratic(samples[w], P["c"], P["g"], P["H"]).mean())
        ax.set_title(f"w = {w:g}   mean Q = {q_mean:.3f}", fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("$a_1$")
    axes[0].set_ylabel("$a_2$")
    fig.suptitle(f"Exact guidance $\\nabla E_t$ on a Gaussian behaviour (beta = {P['beta']:g}): "
                 "dashed mu, solid pi; grey: behaviour samples; w = 1 is exact", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.84, wspace=0.08)
    return fig


PLOT_SCALES = (0.0, 0.5, 1.0, 2.0)  # guidance scales of the figure's panels (w = 1 is exact)


def _plot_samples(P, schedule, seed: int, n_plot: int, steps: int, scales: Sequence[float]) -> dict:
    """Guided samples of the exact Gaussian guidance, one (n_plot, 2) set per guidance scale, from
    one x_T drawn by a generator of their own (seeded with ``seed``): the figure depends only on
    (seed, n_plot, steps, scales), all saved in the JSON."""
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n_plot, 2), generator=gen, dtype=P["m"].dtype)
    eps_fn = lambda x, t, s: G.gaussian_eps(x, t, P["m"], P["S"], schedule)  # noqa: E731
    guidance = _guidance_fn(P, schedule)
    return {float(w): sample(eps_fn, x_T, schedule=schedule, n_steps=steps, solver="dpmpp2m", guidance=guidance,
                             guidance_scale=float(w)) for w in scales}


def _save_figure(P, schedule, samples: dict, out: Path) -> Path:
    m_pi, S_pi = G.gaussian_target_policy(P["m"], P["S"], P["g"], P["H"], P["beta"])
    return atomic_save_figure(Path(out) / "closed_form_guidance.png", _figure(P, schedule, samples, m_pi, S_pi),
                              dpi=120)


def render(results: str | os.PathLike, figures_dir: str | os.PathLike) -> list[Path]:
    """Redraw ``closed_form_guidance.png`` in ``figures_dir`` from a saved ``closed_form_checks.json``
    (its seed, sample count, solver steps and guidance scales); the checks are not re-run.

    Raises:
        ValueError if the JSON lacks those settings or was made for another problem.
    """
    from aepo_lite._io import read_json

    rec = read_json(results)
    try:
        seed, cfg = int(rec["seed"]), rec["settings"]
        scales = sorted(float(w) for w in rec["guided_mean_q"])
        n_plot, steps = int(cfg["n_plot"]), int(cfg["sampler_steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"results: {results} lacks the demo settings (seed, settings.n_plot, "
                         f"settings.sampler_steps, guided_mean_q): {e!r}") from None
    P = gaussian_problem(torch.float64)
    saved = rec.get("problem", {})
    for k, v in P.items():
        if k in saved and not torch.allclose(torch.as_tensor(saved[k], dtype=torch.float64),
                                             torch.as_tensor(v, dtype=torch.float64)):
            raise ValueError(f"results: {results} was made for a different problem ({k} differs from "
                             "gaussian_problem()); re-run `aepo-lite demo`")
    with torch_threads(1):  # thousands of 2x2 solves per step: one thread is fastest
        return [_save_figure(P, VPSchedule(), _plot_samples(P, VPSchedule(), seed, n_plot, steps, scales),
                             Path(figures_dir))]


def run_demo(out_dir: str | os.PathLike = "figures", scale: str = DEFAULT_SCALE, seed: int = 0,
             verbose: bool = True) -> dict:
    """Run the closed-form checks and the guided-sampling demo; write the figure and the JSON.

    Args:
        out_dir: folder for ``closed_form_guidance.png`` and ``closed_form_checks.json``.
        scale: ``full`` (the default: the committed results) or ``smoke`` (fewer sampler draws); the
            same code path. ``AEPO_SCALE`` (the chapters' switch) is not read.
        seed: seed of every random draw here.
        verbose: print the PASS/FAIL table.
    Returns:
        dict with one entry per check (``value``, ``tol``, ``passed``) and the run's settings.
    Raises:
        RuntimeError if a check fails (after writing the JSON, which records the failure).
    """
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {tuple(SCALES)}, got {scale!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    # Every tensor here is small (2D): intra-op threads only add overhead, badly so on a busy CPU.
    with torch_threads(1):
        return _run_demo(Path(out_dir), scale, seed, verbose)


def _check_routes(P: dict, sch: VPSchedule, gen: torch.Generator) -> dict:
    """1. The two routes of derivation.md section 3b, on a grid of a_t and several times."""
    dt = torch.float64
    a_t = 1.5 * torch.randn((2000, 2), generator=gen, dtype=dt)
    worst = 0.0
    for t in [sch.t_min, 0.02, 0.1, 0.3, 0.6, 1.0]:
        al, si = (float(v) for v in sch.alpha_sigma(torch.tensor(t, dtype=dt)))
        e1 = G.gaussian_intermediate_energy(a_t, P["m"], P["S"], P["c"], P["g"], P["H"], P["beta"], al, si)
        e2 = G.gaussian_intermediate_energy_marginal(a_t, P["m"], P["S"], P["c"], P["g"], P["H"], P["beta"], al, si)
        worst = max(worst, float((e1 - e2).abs().max()))
    return dict(what="max |E_t posterior-integral - E_t marginal| (float64, 12000 points)",
                value=worst, tol=TOL_ROUTES, passed=worst < TOL_ROUTES)


def _check_mc(P: dict, sch: VPSchedule, gen: torch.Generator, n_mc: int) -> dict:
    """2. Monte Carlo over the posterior N(m~, S~) against the closed form."""
    dt = torch.float64
    z_worst, rows = 0.0, []
    for t, point in [(0.05, [0.1, -0.3]), (0.3, [0.5, 0.4]), (0.7, [-0.8, 0.2])]:
        al, si = (float(v) for v in sch.alpha_sigma(torch.tensor(t, dtype=dt)))
        x = torch.tensor([point], dtype=dt)
        exact = float(G.gaussian_intermediate_energy(x, P["m"], P["S"], P["c"], P["g"], P["H"], P["beta"], al, si)[0])
        m_t, S_t = G.gaussian_posterior(x, P["m"], P["S"], al, si)
        est, se = _mc_log_expectation(m_t[0], S_t, P["c"], P["g"], P["H"], P["beta"], n_mc, gen)
        z = abs(est - exact) / se
        z_worst = max(z_worst, z)
        rows.append(dict(t=t, a_t=point, exact=exact, mc=est, se=se, z=z))
    return dict(what=f"max |MC - closed form| / SE over 3 points, {n_mc} posterior samples each",
                value=z_worst, tol=TOL_MC_SE, passed=z_worst < TOL_MC_SE, points=rows)


def _check_aepo_linear(P: dict, sch: VPSchedule, gen: torch.Generator, eps_fn) -> dict:
    """3. AEPO's first-order target == E_t for a linear critic and the exact Gaussian eps."""
    dt = torch.float64
    q_lin = lambda s, a: _quadratic(a, P["c"], P["g"], None)  # noqa: E731
    x = 1.5 * torch.randn((200, 2), generator=gen, dtype=dt)
    t = sch.t_min + (1.0 - sch.t_min) * torch.rand(200, generator=gen, dtype=dt)
    y = aepo_target(x, t, None, eps_fn=eps_fn, q_fn=q_lin, schedule=sch, beta=P["beta"],
                    covariance="tweedie", expansion="first", clip=None)
    al, si = sch.alpha_sigma(t)
    e_lin = torch.stack([G.linear_intermediate_energy(x[i:i + 1], P["m"], P["S"], P["c"], P["g"], P["beta"],
                                                      float(al[i]), float(si[i]))[0] for i in range(x.shape[0])])
    err = float((y - e_lin).abs().max())
    return dict(what="max |AEPO first-order (tweedie, exact eps) - E_t|, linear Q, 200 (a_t, t)",
                value=err, tol=TOL_AEPO_LINEAR, passed=err < TOL_AEPO_LINEAR)


def _check_sampler(P: dict, sch: VPSchedule, gen: torch.Generator, eps_fn, cfg: dict) -> tuple[dict, dict, tuple]:
    """4. The guided sampler with exact grad E_t returns pi (compared at t_min, where it stops)."""
    dt = torch.float64
    m_pi, S_pi = G.gaussian_target_policy(P["m"], P["S"], P["g"], P["H"], P["beta"])
    a_end, s_end = (float(v) for v in sch.alpha_sigma(torch.tensor(sch.t_min, dtype=dt)))
    mean_end, cov_end = G.gaussian_marginal(m_pi, S_pi, a_end, s_end)
    x_T = torch.randn((cfg["n_sampler"], 2), generator=gen, dtype=dt)
    xs = sample(eps_fn, x_T, schedule=sch, n_steps=cfg["sampler_steps"], solver="dpmpp2m",
                guidance=_guidance_fn(P, sch), guidance_scale=1.0)
    z_mean, z_cov, rel_cov = _moment_errors(xs, mean_end, cov_end)
    mean = dict(what=f"max |mean - m_pi| / SE, dpmpp2m {cfg['sampler_steps']} steps, {cfg['n_sampler']} samples",
                value=z_mean, tol=TOL_MEAN_SE, passed=z_mean < TOL_MEAN_SE)
    cov = dict(what="max |cov - S_pi| / SE (same samples)", value=z_cov, tol=TOL_COV_SE, passed=z_cov < TOL_COV_SE,
               rel_frobenius=rel_cov)
    return mean, cov, (m_pi, S_pi)


def _run_demo(out: Path, scale: str, seed: int, verbose: bool) -> dict:
    cfg = SCALES[scale]
    t_start = time.time()
    if verbose:
        how = ("the demo's default: the committed results" if scale == DEFAULT_SCALE
               else f"not the demo's default, {DEFAULT_SCALE}")
        print(f"scale = {scale} ({how}; AEPO_SCALE, the chapters' switch, does not apply here)")
    gen = torch.Generator().manual_seed(seed)
    sch = VPSchedule()
    P = gaussian_problem(torch.float64)
    c, g, H = P["c"], P["g"], P["H"]
    eps_fn = lambda x, t, s: G.gaussian_eps(x, t, P["m"], P["S"], sch)  # noqa: E731
    checks: dict[str, dict] = {"routes": _check_routes(P, sch, gen), "mc": _check_mc(P, sch, gen, cfg["n_mc"]),
                               "aepo_linear": _check_aepo_linear(P, sch, gen, eps_fn)}
    checks["sampler_mean"], checks["sampler_cov"], (m_pi, S_pi) = _check_sampler(P, sch, gen, eps_fn, cfg)

    # the figure: guided samples for a few guidance scales (w = 1 is the exact pi)
    samples = _plot_samples(P, sch, seed, cfg["n_plot"], cfg["sampler_steps"], PLOT_SCALES)
    mean_q = {str(w): float(_quadratic(x, c, g, H).mean()) for w, x in samples.items()}
    _save_figure(P, sch, samples, out)

    # No timing here: the JSON is tracked, and the same run must write the same file.
    result = dict(checks=checks, scale=scale, seed=seed, settings=cfg,
                  problem={k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in P.items()},
                  target_policy=dict(m_pi=m_pi.tolist(), S_pi=S_pi.tolist()),
                  guided_mean_q=mean_q)
    wrote = write_json_unless_close(out / "closed_form_checks.json", result, rtol=RERUN_RTOL,
                                    atol=RERUN_ATOL)
    seconds = time.time() - t_start
    if verbose:
        print(f"{'check':<14}{'value':>12}{'tol':>10}  result")
        for name, ch in checks.items():
            print(f"{name:<14}{ch['value']:>12.3g}{ch['tol']:>10.3g}  {'PASS' if ch['passed'] else 'FAIL'}")
        print("mean Q of guided samples by guidance scale: "
              + ", ".join(f"w={w}: {v:.3f}" for w, v in mean_q.items()))
        json_part = (f"and {out / 'closed_form_checks.json'}" if wrote else
                     f"and kept {out / 'closed_form_checks.json'} (it held these numbers, to rounding)")
        print(f"wrote {out / 'closed_form_guidance.png'} {json_part} ({seconds:.1f} s)")
    failed = [k for k, ch in checks.items() if not ch["passed"]]
    if failed:
        raise RuntimeError(f"closed-form checks failed: {failed} (see {out / 'closed_form_checks.json'})")
    return result
