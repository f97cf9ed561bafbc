"""The error budget of docs/derivation.md section 6b on the toy tasks: where an estimator's error comes from.

On a toy task the exact E_t is known (section 6), so the error of an estimator's target y_t splits
into parts. Each is the RMS of y_t - E_t over a grid of x_t weighted by mu_t, after removing the best
constant per t (:func:`aepo_lite.toy.tasks.energy_error`), and each part adds one source of error to
the one before:

1. ``approximation``: the target with the exact posterior (from the data) and the true reward e(x).
   Gaussian estimators get the exact Tweedie moments through the exact noise prediction
   eps*(x_t) = (x_t - alpha E[x_0|x_t]) / sigma of the data (its Jacobian is the exact posterior
   covariance); the in-support estimators draw their K support actions from the data. What is left
   is the cost of the Gaussian (or mixture) form, the expansion of Q and a finite K.
2. ``moments``: the same with the behaviour model: its eps_theta for the Gaussian estimators, K
   samples of the diffusion sampler as support actions for the in-support ones.
3. ``critic``: the same as 2 with the fitted smooth critic instead of e(x): what AEPO trains on.

The toy rewards are piecewise constant (or clipped), so grad e = 0 almost everywhere: with the true
reward the first- and second-order targets reduce to beta e(a0_hat) (the gradient is the true one,
zero, where it exists). That is part of what parts 1-2 measure and why part 3 uses a smooth critic.

Parts (4) regression (the trained f_phi against its target and against E_t) and (5) sampler (guided
samples against exact target samples) need trained energies from the toy pipeline: not here yet.

Entry point: ``run_budget(BudgetConfig(...), models=...)`` writes ``figures/toy2d_budget.{csv,md,png}``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from aepo_lite._checks import check_scalar
from aepo_lite._io import atomic_save_figure, atomic_write_csv, atomic_write_text, read_csv_rows
from aepo_lite.config import BehaviourConfig, CriticConfig
from aepo_lite.core import guidance as G
from aepo_lite.core.aepo import EpsNormTable, aepo_target, insupport_target
from aepo_lite.core.diffusion import SOLVERS, DiffusionModel
from aepo_lite.core.nets import MLP, NoiseNet
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.toy import tasks as toy

__all__ = ["BudgetConfig", "PARTS", "estimator_names", "exact_eps_fn", "reference", "approximation_part",
           "moments_part", "critic_part", "task_budget", "train_models", "run_budget", "write_budget",
           "read_budget", "render", "budget_markdown"]

PARTS = ("approximation", "moments", "critic")
SETTINGS = ("beta", "n_ref_data", "grid_size", "lim", "support_pool", "solver", "sample_steps", "n_samples", "seed")
COLUMNS = ("task", "estimator", "t", "spread", *PARTS, *SETTINGS)  # of toy2d_budget.csv
ModelsFn = Callable[[str], tuple[DiffusionModel, nn.Module]]  # task name -> (behaviour model, critic x (B, 2) -> (B, 1))


@dataclass
class BudgetConfig:
    """The error budget on the toy tasks (docs/derivation.md section 6b). Defaults: the full size."""

    tasks: tuple[str, ...] = ("swissroll", "8gaussians", "moons", "rings", "checkerboard", "2spirals")  # toy tasks
    times: tuple[float, ...] = (0.05, 0.2, 0.5, 0.8)  # diffusion times t at which the parts are measured
    beta: float = 10.0  # inverse temperature of pi ∝ mu exp(beta e)
    n_ref_data: int = 20_000  # data points behind the exact E_t, the exact posterior and the data support actions
    grid_size: int = 40  # the grid of x_t is grid_size x grid_size on [-lim, lim]^2, weighted by mu_t
    lim: float = 1.2  # half-width of the grid
    estimators: tuple[str, ...] = ()  # rows to measure (names from estimator_names); () = all of them
    support_k: tuple[int, ...] = (16, 256, 0)  # K support actions of the in-support estimators; 0 = the whole pool
    bandwidths: tuple = ("silverman",)  # mixture bandwidths h: numbers, or "silverman" (rule of thumb from the pool and K)
    n_samples: int = 16  # Monte Carlo samples of the Gaussian `sampled` expansion
    clip: Optional[float] = 1.0  # box of the posterior mean / component means (the tasks live in [-1, 1]^2)
    support_pool: int = 4096  # behaviour-model samples the support actions of parts 2-3 are drawn from
    sample_steps: int = 20  # sampler steps of those samples
    solver: str = "dpmpp2m"  # their sampler
    chunk: int = 256  # grid points per target evaluation (bounds the memory of the exact posterior)
    seed: int = 0  # seeds the support draws, the sampled expansion and the behaviour samples
    data_seed: int = 0  # seeds the training set of train_models (the reference set uses 10_000 + data_seed)
    n_data: int = 20_000  # training points of train_models' behaviour model and critic
    behaviour: BehaviourConfig = field(default_factory=lambda: BehaviourConfig(
        steps=3000, batch=512, lr=2e-3, lr_decay=True, hidden=128, blocks=2))  # train_models' behaviour model
    # train_models' smooth critic Q(x) ≈ e(x), trained as long as the toy preset's (1500 steps until session 67)
    critic: CriticConfig = field(default_factory=lambda: CriticConfig(
        kind="regression", steps=24_000, batch=512, lr=2e-3, lr_decay=True, hidden=128, depth=3,
        activation="silu"))

    def validate(self) -> "BudgetConfig":
        """Check every field; a ValueError names the bad one."""
        for name in self.tasks:
            toy.get_task(name)
        if not self.times:
            raise ValueError("times: expected at least one diffusion time")
        sch = VPSchedule()
        self.times = tuple(check_scalar("times", t, low=sch.t_min, high=sch.t_max) for t in self.times)
        toy.check_beta(self.beta)
        for name in ("n_ref_data", "n_samples", "support_pool", "sample_steps", "chunk", "n_data"):
            setattr(self, name, toy.check_count(name, getattr(self, name), bytes_per_item=64))
        toy.check_count("grid_size", self.grid_size, bytes_per_item=1, low=2)
        check_scalar("lim", self.lim, low=0.0, low_open=True)
        for k in self.support_k:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"support_k: expected integers >= 1 (or 0: the whole pool), got {k!r}")
        for h in self.bandwidths:
            if h != "silverman":
                check_scalar("bandwidths", h, low=0.0)
        if self.clip is not None:
            check_scalar("clip", self.clip, low=0.0, low_open=True)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {self.solver!r}")
        known = estimator_names(self)
        for e in self.estimators:
            if e not in known:
                raise ValueError(f"estimators: unknown estimator {e!r}; known: {', '.join(known)}")
        return self


def estimator_names(cfg: BudgetConfig) -> list[str]:
    """The rows: Gaussian ``<covariance>-<expansion>`` (``none`` once: with S_hat = 0 the expansions agree),
    ``particles-K<K>`` (``particles-all``: the whole pool) and ``mixture-first-K<K>-h<h>`` (or ``-silverman``)."""
    names = [f"{c}-{e}" for c in G.COVARIANCES if c != "none" for e in G.EXPANSIONS] + ["none"]
    names += [f"particles-K{k}" if k else "particles-all" for k in cfg.support_k]
    names += [f"mixture-first-K{k}-" + (h if h == "silverman" else f"h{float(h):g}")
              for k in cfg.support_k if k for h in cfg.bandwidths]
    return names


# ----------------------------------------------------------------------------- the exact references
def exact_eps_fn(data: torch.Tensor, schedule: VPSchedule):
    """The noise prediction of a perfectly trained model of the empirical behaviour of ``data`` (N, d):

        eps*(x_t, t) = (x_t - alpha_t E[x_0 | x_t]) / sigma_t,  E[x_0 | x_t] = sum_j softmax_j(-||x_t - alpha x^j||^2
        / (2 sigma^2)) x^j.

    Returns ``eps_fn(x_t (B, d), t (B,), s=None) -> (B, d)``, differentiable in x_t: its Jacobian is
    (I - (alpha^2 / sigma^2) Cov[x_0 | x_t]) / sigma, the exact posterior covariance for the Tweedie estimator.
    """
    sq = (data**2).sum(-1)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, s=None) -> torch.Tensor:
        alpha, sigma = (v.to(x.dtype)[:, None] for v in schedule.alpha_sigma(t))
        X = data.to(x)
        logits = (alpha * (x @ X.T) - 0.5 * alpha**2 * sq.to(x)) / sigma**2  # the ||x_t||^2 term cancels
        mean = torch.softmax(logits, dim=1) @ X
        return (x - alpha * mean) / sigma

    return eps_fn


@dataclass
class Reference:
    """The exact side of one task: reference data, rewards, the grid and, per t, E_t and log mu_t on it."""

    data: torch.Tensor  # (N, 2) float64
    rewards: torch.Tensor  # (N,)
    grid: torch.Tensor  # (M, 2)
    energy: dict  # t -> E_t on the grid (M,)
    log_mu: dict  # t -> log mu_t on the grid (M,)


def reference(task, cfg: BudgetConfig, schedule: VPSchedule | None = None) -> Reference:
    """Reference data (n_ref_data points, seed 10_000 + data_seed) and the exact E_t and mu_t on the grid."""
    schedule = schedule or VPSchedule()
    task = toy.get_task(task)
    data = task.sample(cfg.n_ref_data, seed=10_000 + cfg.data_seed, dtype=torch.float64)
    e = task.reward(data)
    grid, _ = toy.make_grid(cfg.grid_size, cfg.lim, dtype=torch.float64)
    E, L = {}, {}
    for t in cfg.times:
        E[t], L[t] = toy.exact_intermediate_energy(grid, t, data, e, cfg.beta, schedule, return_log_density=True)
    return Reference(data, e, grid, E, L)


# ----------------------------------------------------------------------------- one part's inputs
@dataclass
class _Inputs:
    """What one part of the budget feeds the estimators."""

    eps_fn: Callable  # posterior moments: exact (from the data) or the behaviour model's
    q_fn: Callable  # (s, a (B, 2)) -> (B,): the true reward (differentiable) or the critic
    pool: torch.Tensor  # (P, 2) support actions to draw from: the data or behaviour samples
    pool_q: torch.Tensor  # (P,) Q at them
    fit_cov: torch.Tensor  # (2, 2) the behaviour covariance of gaussian-fit


def _true_reward(task):
    """e(x) as a critic: the toy rewards have no autograd graph (or a clipped one); a zero quadratic gives them
    one with the true first and second derivatives where they exist (zero on the piecewise-constant ones)."""
    return lambda s, a: task.reward(a) + 0.0 * (a * a).sum(-1)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _critic_q(critic: nn.Module):
    """The critic x (B, 2) -> (B, 1) as q_fn, evaluated in its own dtype (the budget works in float64)."""
    dt = _dtype(critic)
    return lambda s, a: critic(a.to(dt)).squeeze(-1).to(a.dtype)


def _model_eps(behaviour: DiffusionModel):
    dt = _dtype(behaviour)
    return lambda x, t, s=None: behaviour.eps(x.to(dt), t.to(dt), s).to(x.dtype)


def _behaviour_pool(behaviour: DiffusionModel, cfg: BudgetConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(20_000 + cfg.seed)
    with torch.no_grad():
        x = behaviour.sample(cfg.support_pool, n_steps=cfg.sample_steps, solver=cfg.solver, generator=g,
                             clip=cfg.clip, action_dim=2)
    return x.double()


def _silverman(pool: torch.Tensor, k: int) -> float:
    """Silverman's rule of thumb for K points in d dimensions: h = s (4 / ((d + 2) K))^(1 / (d + 4))."""
    d = pool.shape[1]
    return float(pool.std(0).mean()) * (4.0 / ((d + 2) * k)) ** (1.0 / (d + 4))


def _eps_table(eps_fn, a0: torch.Tensor, cfg: BudgetConfig, schedule: VPSchedule,
               data: torch.Tensor | None = None) -> EpsNormTable:
    """E||eps(x_t, t)||^2 over x_t ~ mu_t (a0 diffused) at exactly the budget's times (and the ends), for
    the isotropic covariance r_t^2 = (sigma^2 / alpha^2)(1 - E||eps||^2 / d).

    With ``data`` (the exact part) the value is d - (alpha^2 / sigma^2) E tr Cov[x_0 | x_t] from the exact
    posterior of the data, so that r_t^2 = E tr Cov / d exactly (up to the average over x_t). Estimated
    from eps directly (the library's way, :meth:`EpsNormTable.estimate`), 1 - E||eps||^2 / d is a small
    difference of noisy numbers at large t (about 0.02 at t = 0.5 on 8gaussians), often clipped to 0.
    """
    ts = sorted(set(cfg.times) | {schedule.t_min, schedule.t_max})
    g = torch.Generator().manual_seed(30_000 + cfg.seed)
    d, vals = a0.shape[1], []
    with torch.no_grad():
        for t in ts:
            tt = torch.full((a0.shape[0],), t, dtype=a0.dtype)
            x_t, _ = schedule.diffuse(a0, tt, generator=g)
            if data is None:
                sq = torch.cat([(eps_fn(xc, tc) ** 2).sum(-1) for xc, tc in zip(x_t.split(cfg.chunk),
                                                                               tt.split(cfg.chunk))])
                vals.append(sq.mean())
                continue
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(tt[:1]))
            tr = []
            for xc in x_t.split(cfg.chunk):  # tr Cov[x_0 | x_t] = E ||x_0||^2 - ||E x_0||^2 under the posterior
                w = torch.softmax(-torch.cdist(xc, alpha * data) ** 2 / (2 * sigma**2), dim=1)
                tr.append(w @ (data**2).sum(-1) - ((w @ data) ** 2).sum(-1))
            vals.append(d - (alpha**2 / sigma**2) * torch.cat(tr).mean())
    return EpsNormTable(torch.tensor(ts, dtype=a0.dtype), torch.stack(vals), schedule)


def _target(name: str, x: torch.Tensor, t: float, inp: _Inputs, table: EpsNormTable, cfg: BudgetConfig,
            schedule: VPSchedule, g: torch.Generator) -> torch.Tensor:
    """The estimator ``name``'s target y_t on the points x (M, 2), evaluated in chunks. (M,)"""
    out = []
    for xc in x.split(cfg.chunk):
        tt = torch.full((xc.shape[0],), t, dtype=xc.dtype)
        if name.startswith(("particles", "mixture")):
            parts = name.split("-", 3)  # particles-K<K> | particles-all | mixture-first-K<K>-<h>
            kk = parts[1] if name.startswith("particles") else parts[2]
            P = inp.pool.shape[0]
            if kk == "all":
                idx = torch.arange(P).expand(xc.shape[0], P)
            else:
                idx = torch.randint(0, P, (xc.shape[0], int(kk[1:])), generator=g)
            if name.startswith("particles"):
                y = insupport_target(xc, tt, None, inp.pool[idx], posterior="particles", schedule=schedule,
                                     beta=cfg.beta, support_q=inp.pool_q[idx], clip=cfg.clip)
            else:
                h = _silverman(inp.pool, idx.shape[1]) if parts[3] == "silverman" else float(parts[3][1:])
                y = insupport_target(xc, tt, None, inp.pool[idx], posterior="mixture", schedule=schedule,
                                     beta=cfg.beta, q_fn=inp.q_fn, bandwidth=h, clip=cfg.clip)
        else:
            cov, exp = ("none", "first") if name == "none" else name.rsplit("-", 1)
            y = aepo_target(xc, tt, None, eps_fn=inp.eps_fn, q_fn=inp.q_fn, schedule=schedule, beta=cfg.beta,
                            covariance=cov, expansion=exp, clip=cfg.clip, n_samples=cfg.n_samples,
                            eps_table=table, fit_cov=inp.fit_cov, generator=g)
        out.append(y.detach())
    return torch.cat(out)


def _part(ref: Reference, inp: _Inputs, cfg: BudgetConfig, schedule: VPSchedule, exact: bool = False) -> dict:
    """{(estimator, t): RMS of y_t - E_t on the grid, weighted by mu_t, up to a constant per t}."""
    names = list(cfg.estimators) or estimator_names(cfg)
    table = None
    if any(n.startswith("isotropic") for n in names):  # 4096 points, as the toy pipeline's table
        table = _eps_table(inp.eps_fn, ref.data[:4096], cfg, schedule, ref.data if exact else None)
    out = {}
    for t in cfg.times:
        for name in names:
            g = torch.Generator().manual_seed(cfg.seed)  # the same draws for every part: parts differ by one source
            y = _target(name, ref.grid, t, inp, table, cfg, schedule, g)
            out[(name, t)] = toy.energy_error(y, ref.energy[t], ref.log_mu[t])
    return out


# ----------------------------------------------------------------------------- the three parts
def approximation_part(task, cfg: BudgetConfig, ref: Reference | None = None) -> dict:
    """Part 1: exact posterior (from the reference data) and the true reward. {(estimator, t): RMS}."""
    schedule = VPSchedule()
    task = toy.get_task(task)
    ref = ref or reference(task, cfg, schedule)
    inp = _Inputs(exact_eps_fn(ref.data, schedule), _true_reward(task), ref.data, ref.rewards, torch.cov(ref.data.T))
    return _part(ref, inp, cfg, schedule, exact=True)


def moments_part(task, behaviour: DiffusionModel, cfg: BudgetConfig, ref: Reference | None = None) -> dict:
    """Part 2: the behaviour model's eps_theta (Gaussian) and samples (in-support), the true reward."""
    task = toy.get_task(task)
    schedule = behaviour.schedule
    ref = ref or reference(task, cfg, schedule)
    pool = _behaviour_pool(behaviour, cfg)
    inp = _Inputs(_model_eps(behaviour), _true_reward(task), pool, task.reward(pool), torch.cov(ref.data.T))
    return _part(ref, inp, cfg, schedule)


def critic_part(task, behaviour: DiffusionModel, critic: nn.Module, cfg: BudgetConfig,
                ref: Reference | None = None) -> dict:
    """Part 3: as part 2 with the fitted critic (x (B, 2) -> (B, 1)) instead of the true reward."""
    task = toy.get_task(task)
    schedule = behaviour.schedule
    ref = ref or reference(task, cfg, schedule)
    pool = _behaviour_pool(behaviour, cfg)
    q = _critic_q(critic)
    with torch.no_grad():
        pool_q = q(None, pool)
    inp = _Inputs(_model_eps(behaviour), q, pool, pool_q, torch.cov(ref.data.T))
    return _part(ref, inp, cfg, schedule)


def task_budget(task, behaviour: DiffusionModel, critic: nn.Module, cfg: BudgetConfig) -> list[dict]:
    """The three parts on one task: rows {task, estimator, t, spread, approximation, moments, critic} and the
    settings they were measured with (:data:`SETTINGS`).

    ``spread`` is the error of f = 0 (the weighted std of E_t): the scale the parts are read against.
    """
    task = toy.get_task(task)
    ref = reference(task, cfg, behaviour.schedule)
    parts = {"approximation": approximation_part(task, cfg, ref), "moments": moments_part(task, behaviour, cfg, ref),
             "critic": critic_part(task, behaviour, critic, cfg, ref)}
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    rows = []
    for (name, t) in parts["approximation"]:
        spread = toy.energy_error(torch.zeros_like(ref.energy[t]), ref.energy[t], ref.log_mu[t])
        rows.append(dict(task=task.name, estimator=name, t=t, spread=spread,
                         **{p: parts[p][(name, t)] for p in PARTS}, **settings))
    return rows


# ----------------------------------------------------------------------------- small models (stand-in)
def train_models(task, cfg: BudgetConfig, store, *, progress: bool = False) -> tuple[DiffusionModel, nn.Module]:
    """A behaviour model and a smooth critic for ``task``, trained with the stage mechanism into ``store``
    (a :class:`~aepo_lite.training.StageStore`; a keyed one caches them per config). A stand-in until the
    toy pipeline's own stages are passed to :func:`run_budget` as ``models``."""
    from aepo_lite.training import BehaviourLearner, RegressionLearner, Stage, run_stage
    task = toy.get_task(task)
    x = task.sample(cfg.n_data, seed=cfg.data_seed)
    e = task.reward(x)
    bc, cc = cfg.behaviour, cfg.critic
    key = dict(task=task.name, n_data=cfg.n_data, data_seed=cfg.data_seed)
    model = DiffusionModel(NoiseNet(2, 0, hidden=bc.hidden, n_blocks=bc.blocks))
    critic = MLP(2, 1, hidden=cc.hidden, depth=cc.depth, activation=cc.activation)

    def rows(n, g):
        return torch.randint(0, x.shape[0], (n,), generator=g)

    stages = [
        Stage(f"budget-behaviour-{task.name}", dict(key, behaviour=asdict(bc)), bc.steps,
              lambda: BehaviourLearner(model, bc.lr, decay_steps=bc.steps if bc.lr_decay else None),
              lambda g: {"a": x[rows(bc.batch, g)], "s": None}, seed=cfg.data_seed),
        Stage(f"budget-critic-{task.name}", dict(key, critic=asdict(cc)), cc.steps,
              lambda: RegressionLearner(critic, cc.lr, decay_steps=cc.steps if cc.lr_decay else None),
              lambda g: (lambda i: {"x": x[i], "y": e[i]})(rows(cc.batch, g)), seed=1_000 + cfg.data_seed),
    ]
    for st in stages:
        run_stage(st, store, log_every=max(st.steps, 1), checkpoint_every=max(st.steps, 1), progress=progress)
    return model.eval().requires_grad_(False), critic.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- run and write
def run_budget(cfg: BudgetConfig | None = None, *, models: ModelsFn | None = None, out_dir="figures",
               store=None, progress: bool = True) -> list[dict]:
    """Measure parts 1-3 on every task of ``cfg`` and write ``out_dir/toy2d_budget.{csv,md,png}``.

    ``models(task) -> (behaviour, critic)`` gives each task's trained behaviour model and smooth critic;
    without it :func:`train_models` trains small ones into ``store`` (default: a keyed cache in
    ``runs/budget_cache``). Returns the rows.
    """
    cfg = (cfg or BudgetConfig()).validate()
    if models is None:
        from aepo_lite.training import StageStore
        store = store or StageStore(Path("runs") / "budget_cache", keyed=True)
        models = lambda name: train_models(name, cfg, store, progress=progress)  # noqa: E731
    rows = []
    for name in cfg.tasks:
        behaviour, critic = models(name)
        rows += task_budget(name, behaviour, critic, cfg)
        if progress:
            print(f"budget: {name} done", flush=True)
    write_budget(rows, out_dir)
    return rows


def _mean_over_tasks(rows: list[dict], part: str) -> dict:
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["estimator"], r["t"]), []).append(r[part])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def budget_markdown(rows: list[dict]) -> str:
    """One table per part: estimators x t, the mean over tasks of the RMS error, and the spread of E_t."""
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    times = sorted({r["t"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    c = rows[0]
    spread = _mean_over_tasks(rows, "spread")
    head = "| estimator | " + " | ".join(f"t = {t:g}" for t in times) + " |\n|---|" + "---|" * len(times)
    lines = [f"Error budget (docs/derivation.md 6b), generated from `toy2d_budget.csv` by `aepo_lite.toy.budget.render` (do not "
             f"edit by hand). Tasks: {', '.join(tasks)}; beta = {c['beta']:g}; exact E_t from {c['n_ref_data']} "
             f"reference points; {c['grid_size']}x{c['grid_size']} grid on [-{c['lim']:g}, {c['lim']:g}]^2 weighted "
             f"by mu_t; support actions of parts 2-3 drawn from {c['support_pool']} behaviour samples ({c['solver']}, "
             f"{c['sample_steps']} steps). Each cell: RMS of y_t - E_t after removing the best constant per t, mean "
             "over the tasks (per task: the CSV). The parts are cumulative: approximation (exact posterior, true "
             "reward), + moments (the behaviour model), + critic (the fitted smooth critic). Smaller is better; "
             "`spread of E_t` is the error of f = 0. The stochastic targets (`sampled`, particles, mixture) are one "
             "draw per grid point: their RMS includes that draw's Monte Carlo noise, which a regression on many "
             "draws averages out (it then learns E[y_t | x_t], whose bias this table does not separate). "
             "Our measurement, not the paper's.", ""]
    for part in PARTS:
        m = _mean_over_tasks(rows, part)
        lines += [f"### {part}", "", head]
        lines.append("| spread of E_t | " + " | ".join(f"{spread[(names[0], t)]:.3f}" for t in times) + " |")
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{m[(n, t)]:.3f}" for t in times) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: list[dict], path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    times = sorted({r["t"] for r in rows})
    spread = _mean_over_tasks(rows, "spread")
    fig, axes = plt.subplots(1, len(PARTS), figsize=(5.0 * len(PARTS), 4.2), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, part in zip(axes, PARTS):
        m = _mean_over_tasks(rows, part)
        for i, n in enumerate(names):
            style = "-" if n.startswith(("particles", "mixture")) else "--"
            ax.plot(times, [max(m[(n, t)], 1e-3) for t in times], style, marker="o", ms=3, color=cmap(i % 20),
                    label=n)
        ax.plot(times, [spread[(names[0], t)] for t in times], "k:", lw=2, label="spread of E_t (f = 0)")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_title(part)
    axes[0].set_ylabel("RMS error vs exact E_t, mean over tasks (0 drawn at 1e-3)")
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)  # fixed metadata: the same bytes on every run
    plt.close(fig)
    return Path(path)


def write_budget(rows: list[dict], out_dir="figures") -> list[Path]:
    """``toy2d_budget.csv`` (one row per task, estimator and t, with its settings), then :func:`render`."""
    out_dir = Path(out_dir)
    path = atomic_write_csv(out_dir / "toy2d_budget.csv", [
        {k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS} for r in rows], COLUMNS)
    return [path, *render(path, out_dir)]


def read_budget(csv_path) -> list[dict]:
    """The rows of ``toy2d_budget.csv``, typed."""
    rows = read_csv_rows(csv_path, COLUMNS, made_by="aepo_lite.toy.budget.run_budget")
    ints = ("n_ref_data", "grid_size", "support_pool", "sample_steps", "n_samples", "seed")
    for r in rows:
        for k in COLUMNS:
            if k in ints:
                r[k] = int(r[k])
            elif k not in ("task", "estimator", "solver"):
                r[k] = float(r[k])
    if not rows:
        raise ValueError(f"csv_path: {csv_path} has no rows")
    return rows


def render(csv_path="figures/toy2d_budget.csv", figures_dir="figures") -> list[Path]:
    """``toy2d_budget.md`` and ``toy2d_budget.png`` from the CSV alone (``aepo-lite figures`` calls this)."""
    rows = read_budget(csv_path)
    figures_dir = Path(figures_dir)
    return [atomic_write_text(figures_dir / "toy2d_budget.md", budget_markdown(rows)),
            _plot(rows, figures_dir / "toy2d_budget.png")]
