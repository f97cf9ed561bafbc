"""Training and evaluation on a toy 2D task (method.md section 6).

Stages, each cached as its own checkpoint (written atomically) so a killed run resumes without
losing a finished stage:

  1. the behaviour diffusion model of a task (one per task and data set, shared by every
     guidance method, beta and seed);
  2. the smooth critic Q(x) fitted to the reward e(x) (one per task): the toy rewards are
     piecewise constant, so grad e = 0 almost everywhere and AEPO's gradient-based targets need
     a smooth surrogate; CEP and MSE use e itself;
  3. the intermediate-energy network f_phi of one method (aepo with an estimator, cep, mse) at
     one beta and seed, trained with :class:`aepo_lite.core.aepo.EnergyLearner`;
  4. evaluation: guided samples at each guidance scale, their sliced Wasserstein distance to
     exact target samples and its noise floor, the mean reward, and the error of f_phi against
     the exact E_t on a grid.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from aepo_lite.core import guidance as G
from aepo_lite.toy import tasks as toy
from aepo_lite._checks import check_scalar
from aepo_lite._io import atomic_torch_save, atomic_write_json
from aepo_lite.config import EnergyConfig
from aepo_lite.core.aepo import EnergyLearner, EpsNormTable
from aepo_lite.device import resolve_device
from aepo_lite.core.diffusion import SOLVERS, DiffusionModel, energy_guidance
from aepo_lite.core.nets import MLP, EnergyNet, NoiseNet
from aepo_lite.core.schedule import VPSchedule

__all__ = ["ToyConfig", "PRESETS", "TOY_METHODS", "ESTIMATORS", "DEFAULT_ESTIMATOR", "make_config", "parse_estimator",
           "ToyModels", "train_behaviour", "fit_critic", "train_energy", "train_toy", "guided_samples",
           "evaluate_toy", "run_toy", "default_cache_dir"]

TOY_METHODS = ("aepo", "cep", "mse", "bc")
ESTIMATORS = tuple(f"{c}-{e}" for c in G.COVARIANCES for e in G.EXPANSIONS)
LIBRARY_ESTIMATOR = f"{EnergyConfig.covariance}-{EnergyConfig.expansion}"  # aepo_lite.core.aepo.EnergyConfig's default
# The toy default: the estimator that measured best on the toy grid (README, figures/toy2d_estimators.md);
# our choice, by measurement, not the paper's.
DEFAULT_ESTIMATOR = "gaussian-fit-sampled"


def parse_estimator(estimator: str) -> tuple[str, str]:
    """``"<covariance>-<expansion>"`` (e.g. ``gaussian-fit-first``) -> (covariance, expansion)."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    cov, exp = estimator.rsplit("-", 1)
    return cov, exp


@dataclass
class ToyConfig:
    """One toy run: a task, a guidance method, beta, the guidance scales to evaluate, a seed."""

    task: str = "8gaussians"  # registered toy task (aepo_lite.toy.tasks.task_names())
    method: str = "aepo"  # aepo | cep | mse | bc (bc = the behaviour model, guidance scale 0)
    estimator: str = DEFAULT_ESTIMATOR  # AEPO only: "<covariance>-<expansion>", see ESTIMATORS
    beta: float = 10.0  # inverse temperature of the target pi ∝ mu exp(beta e)
    guidance_scales: tuple = (1.0,)  # guidance scales w to evaluate (w = 1 is exact when f = E_t)
    seed: int = 0  # seeds the energy network, its batches, the samples and the reference sets
    preset: str = "smoke"  # the named preset these sizes came from (smoke | full)
    device: str = "auto"  # auto | cpu | cuda
    data_seed: int = 0  # seeds the task's training set, shared by every run of a task
    n_data: int = 20_000  # behaviour points x^j ~ mu in the training set
    # behaviour diffusion model eps_theta(x_t, t)
    bc_steps: int = 1500  # Adam steps
    bc_batch: int = 512  # batch size
    bc_lr: float = 1e-3  # learning rate (cosine-decayed to 0)
    bc_hidden: int = 128  # width of the residual MLP
    bc_blocks: int = 2  # residual blocks
    # smooth critic Q(x) ≈ e(x) (AEPO only)
    critic_steps: int = 800  # Adam steps
    critic_batch: int = 512  # batch size
    critic_lr: float = 2e-3  # learning rate (cosine-decayed to 0)
    critic_hidden: int = 128  # MLP width
    critic_depth: int = 3  # hidden layers (SiLU)
    # intermediate energy f_phi(x_t, t)
    energy_steps: int = 800  # Adam steps
    energy_batch: int = 256  # batch size of the regression methods (aepo, mse)
    energy_lr: float = 1e-3  # learning rate (cosine-decayed to 0)
    energy_hidden: int = 128  # MLP width
    energy_depth: int = 3  # hidden layers (SiLU)
    energy_precondition: bool = True  # feed f_phi c_in(t) x_t, c_in = alpha / (alpha^2 + sigma^2 / data_var) (EnergyInput)
    cep_support: int = 16  # CEP: K support actions per contrastive group (QGPO: 16)
    cep_batch: int = 64  # CEP: contrastive groups per batch (cep_batch * cep_support points per step)
    aepo_cover: float = 0.25  # AEPO: fraction of each batch drawn uniformly on [-1.2, 1.2]^2 instead of from the data
    n_mc: int = 16  # AEPO `sampled` expansion: Monte Carlo samples per x_t
    clip: Optional[float] = 1.0  # box [-clip, clip]^2 for the posterior mean (the tasks live in it)
    # evaluation
    n_eval: int = 1000  # guided samples per guidance scale (and size of each exact target set)
    sample_steps: int = 20  # network evaluations per sample
    solver: str = "dpmpp2m"  # sampler, one of aepo_lite.core.diffusion.SOLVERS
    pool_size: int = 100_000  # behaviour pool resampled for exact target samples
    n_projections: int = 128  # directions of the sliced Wasserstein distance
    grid_size: int = 40  # the energy-error grid is grid_size x grid_size on [-1.2, 1.2]^2
    error_times: tuple = (0.05, 0.2, 0.5)  # diffusion times at which f_phi is compared with E_t
    n_ref_data: int = 20_000  # data points behind the exact E_t reference

    def validate(self) -> "ToyConfig":
        """Check every field; raise a ValueError naming the bad one. Runs before any training."""
        toy.get_task(self.task)
        if self.method not in TOY_METHODS:
            raise ValueError(f"method: expected one of {TOY_METHODS}, got {self.method!r}")
        parse_estimator(self.estimator)
        toy.check_beta(self.beta)
        scales = tuple(self.guidance_scales) if not isinstance(self.guidance_scales, (int, float)) else (self.guidance_scales,)
        if not scales:
            raise ValueError("guidance_scales: expected at least one guidance scale")
        self.guidance_scales = tuple(check_scalar("guidance_scale", w, low=0.0) for w in scales)
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {self.preset!r}")
        resolve_device(self.device)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {self.solver!r}")
        for name in ("seed", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        for name, nbytes in (("n_data", 64), ("n_eval", 64 * 128), ("pool_size", 64), ("n_ref_data", 64),
                             ("bc_batch", 4096), ("critic_batch", 4096), ("energy_batch", 4096 * 16),
                             ("cep_batch", 4096 * 16), ("bc_steps", 1), ("critic_steps", 1), ("energy_steps", 1), ("sample_steps", 1),
                             ("n_projections", 1), ("cep_support", 1), ("n_mc", 1), ("bc_hidden", 1),
                             ("critic_hidden", 1), ("energy_hidden", 1), ("bc_blocks", 1), ("critic_depth", 1),
                             ("energy_depth", 1)):
            setattr(self, name, toy.check_count(name, getattr(self, name), bytes_per_item=nbytes))
        toy.check_count("grid_size", self.grid_size, bytes_per_item=1, low=2)
        toy.check_count("grid points", self.grid_size**2, bytes_per_item=64)
        toy.check_count("cep_batch * cep_support", self.cep_batch * self.cep_support, bytes_per_item=4096)
        sched = VPSchedule()
        self.error_times = tuple(check_scalar("error_times", t, low=sched.t_min, high=sched.t_max)
                                 for t in self.error_times)
        for name in ("bc_lr", "critic_lr", "energy_lr"):
            check_scalar(name, getattr(self, name), low=0.0, low_open=True)
        if self.clip is not None:
            check_scalar("clip", self.clip, low=0.0, low_open=True)
        check_scalar("aepo_cover", self.aepo_cover, low=0.0, high=1.0)
        return self


# Named presets: only the sizes differ, the code path is the same. `full` is sized so that the
# beta = 10 slice of the grid (6 tasks x 3 seeds x aepo/cep/mse/bc) runs in about an hour on two
# busy CPU threads (the machine these numbers come from); see toy-bench for the speeds.
PRESETS: dict[str, dict] = {
    "smoke": dict(n_data=20_000, bc_steps=1500, bc_lr=2e-3, critic_steps=800, energy_steps=800, n_eval=1000,
                  grid_size=40, n_ref_data=20_000, sample_steps=20),
    "full": dict(n_data=50_000, bc_steps=3000, bc_lr=2e-3, critic_steps=1500, energy_steps=600, n_eval=2000,
                 grid_size=40, n_ref_data=10_000, sample_steps=20),
}


def make_config(preset: str = "smoke", **overrides) -> ToyConfig:
    """A validated :class:`ToyConfig`: the preset's sizes, then ``overrides`` (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    names = {f.name for f in fields(ToyConfig)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"{bad[0]}: not a ToyConfig field")
    kw = dict(PRESETS[preset], preset=preset)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ToyConfig(**kw).validate()


def default_cache_dir() -> Path:
    return Path("runs") / "toy_cache"


# ----------------------------------------------------------------------------- helpers
def _key(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _progress(iterable, desc: str, show: bool):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, mininterval=2.0)


def _cosine(opt, steps):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))


def _load_or_none(path: Path, key: dict):
    if path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if ck.get("key") == key:
            return ck
    return None


def _data(cfg: ToyConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    task = toy.get_task(cfg.task)
    x = task.sample(cfg.n_data, seed=cfg.data_seed, device=device)
    return x, task.reward(x)


def _behaviour_key(cfg: ToyConfig) -> dict:
    return dict(stage="behaviour", task=cfg.task, data_seed=cfg.data_seed, n_data=cfg.n_data, steps=cfg.bc_steps,
                batch=cfg.bc_batch, lr=cfg.bc_lr, hidden=cfg.bc_hidden, blocks=cfg.bc_blocks)


def _critic_key(cfg: ToyConfig) -> dict:
    return dict(stage="critic", task=cfg.task, data_seed=cfg.data_seed, n_data=cfg.n_data, steps=cfg.critic_steps,
                batch=cfg.critic_batch, lr=cfg.critic_lr, hidden=cfg.critic_hidden, depth=cfg.critic_depth)


def _energy_key(cfg: ToyConfig) -> dict:
    k = dict(stage="energy", method=cfg.method, beta=cfg.beta, seed=cfg.seed, steps=cfg.energy_steps,
             batch=cfg.energy_batch, lr=cfg.energy_lr, hidden=cfg.energy_hidden, depth=cfg.energy_depth,
             behaviour=_behaviour_key(cfg), clip=cfg.clip, precondition=cfg.energy_precondition)
    if cfg.method == "aepo":
        k.update(estimator=cfg.estimator, critic=_critic_key(cfg), n_mc=cfg.n_mc, cover=cfg.aepo_cover)
    if cfg.method == "cep":
        k.update(K=cfg.cep_support, cep_batch=cfg.cep_batch)
    return k


def _new_behaviour(cfg: ToyConfig) -> DiffusionModel:
    return DiffusionModel(NoiseNet(2, 0, hidden=cfg.bc_hidden, n_blocks=cfg.bc_blocks))


def _new_critic(cfg: ToyConfig) -> nn.Module:
    return MLP(2, 1, hidden=cfg.critic_hidden, depth=cfg.critic_depth, activation="silu")


class PreconditionedEnergy(nn.Module):
    """f_phi(s, x_t, t) = EnergyNet(s, c_in(t) x_t, t) with c_in(t) = alpha_t v / (alpha_t^2 v + sigma_t^2).

    c_in x_t is the posterior mean of x_0 for Gaussian data of variance v. The exact E_t depends on
    x_t only through alpha_t x_t / sigma_t^2 (method.md section 6: the ||x_t||^2 term cancels in the
    softmax), so its gradient is O(alpha_t) at large t. A plain network fed x_t has O(1) gradients
    there, which the sampler multiplies by sigma_t^2 / alpha_t (~150 at t = 1) and throws samples out
    of the box. With c_in the network keeps its full expressiveness at each t (c_in is one scalar
    per t) and its gradient carries the right scale. Used for every method alike.
    """

    def __init__(self, net: EnergyNet, schedule: VPSchedule, data_var: float = 1.0):
        super().__init__()
        self.net, self.schedule, self.data_var = net, schedule, float(data_var)
        self.action_dim, self.state_dim = net.action_dim, net.state_dim

    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return alpha * self.data_var / (alpha**2 * self.data_var + sigma**2)

    def forward(self, s, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(s, self.c_in(t)[:, None] * x_t, t)


def _new_energy(cfg: ToyConfig) -> nn.Module:
    net = EnergyNet(2, 0, hidden=cfg.energy_hidden, depth=cfg.energy_depth)
    if not cfg.energy_precondition:
        return net
    x = toy.get_task(cfg.task).sample(4096, seed=cfg.data_seed, dtype=torch.float64)
    return PreconditionedEnergy(net, VPSchedule(), float(x.var(0).mean()))


# ----------------------------------------------------------------------------- stages
def train_behaviour(cfg: ToyConfig, *, cache_dir=None, device=None, progress: bool = True) -> tuple[DiffusionModel, dict]:
    """Stage 1: the behaviour model of ``cfg.task`` (cached per task and data set). Returns (model, info)."""
    device = resolve_device(device or cfg.device)
    key = _behaviour_key(cfg)
    path = Path(cache_dir or default_cache_dir()) / cfg.task / f"behaviour-{_key(key)}.pt"
    model = _new_behaviour(cfg).to(device)
    ck = _load_or_none(path, key)
    if ck is None:
        torch.manual_seed(cfg.data_seed)
        model = _new_behaviour(cfg).to(device)
        x, _ = _data(cfg, device)
        g = torch.Generator().manual_seed(1_000 + cfg.data_seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.bc_lr)
        sched = _cosine(opt, cfg.bc_steps)
        t0, losses = time.time(), []
        for _ in _progress(range(cfg.bc_steps), f"behaviour {cfg.task}", progress):
            idx = torch.randint(0, x.shape[0], (cfg.bc_batch,), generator=g).to(device)
            loss = model.loss(x[idx], None, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        info = dict(loss=sum(losses[-100:]) / len(losses[-100:]), seconds=time.time() - t0,
                    steps_per_s=cfg.bc_steps / max(time.time() - t0, 1e-9))
        ck = dict(key=key, state=model.state_dict(), info=info)
        atomic_torch_save(path, ck)
    model.load_state_dict(ck["state"])
    model.eval().requires_grad_(False)
    return model, ck["info"]


def fit_critic(cfg: ToyConfig, *, cache_dir=None, device=None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Stage 2: a smooth (SiLU) MLP Q(x) regressed on e(x) over the training set (cached per task).

    Returns (critic: x (B, 2) -> (B, 1), info with the held-out RMS error against e).
    """
    device = resolve_device(device or cfg.device)
    key = _critic_key(cfg)
    path = Path(cache_dir or default_cache_dir()) / cfg.task / f"critic-{_key(key)}.pt"
    critic = _new_critic(cfg).to(device)
    ck = _load_or_none(path, key)
    if ck is None:
        torch.manual_seed(2_000 + cfg.data_seed)
        critic = _new_critic(cfg).to(device)
        x, e = _data(cfg, device)
        g = torch.Generator().manual_seed(2_000 + cfg.data_seed)
        opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
        sched = _cosine(opt, cfg.critic_steps)
        t0 = time.time()
        for _ in _progress(range(cfg.critic_steps), f"critic {cfg.task}", progress):
            idx = torch.randint(0, x.shape[0], (cfg.critic_batch,), generator=g).to(device)
            loss = ((critic(x[idx]).squeeze(-1) - e[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        task = toy.get_task(cfg.task)
        xv = task.sample(4096, seed=99_991 + cfg.data_seed, device=device)
        with torch.no_grad():
            rmse = float(((critic(xv).squeeze(-1) - task.reward(xv)) ** 2).mean().sqrt())
        info = dict(heldout_rmse=rmse, seconds=time.time() - t0, steps_per_s=cfg.critic_steps / max(time.time() - t0, 1e-9))
        ck = dict(key=key, state=critic.state_dict(), info=info)
        atomic_torch_save(path, ck)
    critic.load_state_dict(ck["state"])
    critic.eval().requires_grad_(False)
    return critic, ck["info"]


def _learner(cfg: ToyConfig, energy: EnergyNet, behaviour: DiffusionModel, critic: nn.Module | None,
             x: torch.Tensor, g: torch.Generator) -> EnergyLearner:
    task = toy.get_task(cfg.task)
    cov, exp = parse_estimator(cfg.estimator)
    ecfg = EnergyConfig(beta=cfg.beta, covariance=cov, expansion=exp, n_samples=cfg.n_mc,
                        clip=cfg.clip, lr=cfg.energy_lr)
    sched = behaviour.schedule
    if cfg.method == "aepo":
        q_fn = lambda s, a: critic(a).squeeze(-1)  # noqa: E731  the smooth surrogate of e
    else:
        q_fn = lambda s, a: task.reward(a)  # noqa: E731  the true reward (no gradient needed)
    eps_table = EpsNormTable.estimate(behaviour.eps, x[:4096], None, sched, generator=g) \
        if (cfg.method == "aepo" and cov == "isotropic") else None
    fit_cov = torch.cov(x.T) if (cfg.method == "aepo" and cov == "gaussian-fit") else None
    return EnergyLearner(energy, ecfg, schedule=sched, eps_fn=behaviour.eps, q_fn=q_fn, eps_table=eps_table,
                         fit_cov=fit_cov, generator=g, method="qgpo" if cfg.method == "cep" else cfg.method)


def train_energy(cfg: ToyConfig, behaviour: DiffusionModel, critic: nn.Module | None = None, *, cache_dir=None,
                 device=None, progress: bool = True) -> tuple[EnergyNet, dict]:
    """Stage 3: f_phi for ``cfg.method`` (aepo | cep | mse) at ``cfg.beta`` and ``cfg.seed`` (cached)."""
    if cfg.method not in ("aepo", "cep", "mse"):
        raise ValueError(f"method: only aepo, cep and mse train an energy, got {cfg.method!r}")
    if cfg.method == "aepo" and critic is None:
        raise ValueError("critic: the aepo energy needs the smooth critic (fit_critic)")
    device = resolve_device(device or cfg.device)
    key = _energy_key(cfg)
    tag = f"{cfg.method}-{cfg.estimator}" if cfg.method == "aepo" else cfg.method
    path = Path(cache_dir or default_cache_dir()) / cfg.task / f"energy-{tag}-b{cfg.beta:g}-s{cfg.seed}-{_key(key)}.pt"
    energy = _new_energy(cfg).to(device)
    ck = _load_or_none(path, key)
    if ck is None:
        torch.manual_seed(3_000 + cfg.seed)
        energy = _new_energy(cfg).to(device)
        x, e = _data(cfg, device)
        g = torch.Generator().manual_seed(3_000 + cfg.seed)
        learner = _learner(cfg, energy, behaviour, critic, x, g)
        sched = _cosine(learner.opt, cfg.energy_steps)
        t0, hist = time.time(), []
        for _ in _progress(range(cfg.energy_steps), f"{tag} {cfg.task} b={cfg.beta:g} s={cfg.seed}", progress):
            if cfg.method == "cep":
                idx = torch.randint(0, x.shape[0], (cfg.cep_batch, cfg.cep_support), generator=g).to(device)
                batch = {"s": None, "support": x[idx], "support_q": e[idx]}
            else:
                idx = torch.randint(0, x.shape[0], (cfg.energy_batch,), generator=g).to(device)
                batch = {"s": None, "a": x[idx]}
                n_cover = int(round(cfg.aepo_cover * cfg.energy_batch)) if cfg.method == "aepo" else 0
                if n_cover:  # AEPO's target is a function of x_t alone, so it can be trained off the data too
                    box = (2.4 * torch.rand(n_cover, 2, generator=g) - 1.2).to(device=device, dtype=x.dtype)
                    batch["a"] = torch.cat([batch["a"][n_cover:], box])
            hist.append(learner.update(batch)["energy_loss"])
            sched.step()
        info = dict(loss=sum(hist[-100:]) / len(hist[-100:]), seconds=time.time() - t0,
                    steps_per_s=cfg.energy_steps / max(time.time() - t0, 1e-9))
        ck = dict(key=key, state=energy.state_dict(), info=info)
        atomic_torch_save(path, ck)
    energy.load_state_dict(ck["state"])
    energy.eval().requires_grad_(False)
    return energy, ck["info"]


@dataclass
class ToyModels:
    """What a toy run trained: the behaviour model, the critic (AEPO) and the energy (None for bc)."""

    cfg: ToyConfig
    behaviour: DiffusionModel
    critic: Optional[nn.Module] = None
    energy: Optional[EnergyNet] = None
    info: dict = field(default_factory=dict)


def train_toy(cfg: ToyConfig, *, cache_dir=None, progress: bool = True) -> ToyModels:
    """Stages 1-3 for one config (each loaded from the cache when already done)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    behaviour, binfo = train_behaviour(cfg, cache_dir=cache_dir, device=device, progress=progress)
    info = {"behaviour": binfo}
    critic = energy = None
    if cfg.method == "aepo":
        critic, info["critic"] = fit_critic(cfg, cache_dir=cache_dir, device=device, progress=progress)
    if cfg.method != "bc":
        energy, info["energy"] = train_energy(cfg, behaviour, critic, cache_dir=cache_dir, device=device,
                                              progress=progress)
    return ToyModels(cfg, behaviour, critic, energy, info)


def guided_samples(models: ToyModels, guidance_scale: float, n: int, *, seed: int = 0,
                   n_steps: int | None = None, solver: str | None = None, clip: float | None = None) -> torch.Tensor:
    """n samples (n, 2) of the guided sampler at ``guidance_scale`` (the behaviour model when no energy),
    clipped to [-clip, clip]^2 when ``clip`` is given (the action box, as an agent would)."""
    w = check_scalar("guidance_scale", guidance_scale, low=0.0)
    n = toy.check_count("n", n, bytes_per_item=2 * 4 * 64)
    cfg = models.cfg
    guide = None
    if models.energy is not None:
        energy = models.energy
        guide = energy_guidance(lambda s, x, t: energy(s, x, t))
    g = torch.Generator().manual_seed(50_000 + seed)
    x = models.behaviour.sample(n, n_steps=n_steps or cfg.sample_steps, solver=solver or cfg.solver, guidance=guide,
                                guidance_scale=w if guide is not None else 0.0, generator=g, clip=clip)
    return x.detach().cpu()


def energy_errors(models: ToyModels, times=None, *, grid_size: int | None = None, n_ref: int | None = None) -> dict:
    """RMS error (up to a constant, weighted by mu_t) of f_phi against the exact E_t at each time."""
    cfg = models.cfg
    if models.energy is None:
        return {}
    times = cfg.error_times if times is None else times
    dev = next(models.energy.parameters()).device
    pts, _ = toy.make_grid(grid_size or cfg.grid_size, device=dev)
    x, e = _data(cfg, dev)
    n_ref = min(n_ref or cfg.n_ref_data, x.shape[0])
    out = {}
    for t in times:
        E, logp = toy.exact_intermediate_energy(pts, t, x[:n_ref], e[:n_ref], cfg.beta, models.behaviour.schedule,
                                                return_log_density=True)
        with torch.no_grad():
            f = models.energy(None, pts, torch.full((pts.shape[0],), float(t), device=dev))
        out[f"{t:g}"] = toy.energy_error(f, E, logp)
    return out


def evaluate_toy(models: ToyModels, *, keep_samples: bool = False) -> dict:
    """Stage 4: per guidance scale, the distance to exact target samples, its floor and the mean reward."""
    cfg = models.cfg
    task = toy.get_task(cfg.task)
    scales = (0.0,) if models.energy is None else cfg.guidance_scales
    target = toy.target_samples(task, cfg.beta, cfg.n_eval, pool_size=cfg.pool_size, seed=20_000 + cfg.seed)
    floor = toy.distance_floor(task, cfg.beta, cfg.n_eval, seed=cfg.seed, pool_size=cfg.pool_size,
                               n_projections=cfg.n_projections)
    rows, samples = [], {}
    for w in scales:
        t0 = time.time()
        raw = guided_samples(models, w, cfg.n_eval, seed=cfg.seed)
        dt = time.time() - t0
        outside = float((raw.abs() > (cfg.clip or float("inf"))).any(1).float().mean())
        xs = raw if cfg.clip is None else raw.clamp(-cfg.clip, cfg.clip)
        rows.append(dict(guidance_scale=w, distance=toy.sliced_wasserstein(xs, target, cfg.n_projections), floor=floor,
                         mean_reward=float(task.reward(xs).mean()), frac_outside_box=outside, points_per_s=cfg.n_eval / max(dt, 1e-9)))
        samples[w] = xs
    out = dict(task=cfg.task, method=cfg.method, estimator=cfg.estimator if cfg.method == "aepo" else "",
               beta=cfg.beta, seed=cfg.seed, preset=cfg.preset, results=rows,
               target_mean_reward=float(task.reward(target).mean()),
               behaviour_mean_reward=float(task.reward(task.sample(cfg.pool_size, seed=7)).mean()),
               energy_error=energy_errors(models), train_info=models.info)
    if keep_samples:
        out["_samples"], out["_target"] = samples, target
    return out


def run_toy(cfg: ToyConfig, out_dir, *, cache_dir=None, progress: bool = True, figure: bool = True) -> dict:
    """Train (or load) and evaluate one config; write ``config.json``, ``metrics.json`` and ``figure.png``."""
    cfg.validate()
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "config.json", asdict(cfg))
    models = train_toy(cfg, cache_dir=cache_dir, progress=progress)
    metrics = evaluate_toy(models, keep_samples=figure)
    samples, target = metrics.pop("_samples", None), metrics.pop("_target", None)
    atomic_write_json(out_dir / "metrics.json", metrics)
    if figure:
        from aepo_lite.toy.report import plot_run
        plot_run(models, metrics, samples, target, out_dir / "figure.png")
    return metrics


def config_rows(metrics: dict) -> list[dict]:
    """metrics.json -> rows of figures/toy2d_results.csv."""
    return [dict(task=metrics["task"], method=metrics["method"], estimator=metrics["estimator"],
                 beta=metrics["beta"], guidance_scale=r["guidance_scale"], seed=metrics["seed"],
                 distance=r["distance"], floor=r["floor"]) for r in metrics["results"]]


def with_method(cfg: ToyConfig, **kw) -> ToyConfig:
    """A copy of ``cfg`` with some fields replaced, validated."""
    return replace(cfg, **kw).validate()




def bench(task: str = "8gaussians", *, preset: str = "full", steps: int = 30, n_points: int = 4000,
          device: str = "auto") -> list[str]:
    """Time each learner's update (steps/s) and the guided sampler (points/s) at a preset's sizes.

    Untrained networks: the speed does not depend on the weights. Returns printable lines.
    """
    steps = toy.check_count("steps", steps, bytes_per_item=1)
    n_points = toy.check_count("n_points", n_points, bytes_per_item=2 * 4 * 64)
    cfg = make_config(preset, task=task, device=device)
    dev = resolve_device(device)
    x, e = _data(replace(cfg, n_data=min(cfg.n_data, 20_000)), dev)
    g = torch.Generator().manual_seed(0)
    lines = [f"toy-bench on {dev} ({torch.get_num_threads()} threads), task {task}, preset {preset}"]

    def timed(fn):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return steps / (time.perf_counter() - t0)

    behaviour = _new_behaviour(cfg).to(dev)
    opt = torch.optim.Adam(behaviour.parameters(), lr=cfg.bc_lr)

    def bc_step():
        idx = torch.randint(0, x.shape[0], (cfg.bc_batch,), generator=g).to(dev)
        loss = behaviour.loss(x[idx], None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    lines.append(f"behaviour (batch {cfg.bc_batch}): {timed(bc_step):.1f} steps/s")
    behaviour.eval().requires_grad_(False)
    critic = _new_critic(cfg).to(dev).requires_grad_(False)
    for method, est in [("mse", DEFAULT_ESTIMATOR), ("cep", DEFAULT_ESTIMATOR)] + [("aepo", e_) for e_ in ESTIMATORS]:
        c = replace(cfg, method=method, estimator=est)
        learner = _learner(c, _new_energy(c).to(dev), behaviour, critic, x, g)

        def step():
            if method == "cep":
                idx = torch.randint(0, x.shape[0], (c.cep_batch, c.cep_support), generator=g).to(dev)
                learner.update({"s": None, "support": x[idx], "support_q": e[idx]})
            else:
                idx = torch.randint(0, x.shape[0], (c.energy_batch,), generator=g).to(dev)
                learner.update({"s": None, "a": x[idx]})

        name = f"aepo[{est}]" if method == "aepo" else method
        lines.append(f"energy {name} (batch {c.cep_batch if method == 'cep' else c.energy_batch}{' x K=' + str(c.cep_support) if method == 'cep' else ''}): "
                     f"{timed(step):.1f} steps/s")
    models = ToyModels(cfg, behaviour, critic, _new_energy(cfg).to(dev).requires_grad_(False))
    for label, m in (("behaviour", replace(models, energy=None)), ("guided", models)):
        t0 = time.perf_counter()
        guided_samples(m, 1.0, n_points)
        lines.append(f"sampling {label} ({cfg.sample_steps} steps, {cfg.solver}): "
                     f"{n_points / (time.perf_counter() - t0):.0f} points/s")
    return lines
