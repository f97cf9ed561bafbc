"""The whole AEPO energy update in one file (docs/derivation.md section 4), with its two baselines
(CEP and MSE, section 5) behind the same ``update(batch) -> dict`` interface.

Read top to bottom:
  1. ``posterior_estimate``: the Gaussian approximation N(a0_hat, S_hat) of mu_{0t}(.|a_t, s);
  2. ``critic_expansion``: Q, grad_a Q and -hess_a Q at a0_hat;
  3. ``aepo_target``: the analytic target y_t (first / second order or sampled);
  3b. ``insupport_target``: our in-support targets (docs/derivation.md 4b, ``EnergyConfig.posterior``):
     the posterior as a mixture over K support actions a^(k) ~ mu(.|s), so that Q is queried on
     (``particles``) or next to (``mixture``) the behaviour's support, never at a0_hat;
  4. ``EnergyLearner``: f_phi regressed on stopgrad(y_t) (AEPO, with either target), on
     beta Q(s, a_0) (MSE), or trained contrastively on K support actions (CEP / QGPO).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from aepo_lite.config import EnergyConfig
from aepo_lite.core import guidance as G
from aepo_lite._checks import check_finite, check_scalar, check_tensor
from aepo_lite.device import TrainingState, adam, cosine_schedule
from aepo_lite.core.diffusion import EpsFn
from aepo_lite.core.schedule import VPSchedule

__all__ = ["rowwise_jacobian", "JACOBIANS", "posterior_estimate", "critic_expansion", "aepo_target", "insupport_target",
           "EpsNormTable", "EnergyLearner", "differentiates_q", "ENERGY_METHODS"]

QFn = Callable[[Optional[torch.Tensor], torch.Tensor], torch.Tensor]  # (s (B, k) | None, a (B, d)) -> (B,)
ENERGY_METHODS = ("aepo", "mse", "qgpo")  # qgpo: the contrastive energy (CEP) of QGPO


class EpsNormTable(nn.Module):
    """E||eps_theta(a_t, t, s)||^2 on a grid of t, for the ``isotropic`` (Analytic-DPM) covariance.

    Built once from data with :meth:`estimate` on a grid uniform in log-SNR (where the curve is
    smooth); ``forward(t (B,)) -> (B,)`` interpolates its log linearly in log-SNR.
    """

    def __init__(self, t_grid: torch.Tensor, values: torch.Tensor, schedule: VPSchedule):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("t_grid", t_grid)
        self.register_buffer("lam_grid", schedule.lambda_(t_grid))  # decreasing
        self.register_buffer("values", values)

    @classmethod
    @torch.no_grad()
    def estimate(cls, eps_fn: EpsFn, a0: torch.Tensor, s: torch.Tensor | None, schedule: VPSchedule,
                 n_grid: int = 64, generator: torch.Generator | None = None) -> "EpsNormTable":
        """a0 (N, d) behaviour actions (and their states s (N, k) or None) -> the table."""
        t_grid = schedule.lambda_grid(n_grid - 1, dtype=a0.dtype, device=a0.device).flip(0)  # increasing t
        vals = []
        for t in t_grid:
            tt = t.expand(a0.shape[0])
            a_t, _ = schedule.diffuse(a0, tt, generator=generator)
            vals.append((eps_fn(a_t, tt, s) ** 2).sum(-1).mean())
        return cls(t_grid, torch.stack(vals), schedule)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        neg_lam = -self.lam_grid  # increasing
        x = -self.schedule.lambda_(t)
        idx = torch.searchsorted(neg_lam, x.contiguous()).clamp(1, len(neg_lam) - 1)
        x0, x1 = neg_lam[idx - 1], neg_lam[idx]
        w = ((x - x0) / (x1 - x0)).clamp(0, 1)
        # log-linear: E||eps||^2 ~ exp(-2 lambda) at low noise, so interpolate its log
        lv = torch.log(self.values.clamp_min(1e-30))
        return torch.exp((1 - w) * lv[idx - 1] + w * lv[idx])


JACOBIANS = ("loop", "vmap", "rows")  # how rowwise_jacobian batches its m backward passes


def _repeat_rows(v: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """v (B, ...) stacked k times along rows -> (k B, ...) (None stays None)."""
    return v if v is None or k == 1 else v.repeat(k, *([1] * (v.ndim - 1)))


def rowwise_jacobian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = f(x) (B, d) and J[b, i, j] = d y[b, i] / d x[b, j] (B, d, d), for f acting row by row on x (B, d).

    f must also take x's rows repeated k times ((k B, d), in order) and repeat its own per-row inputs to match
    (:func:`_repeat_rows`). ``method``:

    - ``loop``: y = f(x), then d backward passes, one per output coordinate (the default on the CPU, where a
      step is compute-bound and this measured fastest: ``scripts/gpu_paths.py``);
    - ``vmap``: y = f(x), then one vmapped backward pass for the d basis cotangents
      (``autograd.grad(..., is_grads_batched=True)``); it cannot go through a ``torch.compile``d module's backward;
    - ``rows`` (the default off the CPU): one forward of x repeated d times and one backward pass whose cotangent
      is e_i on the i-th copy: the launches of one pass for all of J (what a launch-bound GPU step needs), d times
      the flops; it works compiled and inside a CUDA graph.

    All three give the same numbers (to rounding). Rows must not mix (no batch norm), as for the loop.
    """
    method = method or ("loop" if x.device.type == "cpu" else "rows")
    if method not in JACOBIANS:
        raise ValueError(f"method: expected one of {JACOBIANS}, got {method!r}")
    B, d = x.shape
    with torch.enable_grad():
        xi = (_repeat_rows(x, d) if method == "rows" else x).detach().requires_grad_(True)
        y = f(xi)
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        if method == "rows":  # copy i of the rows gets the cotangent e_i: its gradient is row i of J
            (g,) = torch.autograd.grad(y, xi, grad_outputs=eye.repeat_interleave(B, dim=0))
            return y[:B].detach(), g.reshape(d, B, d).transpose(0, 1)
        if method == "loop":
            rows = [torch.autograd.grad(y[:, i].sum(), xi, retain_graph=i < d - 1)[0] for i in range(d)]
            return y.detach(), torch.stack(rows, dim=1)
        (jt,) = torch.autograd.grad(y, xi, grad_outputs=eye.unsqueeze(1).expand(d, B, d), is_grads_batched=True)
        return y.detach(), jt.transpose(0, 1)


def posterior_estimate(a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None, eps_fn: EpsFn,
                       schedule: VPSchedule, covariance: str = "tweedie", clip: float | None = 1.0,
                       eps_table: EpsNormTable | None = None, fit_cov: torch.Tensor | None = None, *,
                       sync_free: bool = False):
    """Gaussian approximation of mu_{0t}(a_0 | a_t, s): returns (a0_hat (B, d), S_hat (B, d, d)).

    With ``clip`` set, a0_hat is clipped to the box and S_hat's eigenvalues to at most clip^2.
    covariance: ``tweedie`` (Jacobian of eps_theta), ``isotropic`` (needs ``eps_table``),
    ``gaussian-fit`` (needs ``fit_cov``: the behaviour covariance at s, (B, d, d) or (d, d)),
    ``none`` (S_hat = 0). ``sync_free``: linear algebra that reads nothing back to the host (Jacobi sweeps
    for ``eigh``, solves without their error check), as a CUDA graph needs (:func:`_aepo_target` on CUDA).
    """
    if covariance not in G.COVARIANCES:
        raise ValueError(f"covariance: expected one of {G.COVARIANCES}, got {covariance!r}")
    B, d = a_t.shape
    alpha, sigma = schedule.alpha_sigma(t)
    need_jac = covariance == "tweedie"
    if need_jac:  # jac (B, d, d): jac[b, i, j] = d eps_i / d a_t_j
        eps, jac = rowwise_jacobian(lambda x: eps_fn(x, *(_repeat_rows(v, x.shape[0] // B) for v in (t, s))), a_t)
    else:
        with torch.enable_grad():  # as for the Jacobian: an eps_fn may differentiate a density inside
            eps = eps_fn(a_t.detach(), t, s)
    a0_hat = G.tweedie_mean(a_t, eps.detach(), alpha, sigma, clip=clip)
    max_var = None if clip is None else clip**2  # no distribution on [-clip, clip] has a larger variance
    if covariance == "tweedie":
        S_hat = G.tweedie_covariance(jac.detach(), alpha, sigma, max_var=max_var, sync_free=sync_free)
    elif covariance == "isotropic":
        if eps_table is None:
            raise ValueError("eps_table: the isotropic covariance needs an EpsNormTable (EpsNormTable.estimate)")
        S_hat = G.isotropic_covariance(eps_table(t), alpha, sigma, d, batch=B, like=a_t)
        if max_var is not None:
            S_hat = S_hat.clamp(max=max_var)
    elif covariance == "gaussian-fit":
        if fit_cov is None:
            raise ValueError("fit_cov: the gaussian-fit covariance needs the behaviour covariance at s")
        S_hat = G.gaussian_fit_covariance(fit_cov, alpha, sigma, sync_free=sync_free)
    else:
        S_hat = torch.zeros(B, d, d, dtype=a_t.dtype, device=a_t.device)
    return a0_hat, S_hat


def critic_expansion(q_fn: QFn, s: torch.Tensor | None, a: torch.Tensor, order: int = 1):
    """Q(s, a) (B,), g = grad_a Q (B, d) and, for order 2, H = -hess_a Q (B, d, d) (else None)."""
    if order >= 2:
        B = a.shape[0]

        def grad_q(x):
            (g,) = torch.autograd.grad(q_fn(_repeat_rows(s, x.shape[0] // B), x).sum(), x, create_graph=True)
            return g
        g, H = rowwise_jacobian(grad_q, a)
        with torch.no_grad():
            return q_fn(s, a).detach(), g, -H.detach()
    with torch.enable_grad():
        x = a.detach().requires_grad_(True)
        q = q_fn(s, x)
        (g,) = torch.autograd.grad(q.sum(), x)
    return q.detach(), g.detach(), None


def aepo_target(a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None, *, eps_fn: EpsFn, q_fn: QFn,
                schedule: VPSchedule, beta: float, covariance: str = "tweedie", expansion: str = "first",
                clip: float | None = 1.0, n_samples: int = 16, eps_table: EpsNormTable | None = None,
                fit_cov: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """AEPO's estimate y_t(s, a_t) of E_t = log E_{mu_0t}[exp(beta Q)]: (B, d), (B,) -> (B,), no grad.

    Validates its inputs (a ValueError naming the argument); ``EnergyLearner`` draws a_t and t
    itself and calls the unchecked :func:`_aepo_target`, so a training step pays no host syncs for
    checks. ``expansion`` defaults to ``first`` here; ``EnergyConfig``'s measured default is ``sampled``.
    """
    if expansion not in G.EXPANSIONS:
        raise ValueError(f"expansion: expected one of {G.EXPANSIONS}, got {expansion!r}")
    check_scalar("beta", beta, low=0.0)
    check_tensor("a_t", a_t, ndim=2)
    check_finite("a_t", a_t)
    check_tensor("t", t, shape=(a_t.shape[0],))
    schedule.check_t(t)
    if s is not None:
        check_tensor("s", s, ndim=2)
        if s.shape[0] != a_t.shape[0]:
            raise ValueError(f"s: expected {a_t.shape[0]} rows to match a_t, got {s.shape[0]}")
        check_finite("s", s)
    return _aepo_target(a_t, t, s, eps_fn=eps_fn, q_fn=q_fn, schedule=schedule, beta=beta, covariance=covariance,
                        expansion=expansion, clip=clip, n_samples=n_samples, eps_table=eps_table, fit_cov=fit_cov,
                        generator=generator)


def _aepo_target(a_t, t, s, *, eps_fn, q_fn, schedule, beta, covariance, expansion, clip, n_samples, eps_table,
                 fit_cov, generator, check: bool = True) -> torch.Tensor:
    """:func:`aepo_target` without the input checks (the caller made a_t and t). ``check=False`` (CUDA): nothing
    is read back to the host, neither NaN tests nor linear algebra's error flags (capturable as a CUDA graph)."""
    a0_hat, S_hat = posterior_estimate(a_t, t, s, eps_fn, schedule, covariance, clip, eps_table, fit_cov,
                                       sync_free=not check)
    if expansion == "sampled":
        K = n_samples
        s_rep = None if s is None else s.repeat_interleave(K, dim=0)
        with torch.no_grad():
            return G.aepo_target_sampled(lambda a: q_fn(s_rep, a), a0_hat, S_hat, beta, K, generator, clip=clip,
                                         check=check)
    q, g, H = critic_expansion(q_fn, s, a0_hat, order=2 if expansion == "second" else 1)
    if expansion == "first":
        return G.aepo_target_first(q, g, S_hat, beta, check=check)
    return G.aepo_target_second(q, g, H, S_hat, beta, check=check)


def insupport_target(a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None, support: torch.Tensor, *,
                     posterior: str, schedule: VPSchedule, beta: float, q_fn: QFn | None = None,
                     support_q: torch.Tensor | None = None, bandwidth: float = 0.0,
                     clip: float | None = 1.0) -> torch.Tensor:
    """Our in-support estimate y_t(s, a_t) of E_t (docs/derivation.md 4b): (B, d), (B,), support (B, K, d) -> (B,), no grad.

    The behaviour at s is the mixture (1/K) sum_k N(a^(k), h^2 I) over the support actions a^(k) ~ mu(.|s):
    ``particles`` (h = 0): y_t = log sum_k r_k(a_t) exp(beta Q(s, a^(k))), from ``support_q`` (B, K)
    (or q_fn at the support actions); ``mixture`` (h = ``bandwidth``): the first-order expansion of Q
    at each posterior component mean m~_k (clipped to the box), y_t = log sum_k r_k exp(beta Q(m~_k) +
    beta^2 s~^2 |grad Q(m~_k)|^2 / 2). Validates its inputs; :class:`EnergyLearner` calls the unchecked
    :func:`_insupport_target`.
    """
    if posterior not in ("mixture", "particles"):
        raise ValueError(f"posterior: expected 'mixture' or 'particles' (in-support targets), got {posterior!r}")
    check_scalar("beta", beta, low=0.0)
    check_scalar("bandwidth", bandwidth, low=0.0)
    check_tensor("a_t", a_t, ndim=2)
    check_finite("a_t", a_t)
    check_tensor("t", t, shape=(a_t.shape[0],))
    schedule.check_t(t)
    check_tensor("support", support, shape=(a_t.shape[0], None, a_t.shape[1]))
    if support.shape[1] < 1:
        raise ValueError("support: expected K >= 1 support actions per row, got K = 0")
    check_finite("support", support)
    if s is not None:
        check_tensor("s", s, shape=(a_t.shape[0], None))
        check_finite("s", s)
    if support_q is not None:
        check_tensor("support_q", support_q, shape=tuple(support.shape[:2]))
    elif posterior == "particles" and q_fn is None:
        raise ValueError("support_q: the particle target needs Q at the support actions (support_q or q_fn)")
    if posterior == "mixture" and q_fn is None:
        raise ValueError("q_fn: the mixture target needs a critic (Q and its gradient at each component mean)")
    with torch.no_grad():
        return _insupport_target(a_t, t, s, support, support_q, posterior=posterior, q_fn=q_fn, schedule=schedule,
                                 beta=beta, bandwidth=bandwidth, clip=clip)


def _insupport_target(a_t, t, s, support, support_q, *, posterior, q_fn, schedule, beta, bandwidth, clip,
                      check: bool = True) -> torch.Tensor:
    """:func:`insupport_target` without the input checks (the caller made a_t and t)."""
    alpha, sigma = schedule.alpha_sigma(t)
    B, K, d = support.shape
    s_rep = None if s is None else s.repeat_interleave(K, dim=0)
    if posterior == "particles":
        if support_q is None:
            with torch.no_grad():
                support_q = q_fn(s_rep, support.reshape(B * K, d)).reshape(B, K)
        return G.particle_target(a_t, support, support_q, beta, alpha, sigma, check=check)
    log_r, m_t, s2 = G.mixture_posterior(a_t, support, bandwidth, alpha, sigma, check=check)
    if clip is not None:
        m_t = m_t.clamp(-clip, clip)
    q, g, _ = critic_expansion(q_fn, s_rep, m_t.reshape(B * K, d))
    return G.mixture_target_first(log_r, q.reshape(B, K), g.reshape(B, K, d), s2, beta, check=check)


def _batch_support(batch: dict, a0: torch.Tensor, need_q: bool) -> torch.Tensor:
    """batch["support"] (B, K, d) for the in-support targets; shapes are checked (no host synchronisation)."""
    sup = batch.get("support")
    if sup is None:
        raise ValueError("support: the in-support posteriors (mixture, particles) need batch['support'] (B, K, d), "
                         "the support actions a^(k) ~ mu(.|s) of each row")
    B, d = a0.shape
    if sup.ndim != 3 or sup.shape[0] != B or sup.shape[2] != d or sup.shape[1] < 1:
        raise ValueError(f"support: expected batch['support'] of shape ({B}, K >= 1, {d}), got {tuple(sup.shape)}")
    q = batch.get("support_q")
    if q is None and need_q:
        raise ValueError("support_q: the particle target without a q_fn needs batch['support_q'] (B, K)")
    if q is not None and tuple(q.shape) != tuple(sup.shape[:2]):
        raise ValueError(f"support_q: expected batch['support_q'] of shape {tuple(sup.shape[:2])}, got {tuple(q.shape)}")
    return sup


def differentiates_q(method: str, cfg: EnergyConfig) -> bool:
    """Whether the energy target needs grad_a Q (a smooth critic): AEPO's first/second expansions of the
    Gaussian posterior and its mixture posterior. The sampled and particle targets need only values of Q."""
    gradient = cfg.posterior == "mixture" or (cfg.posterior == "gaussian" and cfg.expansion != "sampled")
    return method == "aepo" and gradient


class EnergyLearner(TrainingState):
    """Trains f_phi(s, a_t, t). ``update(batch) -> dict[str, float]``.

    ``method``: aepo (regression on AEPO's target), mse (regression on beta Q(s, a_0)) or qgpo (QGPO's
    contrastive energy, CEP). batch keys: ``a`` (B, d) behaviour actions and ``s`` (B, k) or None, for aepo
    and mse; for qgpo: ``s`` (B, k) or None, ``support`` (B, K, d) actions from mu(.|s) and ``support_q`` (B, K).
    Optional ``fit_cov`` (B, d, d) for AEPO's ``gaussian-fit``. AEPO's target follows ``cfg.posterior``:
    ``gaussian`` (``cfg.covariance`` and ``cfg.expansion``, section 4) or the in-support ``mixture``
    (bandwidth ``cfg.bandwidth``, first order per component) and ``particles`` (section 4b), which also
    read ``support`` (B, K, d) and, for particles, ``support_q`` (B, K) (else q_fn at the support actions):
    a_t is still drawn around ``a``.
    """

    def __init__(self, energy: nn.Module, cfg: EnergyConfig, *, schedule: VPSchedule,
                 eps_fn: EpsFn | None = None, q_fn: QFn | None = None, eps_table: EpsNormTable | None = None,
                 fit_cov: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 decay_steps: int | None = None, method: str = "aepo"):
        if method not in ENERGY_METHODS:
            raise ValueError(f"method: expected one of {ENERGY_METHODS}, got {method!r}")
        check_scalar("beta", cfg.beta, low=0.0)
        posterior = cfg.posterior
        if method == "aepo":
            if posterior not in G.POSTERIORS:
                raise ValueError(f"posterior: expected one of {G.POSTERIORS}, got {posterior!r}")
            check_scalar("bandwidth", cfg.bandwidth, low=0.0)
            if cfg.centered and posterior == "gaussian":
                raise ValueError("centered: the centered regression groups each state's support actions; it needs "
                                 "an in-support posterior (energy.posterior particles or mixture), not gaussian")
            if cfg.fit not in G.GROUP_FITS:
                raise ValueError(f"fit: expected one of {G.GROUP_FITS}, got {cfg.fit!r}")
        if method == "mse" or (method == "aepo" and posterior != "particles"):
            if q_fn is None:
                raise ValueError(f"q_fn: the {method} energy needs a critic")
        if method == "aepo" and posterior == "gaussian" and eps_fn is None:
            raise ValueError("eps_fn: the aepo energy needs the behaviour model's noise prediction")
        if method == "aepo" and posterior == "gaussian":
            if cfg.covariance not in G.COVARIANCES:
                raise ValueError(f"covariance: expected one of {G.COVARIANCES}, got {cfg.covariance!r}")
            if cfg.expansion not in G.EXPANSIONS:
                raise ValueError(f"expansion: expected one of {G.EXPANSIONS}, got {cfg.expansion!r}")
            if cfg.covariance == "isotropic" and eps_table is None:
                raise ValueError("eps_table: covariance='isotropic' needs an EpsNormTable")
        self.energy, self.cfg, self.schedule, self.method = energy, cfg, schedule, method
        self.module = energy  # what state_dict saves (TrainingState), with the optimiser and schedule
        self.eps_fn, self.q_fn, self.eps_table, self.fit_cov = eps_fn, q_fn, eps_table, fit_cov
        self.generator = generator
        self.opt = adam(energy.parameters(), cfg.lr)  # fused on CUDA (parameters already on their device)
        self.lr_schedule = cosine_schedule(self.opt, decay_steps)  # None: a constant learning rate
        # NaN/inf checks of targets and losses read a value back: every step on the CPU (an immediate,
        # named error), never on CUDA, where the training loop checks the metrics it logs instead
        self.check_finite = not any(p.is_cuda for p in energy.parameters())

    def _draw(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise, in the one order every loss draws it: t for x's first axis (B), then eps (rows, d),
        from this learner's generator (torch's global one when None)."""
        g = self.generator
        t = self.schedule.sample_t(x.shape[0], device=x.device, dtype=x.dtype, generator=g)
        eps = torch.randn((rows, x.shape[-1]), generator=g, dtype=x.dtype,
                          device=g.device if g is not None else x.device)
        return t, eps.to(x.device)

    def _noise(self, a0: torch.Tensor, draws: tuple | None = None):
        t, eps = draws or self._draw(a0, a0.shape[0])
        return self.schedule.diffuse(a0, t, eps=eps)[0], t

    def rowwise(self, batch: dict) -> bool:
        """Whether this loss on ``batch`` is a mean over rows whose only randomness is the diffusion noise and whose
        targets read the batch alone (no network of this seed's): QGPO's CEP and AEPO's particle target with
        ``batch["support_q"]``. Several seeds' batches can then be concatenated and their loss parts computed in
        one pass (:meth:`noise_draws` drawn seed by seed)."""
        if self.method == "qgpo":
            return True
        return self.method == "aepo" and self.cfg.posterior == "particles" and batch.get("support_q") is not None

    def noise_draws(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The random draws of :meth:`loss_parts` on ``batch`` (a :meth:`rowwise` loss), in its order and from its
        generator: the times t (B,) and the noise eps (one row per noised action: B, or B * K with support
        groups). ``loss_parts(batch, draws=noise_draws(batch))`` is ``loss_parts(batch)``."""
        if not self.rowwise(batch):
            raise ValueError(f"draws: the {self.method} energy ({self.cfg.posterior} posterior) is not row-wise on "
                             "this batch; only QGPO's CEP and the particle target with batch['support_q'] are")
        if self.method == "qgpo" or self.cfg.centered:  # one t per state, eps for each of its K support actions
            return self._draw(batch["support"], batch["support"].shape[0] * batch["support"].shape[1])
        return self._draw(batch["a"], batch["a"].shape[0])

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The energy loss on ``batch`` and extra metrics (``target_mean`` for AEPO)."""
        args, finish = self.loss_parts(batch)
        return finish(self.energy(*args))

    def loss_parts(self, batch: dict, draws: tuple | None = None
                   ) -> tuple[tuple, Callable[[torch.Tensor], tuple[torch.Tensor, dict]]]:
        """The loss in two parts: the energy network's inputs ``(s, a_t, t)`` for this batch (its noise drawn, its
        targets computed) and ``finish(f) -> (loss, extra)`` from the network's output f at them:
        ``loss(batch) == finish(self.energy(*args))``. Several seeds trained together
        (:mod:`aepo_lite.training.stacked`) call the energy networks of all seeds at once between the two.
        ``draws``: the step's noise, drawn already (:meth:`noise_draws`; a :meth:`rowwise` loss only)."""
        cfg, method, s = self.cfg, self.method, batch.get("s")
        check = self.check_finite
        if draws is not None and not self.rowwise(batch):
            raise ValueError(f"draws: the {method} energy ({cfg.posterior} posterior) is not row-wise on this "
                             "batch; it draws its own noise")
        if method == "qgpo":
            sup, q = batch["support"], batch["support_q"]
            B, K, d = sup.shape
            t, eps = draws or self._draw(sup, B * K)
            t_rep = t.repeat_interleave(K)  # one t per state, shared by its K support actions
            a_t, _ = self.schedule.diffuse(sup.reshape(B * K, d), t_rep, eps=eps)
            s_rep = None if s is None else s.repeat_interleave(K, dim=0)
            return (s_rep, a_t, t_rep), lambda f: (G.cep_loss(f.reshape(B, K), q, cfg.beta, check=check), {})
        if method == "aepo" and cfg.centered:
            return self._centered_parts(batch, draws)
        a0 = batch["a"]
        a_t, t = self._noise(a0, draws)
        if method == "mse":
            with torch.no_grad():
                q = self.q_fn(s, a0)
            return (s, a_t, t), lambda f: (G.mse_energy_loss(f, q, cfg.beta, check=check), {})
        y = self.target(a_t, t, batch)
        return (s, a_t, t), lambda f: (G.energy_regression_loss(f, y, check=check), {"target_mean": y.mean()})

    def _centered_parts(self, batch: dict, draws: tuple | None = None):
        """``cfg.centered`` (ours): each state's K support actions a^(k) are noised at one shared t, as in QGPO's
        contrastive batch, and f is regressed on the target up to a constant per state and t:

            L = mean_{b,k} ((f_bk - mean_k f_bk) - (y_bk - mean_k y_bk))^2

        Guidance reads only grad_{a_t} f, which no per-(s, t) constant changes; the plain regression also has
        to fit that constant (the state's value under beta, the largest part of the target's variance).
        ``cfg.fit == "softmax"``: L = -mean_b sum_k softmax_k(y_b) log softmax_k(f_b), QGPO's CEP loss with
        the target's values as its labels instead of beta Q(s, a^(k)); minimised by the same f = y + c, it weights
        each action by its target probability rather than every action alike."""
        s, sup = batch.get("s"), _batch_support(batch, batch["a"], self.q_fn is None)
        B, K, d = sup.shape
        t, eps = draws or self._draw(sup, B * K)
        t_rep = t.repeat_interleave(K)
        a_t, _ = self.schedule.diffuse(sup.reshape(B * K, d), t_rep, eps=eps)
        rep = {"s": None if s is None else s.repeat_interleave(K, dim=0), "support": sup.repeat_interleave(K, dim=0)}
        if batch.get("support_q") is not None:
            rep["support_q"] = batch["support_q"].repeat_interleave(K, dim=0)
        y = self.target(a_t, t_rep, rep).reshape(B, K)

        def finish(f):
            f = f.reshape(B, K)
            if self.cfg.fit == "softmax":  # y is in units of beta Q already: the labels are softmax(y)
                loss = G.cep_loss(f, y, 1.0, check=self.check_finite)
            else:
                loss = G.energy_regression_loss(f - f.mean(1, keepdim=True), y - y.mean(1, keepdim=True),
                                                check=self.check_finite)
            return loss, {"target_mean": y.mean()}
        return (rep["s"], a_t, t_rep), finish

    def target(self, a_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        """AEPO's regression target y_t at (a_t (B, d), t (B,)), one draw (the sampled expansion's samples, the
        batch's ``support``), detached: f_phi learns its mean over draws, E[y_t | a_t]. batch: ``s`` and, per
        posterior, ``support`` / ``support_q`` / ``fit_cov`` as in :meth:`loss`."""
        cfg, s = self.cfg, batch.get("s")
        if self.method != "aepo":
            raise ValueError(f"target: the {self.method} energy has no AEPO target")
        if cfg.posterior == "gaussian":  # section 4: N(a0_hat, S_hat) around the Tweedie mean
            y = _aepo_target(a_t, t, s, eps_fn=self.eps_fn, q_fn=self.q_fn, schedule=self.schedule, beta=cfg.beta,
                             covariance=cfg.covariance, expansion=cfg.expansion, clip=cfg.clip,
                             n_samples=cfg.n_samples, eps_table=self.eps_table,
                             fit_cov=batch.get("fit_cov", self.fit_cov), generator=self.generator,
                             check=self.check_finite)
        else:  # section 4b: a mixture over the support actions of each state
            y = _insupport_target(a_t, t, s, _batch_support(batch, a_t, self.q_fn is None), batch.get("support_q"),
                                  posterior=cfg.posterior, q_fn=self.q_fn, schedule=self.schedule, beta=cfg.beta,
                                  bandwidth=cfg.bandwidth, clip=cfg.clip, check=self.check_finite)
        return y.detach()

    def update(self, batch: dict) -> dict[str, float]:
        return {k: float(v) for k, v in self.step(batch).items()}

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """``update`` without reading the numbers back: 0-d tensors, no host synchronisation (GPU loops)."""
        loss, extra = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.energy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        out = {"energy_loss": loss.detach()}
        out.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
        return out
