"""The behaviour model: a state-conditional diffusion model on actions, trained by denoising
score matching, and its samplers.

Every sampler takes the condition, the number of steps, an optional guidance function and the
guidance scale as arguments; nothing about guidance is stored on the model. The guided noise
prediction is (docs/derivation.md section 2)

    eps_guided(a_t, t, s) = eps_theta(a_t, t, s) - w * sigma_t * grad_{a_t} f(s, a_t, t).

Solvers (``n_steps`` is always the number of network evaluations):
  - ``dpmpp2m``: DPM-Solver++ 2M (multistep, second order, data prediction) -- the default;
  - ``dpmpp3m``: DPM-Solver++ 3M (multistep, third order);
  - ``dpm2``:    DPM-Solver-2 (singlestep, second order, noise prediction; QGPO's choice);
  - ``ddim``:    DPM-Solver-1 / DDIM (deterministic, first order);
  - ``ddpm``:    ancestral sampling (DDIM with eta = 1), stochastic;
  - ``euler``:   Euler on the probability-flow ODE in t (the plain textbook baseline).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import nn

from aepo_lite._checks import check_finite, check_scalar, check_tensor
from aepo_lite.core.schedule import VPSchedule

__all__ = ["DiffusionModel", "sample", "energy_guidance", "FusedGuidedEps", "CapturedSampler", "SOLVERS", "EpsFn",
           "GuidanceFn", "GuidedEpsFn"]

EpsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
SOLVERS = ("dpmpp2m", "dpmpp3m", "dpm2", "ddim", "ddpm", "euler")


def energy_guidance(energy: Callable[[Optional[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]) -> GuidanceFn:
    """Turn an energy f(s, a_t, t) -> (B,) into a guidance function (a_t, t, s) -> grad_{a_t} f (B, d)."""

    def guidance(a_t: torch.Tensor, t: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            x = a_t.detach().requires_grad_(True)
            f = energy(s, x, t)
            (grad,) = torch.autograd.grad(f.sum(), x)
        return grad.detach()

    return guidance


GuidedEpsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


class FusedGuidedEps:
    """The guided noise prediction as one function, for fast sampling:

        (a_t (B, d), t (B,), s, w_sigma (0-d tensor)) -> eps_theta(a_t, t, s) - w_sigma grad_{a_t} f(s, a_t, t)

    The gradient comes from ``torch.func.grad``, which ``torch.compile`` traces, so with
    ``compile=True`` the noise network, the energy's forward and its backward become one compiled
    graph per batch size; on CUDA the mode is ``reduce-overhead``, which replays that graph as a CUDA
    graph (one launch per solver step instead of a few hundred). ``w_sigma`` is a tensor so a new
    scale or step never recompiles. Pass it to :func:`sample` as ``guided_eps``.
    """

    def __init__(self, eps_fn: EpsFn, energy: Callable, *, compile: bool = False, mode: str | None = "auto"):
        self.eps_fn, self.energy, self.compiled = eps_fn, energy, bool(compile)
        fn = self._eager
        self._cuda_graphs = False
        if compile:
            if mode == "auto":
                dev = next((p.device for p in getattr(energy, "parameters", lambda: iter(()))()), torch.device("cpu"))
                mode = "reduce-overhead" if dev.type == "cuda" else None
            self._cuda_graphs = mode == "reduce-overhead"
            fn = torch.compile(self._eager, mode=mode, dynamic=False)
        self._fn = fn

    def _eager(self, x, t, s, w_sigma):
        # torch.func.grad differentiates in a_t even under no_grad (a function transform ignores the outer
        # mode); no_grad keeps the energy's parameters out of it, so nothing here requires grad
        with torch.no_grad():
            eps = self.eps_fn(x, t, s)
            grad = torch.func.grad(lambda a: self.energy(s, a, t).sum())(x)
            return eps - w_sigma * grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor, s: Optional[torch.Tensor], w_sigma: torch.Tensor) -> torch.Tensor:
        if self._cuda_graphs:
            # each call is a new step: its output is consumed before the next call overwrites it
            torch.compiler.cudagraph_mark_step_begin()
        return self._fn(x, t, s, w_sigma)


def _guided_eps(eps_fn: EpsFn, guidance: GuidanceFn | None, w: float, x, t_scalar, sigma, cond):
    t = torch.full((x.shape[0],), float(t_scalar), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        eps = eps_fn(x, t, cond)
    if guidance is not None and w != 0.0:
        eps = eps - w * sigma * guidance(x, t, cond)
    return eps


def sample(eps_fn: EpsFn, x_T: torch.Tensor, *, schedule: VPSchedule, cond: torch.Tensor | None = None,
           n_steps: int = 15, solver: str = "dpmpp2m", guidance: GuidanceFn | None = None,
           guidance_scale: float = 0.0, t_end: float | None = None,
           generator: torch.Generator | None = None, check_nan: bool = True,
           guided_eps: GuidedEpsFn | None = None, guidance_t_max: float | None = None) -> torch.Tensor:
    """Integrate from noise x_T (B, d) at t = t_max down to t_end (default t_min).

    Args:
        eps_fn: noise prediction (a_t (B, d), t (B,), cond) -> (B, d).
        x_T: starting noise (B, d), usually standard normal.
        cond: the condition (B, state_dim) or None.
        n_steps: number of network evaluations.
        solver: one of :data:`SOLVERS`.
        guidance: (a_t, t, cond) -> grad_{a_t} f (B, d), or None for the behaviour policy.
        guidance_scale: w >= 0; w = 0 (or no guidance) is behaviour cloning.
        t_end: final time, in [t_min, t_max).
        generator: randomness for ``ddpm``.
        guided_eps: instead of ``guidance``, the whole guided prediction in one call
            (:class:`FusedGuidedEps`, optionally compiled); ``eps_fn`` then serves the unguided steps.
        guidance_t_max: guide only the network evaluations at t <= this (None: all of them).
    Returns:
        samples at t_end, (B, d).
    """
    w, t_guide, t_end = _check_sample_args(x_T, cond, schedule, n_steps, solver, guidance, guided_eps,
                                           guidance_scale, guidance_t_max, t_end)
    x = _integrate(eps_fn, x_T, cond, _grid(schedule, solver, n_steps, t_end), solver, w, t_guide, guidance,
                   guided_eps, generator)
    if check_nan:
        _check_output(x, solver, w)
    return x


def _integrate(eps_fn, x_T, cond, grid, solver: str, w: float, t_guide: float, guidance, guided_eps, generator):
    """The solver loop of :func:`sample` on checked arguments (no host read-back: a CUDA graph can hold it)."""
    def eps_at(x, i, t_val=None, sigma=None):
        t_val = grid.t[i] if t_val is None else t_val
        sigma = grid.sigma[i] if sigma is None else sigma
        w_here = w if t_val <= t_guide else 0.0
        if guided_eps is not None and w_here != 0.0:
            t = torch.full((x.shape[0],), t_val, dtype=x.dtype, device=x.device)
            return guided_eps(x, t, cond, torch.full((), w_here * sigma, dtype=x.dtype, device=x.device))
        return _guided_eps(eps_fn, guidance, w_here, x, t_val, sigma, cond)

    return _SOLVER_LOOPS[solver](x_T, eps_at, grid, generator=generator)


def _check_output(x: torch.Tensor, solver: str, w: float) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"sample: the {solver} sampler produced NaN/inf (guidance_scale={w}); "
                                 "lower the guidance scale or check the guidance network")


def _check_sample_args(x_T, cond, schedule, n_steps, solver, guidance, guided_eps, guidance_scale, guidance_t_max,
                       t_end) -> tuple[float, float, float]:
    """Validate :func:`sample`'s arguments; return (w, the guided-time limit, t_end)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps: expected a positive integer, got {n_steps!r}")
    if solver == "dpm2" and n_steps < 2:
        raise ValueError("n_steps: dpm2 needs at least 2 network evaluations")
    w = check_scalar("guidance_scale", guidance_scale, low=0.0)
    if guided_eps is not None and guidance is not None:
        raise ValueError("guided_eps: pass either guidance or guided_eps (which includes the guidance), not both")
    t_guide = math.inf if guidance_t_max is None else check_scalar("guidance_t_max", guidance_t_max, low=0.0)
    check_tensor("x_T", x_T, ndim=2)
    check_finite("x_T", x_T)
    if cond is not None:
        check_tensor("cond", cond, ndim=2)
        if cond.shape[0] != x_T.shape[0]:
            raise ValueError(f"cond: expected {x_T.shape[0]} rows to match x_T, got {cond.shape[0]}")
        check_finite("cond", cond)
    t_end = schedule.t_min if t_end is None else check_scalar("t_end", t_end, schedule.t_min, schedule.t_max)
    return w, t_guide, t_end


class _Grid:
    """The solver's time grid as python floats (the step coefficients never touch the device or force a sync):
    ``t``, ``alpha``, ``sigma``, ``lam`` (log-SNR / 2) at each grid point."""

    def __init__(self, schedule: VPSchedule, solver: str, n_steps: int, t_end: float):
        self.schedule, self.n_steps = schedule, n_steps
        if solver in ("euler", "ddpm"):
            ts = torch.linspace(schedule.t_max, t_end, n_steps + 1, dtype=torch.float64)
        elif solver == "dpm2":
            n_second, n_first = divmod(n_steps, 2)
            ts = schedule.lambda_grid(n_second + n_first, t_end=t_end)
        else:
            ts = schedule.lambda_grid(n_steps, t_end=t_end)
        la64 = schedule.log_alpha(ts)
        alphas, sigmas = torch.exp(la64), torch.sqrt(-torch.expm1(2 * la64))
        self.lams64 = la64 - torch.log(sigmas)
        self.t, self.alpha, self.sigma, self.lam = ts.tolist(), alphas.tolist(), sigmas.tolist(), self.lams64.tolist()
        if solver == "dpm2":  # the lambda midpoints of its second-order steps
            t_mid = schedule.t_of_lambda(0.5 * (self.lams64[:-1] + self.lams64[1:]))
            a_mid, s_mid = schedule.alpha_sigma(t_mid)
            self.t_mid, self.alpha_mid, self.sigma_mid = t_mid.tolist(), a_mid.tolist(), s_mid.tolist()


@functools.lru_cache(maxsize=64)
def _grid(schedule: VPSchedule, solver: str, n_steps: int, t_end: float) -> _Grid:
    """The solver's grid, made once per (schedule, solver, steps, end) and shared (read-only) by every call with
    them: the same floats each time, and making them costs host time (0.14 ms here, against a GPU target of
    1 ms for a whole guided action)."""
    return _Grid(schedule, solver, n_steps, t_end)


def _dpmpp2m(x, eps_at, g: _Grid, **_):
    """DPM-Solver++ 2M: the x0 prediction, extrapolated linearly in lambda from the previous step."""
    al_, si_, la_ = g.alpha, g.sigma, g.lam
    x0_prev, h_prev = None, None
    for i in range(g.n_steps):
        eps = eps_at(x, i)
        x0 = (x - si_[i] * eps) / al_[i]
        h = la_[i + 1] - la_[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (si_[i + 1] / si_[i]) * x - al_[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def _dpmpp3m(x, eps_at, g: _Grid, **_):
    """DPM-Solver++ 3M: a quadratic extrapolation of the x0 prediction over the last three steps."""
    al_, si_, la_ = g.alpha, g.sigma, g.lam
    hist: list[tuple[torch.Tensor, float]] = []  # (x0 prediction, lambda) of earlier steps
    for i in range(g.n_steps):
        eps = eps_at(x, i)
        x0 = (x - si_[i] * eps) / al_[i]
        h = la_[i + 1] - la_[i]
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1.0
        x_new = (si_[i + 1] / si_[i]) * x - al_[i + 1] * phi1 * x0
        if len(hist) == 1:
            r0 = (la_[i] - hist[-1][1]) / h
            x_new = x_new + al_[i + 1] * phi2 * (x0 - hist[-1][0]) / r0
        elif len(hist) >= 2:
            (x1, l1), (x2, l2) = hist[-1], hist[-2]
            r0, r1 = (la_[i] - l1) / h, (l1 - l2) / h
            d10, d11 = (x0 - x1) / r0, (x1 - x2) / r1
            d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
            phi3 = phi2 / h - 0.5
            x_new = x_new + al_[i + 1] * phi2 * d1 - al_[i + 1] * phi3 * d2
        hist = (hist + [(x0, la_[i])])[-2:]
        x = x_new
    return x


def _dpm2(x, eps_at, g: _Grid, **_):
    """DPM-Solver-2 (QGPO's): second-order steps through the lambda midpoint, a first-order step if n is odd."""
    al_, si_, la_ = g.alpha, g.sigma, g.lam
    n_second, n_first = divmod(g.n_steps, 2)
    tm_, am_, sm_ = g.t_mid, g.alpha_mid, g.sigma_mid  # midpoints in lambda of the second-order steps
    for i in range(n_second + n_first):
        h = la_[i + 1] - la_[i]
        eps = eps_at(x, i)
        if i < n_second:
            t_s, a_s, s_s = tm_[i], am_[i], sm_[i]
            u = (a_s / al_[i]) * x - s_s * math.expm1(0.5 * h) * eps
            eps = eps_at(u, i, t_val=t_s, sigma=s_s)
        x = (al_[i + 1] / al_[i]) * x - si_[i + 1] * math.expm1(h) * eps
    return x


def _ddim(x, eps_at, g: _Grid, *, eta: float = 0.0, generator=None):
    """DDIM(eta); eta = 1 draws the DDPM posterior's fresh noise (from ``generator``)."""
    al_, si_ = g.alpha, g.sigma
    for i in range(g.n_steps):
        eps = eps_at(x, i)
        x0 = (x - si_[i] * eps) / al_[i]
        a1, s1, s0, a0 = al_[i + 1], si_[i + 1], si_[i], al_[i]
        # c is the std of the fresh noise; eta = 1 is the DDPM posterior
        c2 = eta**2 * (s1**2 / s0**2) * (1.0 - (a0 / a1) ** 2)
        c = max(c2, 0.0) ** 0.5
        x = a1 * x0 + max(s1**2 - c**2, 0.0) ** 0.5 * eps
        if c > 0:
            dev = x.device
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                            device=generator.device if generator is not None else dev).to(dev)
            x = x + c * z
    return x


def _ddpm(x, eps_at, g: _Grid, *, generator=None):
    return _ddim(x, eps_at, g, eta=1.0, generator=generator)


def _euler(x, eps_at, g: _Grid, **_):
    """Euler on the probability-flow ODE: dx/dt = -b(t)/2 x + b(t)/(2 sigma) eps."""
    sch = g.schedule
    for i in range(g.n_steps):
        eps = eps_at(x, i)
        b = sch.b0 + g.t[i] * (sch.b1 - sch.b0)
        dxdt = -0.5 * b * x + 0.5 * b * eps / g.sigma[i]
        x = x + (g.t[i + 1] - g.t[i]) * dxdt
    return x


_SOLVER_LOOPS = {"dpmpp2m": _dpmpp2m, "dpmpp3m": _dpmpp3m, "dpm2": _dpm2, "ddim": _ddim, "ddpm": _ddpm,
                 "euler": _euler}


class DiffusionModel(nn.Module):
    """eps_theta on a VP-SDE. ``loss(a0, s)`` is denoising score matching; ``sample`` draws actions.

    The score of mu_t is -eps_theta / sigma_t.
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule or VPSchedule()

    def eps(self, a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(a_t, t, s): (B, d), (B,), (B, state_dim)|None -> (B, d)."""
        return self.net(a_t, t, s)

    def loss(self, a0: torch.Tensor, s: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """E || eps_theta(alpha_t a0 + sigma_t eps, t, s) - eps ||^2 with t ~ U[t_min, t_max]."""
        t = self.schedule.sample_t(a0.shape[0], device=a0.device, dtype=a0.dtype, generator=generator)
        a_t, eps = self.schedule.diffuse(a0, t, generator=generator)
        return ((self.eps(a_t, t, s) - eps) ** 2).sum(-1).mean()

    def sample(self, n: int | None = None, cond: torch.Tensor | None = None, *, n_steps: int = 15,
               solver: str = "dpmpp2m", guidance: GuidanceFn | None = None, guidance_scale: float = 0.0,
               generator: torch.Generator | None = None, clip: float | None = None,
               action_dim: int | None = None, guided_eps: GuidedEpsFn | None = None,
               guidance_t_max: float | None = None) -> torch.Tensor:
        """Draw one action per condition row (or ``n`` unconditional samples). Returns (B, d).
        ``guided_eps`` and ``guidance_t_max``: see :func:`sample`."""
        d = action_dim or getattr(self.net, "action_dim", None)
        if d is None:
            raise ValueError("action_dim: the network does not say its action size; pass action_dim")
        if cond is not None:
            n = cond.shape[0]
        if n is None or n < 1:
            raise ValueError(f"n: expected a positive sample count or a condition, got {n!r}")
        x_T = self.initial_noise(n, d, generator)
        x = sample(self.eps, x_T, schedule=self.schedule, cond=cond, n_steps=n_steps, solver=solver,
                   guidance=guidance, guidance_scale=guidance_scale, generator=generator, guided_eps=guided_eps,
                   guidance_t_max=guidance_t_max)
        return x.clamp(-clip, clip) if clip is not None else x

    def initial_noise(self, n: int, action_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), (n, action_dim), on the model's device, drawn from ``generator`` as :meth:`sample`
        draws it."""
        p = next(self.parameters())
        return torch.randn((n, action_dim), generator=generator, dtype=p.dtype,
                           device=generator.device if generator is not None else p.device).to(p.device)


class CapturedSampler:
    """:func:`sample` of one batch size as one CUDA graph per guidance scale: the solver loop, every network call
    and guidance gradient replayed as one launch (a 15-step guided action is otherwise hundreds of launches and
    the host's work between them; docs/gpu.md). On the CPU the same calls run eagerly and give :func:`sample`'s
    numbers exactly; on CUDA a scale is captured at its first call (after ``warmup`` eager calls), and a capture
    that fails runs eagerly instead with ``capture_error`` saying why.

    ``x_T`` and ``cond`` (an example batch) fix the shapes: each call copies its own into static buffers. The
    solver must be deterministic (every one but ``ddpm``, which draws noise at each step). ``guidance``: an
    eager guidance function (:func:`energy_guidance`; a compiled :class:`FusedGuidedEps` makes CUDA graphs of
    its own). Each call returns the samples (a copy of the graph's output) after :func:`sample`'s NaN/inf test.
    """

    def __init__(self, eps_fn: EpsFn, *, schedule: VPSchedule, x_T: torch.Tensor, cond: torch.Tensor | None = None,
                 n_steps: int = 15, solver: str = "dpmpp2m", guidance: GuidanceFn | None = None,
                 guidance_t_max: float | None = None, t_end: float | None = None, warmup: int = 2):
        if solver == "ddpm":
            raise ValueError("solver: ddpm draws fresh noise at every step; a captured sampler replays a "
                             f"deterministic solver (one of {tuple(s for s in SOLVERS if s != 'ddpm')})")
        _, self.t_guide, t_end = _check_sample_args(x_T, cond, schedule, n_steps, solver, guidance, None, 0.0,
                                                    guidance_t_max, t_end)
        self.eps_fn, self.guidance, self.solver, self.warmup = eps_fn, guidance, solver, int(warmup)
        self.grid = _grid(schedule, solver, n_steps, t_end)
        self.x = x_T.detach().clone()
        self.cond = None if cond is None else cond.detach().clone()
        self.graph_on = self.x.device.type == "cuda"
        self.graphs: dict[float, tuple] = {}  # guidance scale -> (graph, its static output)
        self.capture_error: str | None = None

    def __call__(self, x_T: torch.Tensor, cond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        w = check_scalar("guidance_scale", guidance_scale, low=0.0)
        for name, v, buf in (("x_T", x_T, self.x), ("cond", cond, self.cond)):
            if (v is None) != (buf is None) or (v is not None and tuple(v.shape) != tuple(buf.shape)):
                raise ValueError(f"batch size: {name} has shape {None if v is None else tuple(v.shape)} but this "
                                 f"captured sampler holds {None if buf is None else tuple(buf.shape)} (a CUDA graph "
                                 "replays fixed shapes); make one per batch size")
        if cond is not None:
            check_finite("cond", cond)  # as sample() does: states come from outside (x_T from randn)
        with torch.no_grad():
            self.x.copy_(x_T)
            if cond is not None:
                self.cond.copy_(cond)
        if not self.graph_on or self.capture_error is not None:
            x = self._run(w)
        else:
            if w not in self.graphs:
                self.graphs[w] = self._capture(w)
            graph, out = self.graphs[w]
            if graph is None:
                x = self._run(w)
            else:
                graph.replay()
                x = out.clone()
        _check_output(x, self.solver, w)
        return x

    def _run(self, w: float) -> torch.Tensor:
        return _integrate(self.eps_fn, self.x, self.cond, self.grid, self.solver, w, self.t_guide, self.guidance,
                          None, None)

    def _capture(self, w: float) -> tuple:
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy initialisations (cuBLAS workspaces, autograd) outside the capture
                self._run(w)
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._run(w)
        except RuntimeError as e:  # torch's CUDA errors are RuntimeErrors
            self.capture_error = f"the sampler could not be captured as a CUDA graph: {str(e).strip().splitlines()[0]}"
            return None, None
        return graph, out
