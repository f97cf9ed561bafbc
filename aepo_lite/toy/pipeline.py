"""One toy run on the stage mechanism of :mod:`aepo_lite.training` (docs/derivation.md sections 6 and 6b).

The config is :class:`aepo_lite.config.ToyConfig` (its defaults: the toy ``full`` preset). A run is a
list of stages, each a :class:`~aepo_lite.training.Stage` with its config part and upstream hashes,
trained by :func:`~aepo_lite.training.run_stage` (one progress bar, metrics, NaN checks, periodic
checkpoints, resume) into a keyed :class:`~aepo_lite.training.StageStore` at ``<cache>/<task>/``:

  1. ``behaviour``: the diffusion behaviour model of the task; its hash holds the data and the
     behaviour part only, so it is trained once and shared by every method, beta and seed;
  2. ``critic``   : only with ``critic.kind = "regression"``: a smooth MLP Q(x) regressed on the
     reward e(x) (the toy rewards are piecewise constant, so grad e = 0 almost everywhere);
  3. ``energy``   : f_phi for ``aepo`` (its estimator: ``energy.posterior``, ``energy.covariance``,
     ``energy.expansion``, and for the in-support posteriors ``energy.centered``: groups of K = ``support.k``
     data points noised at one t, f regressed on the target's differences within each group, as QGPO's
     contrastive batch groups them), ``qgpo`` (QGPO's contrastive energy over K = ``support.k`` data
     points) or ``mse``; ``bc`` stops after stage 1.

Matched reward access (docs/derivation.md 6b): ``critic.kind = "reward"`` (the default) gives every method the
true reward e(x) on data points; ``"regression"`` gives every method the fitted critic. AEPO's
``first`` / ``second`` expansions and its ``mixture`` posterior differentiate Q, so they need the
fitted critic. Evaluation: guided samples at each guidance scale against exact target samples
(sliced Wasserstein distance and its noise floor), the mean reward, and f_phi against the exact E_t.

A run folder holds ``config.json``, ``metrics.jsonl`` (training), ``results.json`` and ``figure.png``;
a folder holding another run's config is refused.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from aepo_lite._io import atomic_write_json, read_json
from aepo_lite.config import METHODS, PRESETS, ToyConfig, apply_overrides, estimator_name, preset_config, to_dict
from aepo_lite.core import guidance as G
from aepo_lite.core.aepo import EnergyLearner, EpsNormTable, differentiates_q
from aepo_lite.core.diffusion import SOLVERS, DiffusionModel, energy_guidance
from aepo_lite.core.nets import MLP, SMOOTH_ACTIVATIONS, EnergyNet, NoiseNet
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.device import resolve_device
from aepo_lite.toy import tasks as toy
from aepo_lite.training import BehaviourLearner, RegressionLearner, RunLock, Stage, StageStore, stage_hash
from aepo_lite.training.captured import CapturedLearner, captured_stage
from aepo_lite.training.stages import MetricsLog, check_run_folder, run_cached_stage

__all__ = ["CRITIC_KINDS", "POSTERIORS", "ESTIMATORS", "make_config", "check_config", "needs_grad_q", "uses_critic",
           "estimator", "estimator_label", "estimator_overrides", "critic_label", "PreconditionedEnergy", "ToyModels",
           "build_stages", "energy_learner", "data_q", "support_batch", "train_toy", "train_critic", "heldout_rmse",
           "guided_samples", "energy_errors", "run_floor", "draw_target", "draw_distance", "draws_of", "evaluate_toy",
           "run_toy", "default_out", "default_cache_dir"]

CRITIC_KINDS = ("reward", "regression")  # the true e(x) on data points | a smooth MLP fitted to it
POSTERIORS = ("gaussian", "mixture", "particles")
ESTIMATORS = tuple(f"{c}/{e}" for c in G.COVARIANCES for e in G.EXPANSIONS)  # AEPO's Gaussian-posterior estimators
BOX = 1.2  # AEPO's cover points and the energy-error grid live in [-BOX, BOX]^2
# what two runs writing one folder may differ in: neither the trained networks nor the results depend on it
RUN_FIELDS_FREE = ("device", "log_every", "checkpoint_every", "capture")
# what a folder's run may be evaluated again with: the trained networks do not depend on it (the stages are cached)
REEVAL_FIELDS = ("eval.draws",)


def default_cache_dir() -> Path:
    return Path("runs") / "toy_cache"


# ----------------------------------------------------------------------------------------- config
def make_config(task: str, method: str, preset: str = "full", **overrides) -> ToyConfig:
    """A checked :class:`ToyConfig`: the preset, then ``overrides`` (top-level fields or parts as dicts,
    e.g. ``seed=1, energy=dict(beta=3.0)``; None values are ignored)."""
    cfg = preset_config(ToyConfig, preset, task=task, method=method)
    return check_config(apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}))


def needs_grad_q(cfg: ToyConfig) -> bool:
    """Whether the energy target differentiates Q (:func:`aepo_lite.core.aepo.differentiates_q`)."""
    return differentiates_q(cfg.method, cfg.energy)


def uses_critic(cfg: ToyConfig) -> bool:
    """Whether the run trains the fitted critic (``critic.kind = "regression"``; bc trains no energy)."""
    return cfg.method != "bc" and cfg.critic.kind == "regression"


def _uses_support(cfg: ToyConfig) -> bool:
    return cfg.method == "qgpo" or (cfg.method == "aepo" and cfg.energy.posterior != "gaussian")


def estimator(cfg: ToyConfig) -> str:
    """AEPO's estimator: ``<covariance>/<expansion>``, or the in-support posterior with its K support points
    (``particles-K256``, ``mixture-K64-h0.05``); "" for other methods."""
    return estimator_name(cfg.energy, cfg.support.k) if cfg.method == "aepo" else ""


def estimator_label(cfg: ToyConfig) -> str:
    """A row label naming the energy target, e.g. ``aepo(gaussian-fit/sampled)``, ``qgpo``."""
    return f"aepo({estimator(cfg)})" if cfg.method == "aepo" else cfg.method


def matched_groups(k: int) -> int:
    """Centered groups per energy step so that each step noises as many points as QGPO's contrastive batch of
    the toy defaults (``energy.batch`` x ``support.k`` = 256 x 16 = 4096): the matched budget of the
    centered toy rows (at least one group)."""
    d = ToyConfig()
    return max(1, d.energy.batch * d.support.k // k)


def estimator_overrides(spec: str) -> dict:
    """An estimator name -> the config parts it sets: ``gaussian-fit/sampled`` -> ``{"energy": {...}}``;
    ``particles-K256`` / ``mixture-K64-h0.05`` (K support points, bandwidth h) also set ``support.k``;
    ``particles-K64-centered`` (ours, docs/derivation.md 4b) regresses within-group differences over groups of
    K noised data points, with ``energy.batch`` = :func:`matched_groups` (K) groups and ``energy.cover`` = 0."""
    m = re.fullmatch(r"(particles|mixture)(?:-K(\d+))?(?:-h([0-9.eE+-]+))?(-centered)?", spec)
    if m and not (m.group(1) == "particles" and m.group(3)):
        energy = {"posterior": m.group(1)}
        if m.group(3):
            try:
                energy["bandwidth"] = float(m.group(3))
            except ValueError:
                raise ValueError(f"estimator {spec!r}: bandwidth h must be a number, got {m.group(3)!r}") from None
        if m.group(4):
            k = int(m.group(2)) if m.group(2) else ToyConfig().support.k
            if k < 1:
                raise ValueError(f"estimator {spec!r}: K must be >= 1, got {k}")
            energy.update(centered=True, batch=matched_groups(k), cover=0.0)
        return {"energy": energy, **({"support": {"k": int(m.group(2))}} if m.group(2) else {})}
    if spec not in ESTIMATORS:
        raise ValueError(f"estimator: expected <covariance>/<expansion> (one of {', '.join(ESTIMATORS)}), "
                         f"particles[-K<k>][-centered] or mixture[-K<k>][-h<bandwidth>][-centered], got {spec!r}")
    cov, exp = spec.split("/")
    return {"energy": {"posterior": "gaussian", "covariance": cov, "expansion": exp}}


def critic_label(cfg: ToyConfig) -> str:
    """What the energy target read Q from: ``reward`` | ``regression`` (``none`` for bc)."""
    return "none" if cfg.method == "bc" else cfg.critic.kind


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _number(name: str, v, *, low: float = 0.0, low_open: bool = False, high: float = math.inf) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
    if not ok or (low_open and v == low):
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise ValueError(f"{name}: expected a finite number {bound}, got {v!r}")


def _check_counts(cfg: ToyConfig) -> None:
    """Positive integers; the arrays they size must fit in memory (a ValueError in GiB otherwise)."""
    b, c, e, ev = cfg.behaviour, cfg.critic, cfg.energy, cfg.eval
    group = cfg.support.k if _uses_support(cfg) else 1
    if cfg.method == "aepo" and cfg.energy.centered:  # each of a group's K noised points reads all K particles
        group = cfg.support.k ** 2
    sized = {"n_data": (cfg.n_data, 64), "eval.n_samples": (ev.n_samples, 64 * 128),
             "eval.pool_size": (ev.pool_size, 64), "eval.n_ref_data": (ev.n_ref_data, 64),
             "behaviour.batch": (b.batch, 4096), "critic.batch": (c.batch, 4096),
             "energy.batch": (e.batch, 4096 * max(group, e.n_samples)), "support.k": (cfg.support.k, 4096),
             "energy.n_samples": (e.n_samples, 4096), "eval.grid_size": (ev.grid_size, 1),
             "eval.n_projections": (ev.n_projections, 1), "eval.draws": (ev.draws, 64)}
    for name in ("behaviour.steps", "behaviour.hidden", "behaviour.blocks", "critic.steps", "critic.hidden",
                 "critic.depth", "energy.steps", "energy.hidden", "energy.depth", "sampling.steps", "log_every",
                 "checkpoint_every"):
        part, leaf = name.split(".") if "." in name else (None, name)
        sized[name] = (getattr(getattr(cfg, part) if part else cfg, leaf), 1)
    for name, (v, nbytes) in sized.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected an integer, got {v!r}")
        toy.check_count(name, v, bytes_per_item=nbytes, low=2 if name == "eval.grid_size" else 1)
    toy.check_count("eval.grid_size", ev.grid_size**2, bytes_per_item=64)
    if cfg.eval.n_ref_data > cfg.n_data:
        raise ValueError(f"eval.n_ref_data: at most n_data ({cfg.n_data}) data points, got {cfg.eval.n_ref_data}")


def _check_numbers(cfg: ToyConfig) -> None:
    for name, v in (("seed", cfg.seed), ("data_seed", cfg.data_seed)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ValueError(f"{name}: expected an integer in [0, 2**63), got {v!r}")
    for name in ("behaviour.lr", "critic.lr", "energy.lr"):
        part, leaf = name.split(".")
        _number(name, getattr(getattr(cfg, part), leaf), low_open=True)
    e, s = cfg.energy, cfg.sampling
    _number("energy.beta", e.beta)
    _number("energy.cover", e.cover, high=1.0)
    _number("energy.bandwidth", e.bandwidth)
    for name, v in (("energy.clip", e.clip), ("energy.grad_clip", e.grad_clip)):
        if v is not None:
            _number(name, v, low_open=True)
    _number("sampling.guidance_t_max", s.guidance_t_max, low_open=True, high=1.0)
    scales = s.guidance_scales
    if not isinstance(scales, tuple) or not scales:
        raise ValueError(f"sampling.guidance_scales: expected one or more guidance scales, got {scales!r}")
    for w in scales:
        _number("sampling.guidance_scales", w)
    sched = VPSchedule()
    if not cfg.eval.error_times:
        raise ValueError("eval.error_times: expected one or more diffusion times")
    for t in cfg.eval.error_times:
        _number("eval.error_times", t, low=sched.t_min, high=sched.t_max)


def check_config(cfg: ToyConfig) -> ToyConfig:
    """Raise a ValueError naming the first bad field (dotted, as on the command line); runs before any training."""
    if not isinstance(cfg, ToyConfig):
        raise ValueError(f"cfg: expected a ToyConfig, got {type(cfg).__name__}")
    toy.get_task(cfg.task)
    _choice("method", cfg.method, METHODS)
    _choice("preset", cfg.preset, PRESETS["toy"])
    _choice("critic.kind", cfg.critic.kind, CRITIC_KINDS)
    _choice("critic.activation", cfg.critic.activation, SMOOTH_ACTIVATIONS + ("relu",))
    _choice("energy.posterior", cfg.energy.posterior, POSTERIORS)
    _choice("energy.covariance", cfg.energy.covariance, G.COVARIANCES)
    _choice("energy.expansion", cfg.energy.expansion, G.EXPANSIONS)
    _choice("energy.baseline", cfg.energy.baseline, ("none",))  # the toy tasks have no value function
    _choice("sampling.solver", cfg.sampling.solver, SOLVERS)
    _check_counts(cfg)
    _check_numbers(cfg)
    if cfg.energy.centered and cfg.method == "aepo":
        if cfg.energy.posterior == "gaussian":
            raise ValueError("energy.centered: the centered regression noises each group of support points at one t; "
                             "it needs energy.posterior particles or mixture, not gaussian")
        if cfg.energy.cover:
            raise ValueError(f"energy.cover: the centered regression noises the support points themselves, so no "
                             f"fraction of the batch can be drawn off the data; set energy.cover 0 (got {cfg.energy.cover:g})")
    if needs_grad_q(cfg) and cfg.critic.kind == "reward":
        raise ValueError(f"critic.kind: AEPO's {estimator(cfg)!r} target differentiates Q, and the toy rewards are "
                         "piecewise constant (grad e = 0 almost everywhere); use critic.kind='regression' (a smooth "
                         "fitted critic), or energy.expansion='sampled' / energy.posterior='particles'")
    if needs_grad_q(cfg) and cfg.critic.activation == "relu":
        raise ValueError("critic.activation: a ReLU critic has no curvature, and this AEPO target differentiates Q; "
                         "use a smooth activation")
    resolve_device(cfg.device)
    return cfg


# ----------------------------------------------------------------------------------------- networks
class PreconditionedEnergy(nn.Module):
    """f_phi(s, x_t, t) = EnergyNet(s, c_in(t) x_t, t) with c_in(t) = alpha_t v / (alpha_t^2 v + sigma_t^2).

    c_in x_t is the posterior mean of x_0 for Gaussian data of variance v. The exact E_t depends on
    x_t only through alpha_t x_t / sigma_t^2 (docs/derivation.md section 6: the ||x_t||^2 term cancels in the
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


@dataclass
class ToyModels:
    """What a toy run trained: the behaviour model, the fitted critic (None with the true reward), the energy
    (None for bc), the training set ``x`` (N, 2) with its rewards ``e`` (N,), and per-stage stats."""

    cfg: ToyConfig
    behaviour: DiffusionModel
    x: torch.Tensor
    e: torch.Tensor
    critic: Optional[nn.Module] = None
    energy: Optional[nn.Module] = None
    info: dict = field(default_factory=dict)


def _seeded(seed: int, make) -> nn.Module:
    """``make()`` with the CPU generator seeded: a network's initial weights follow its stage's seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _models(cfg: ToyConfig, x: torch.Tensor, e: torch.Tensor, device: torch.device) -> ToyModels:
    b, c, en = cfg.behaviour, cfg.critic, cfg.energy
    behaviour = _seeded(_seed(cfg.data_seed, 0), lambda: DiffusionModel(NoiseNet(2, 0, hidden=b.hidden,
                                                                                 n_blocks=b.blocks)))
    m = ToyModels(cfg, behaviour.to(device), x, e)
    if uses_critic(cfg):
        m.critic = _seeded(_seed(cfg.data_seed, 1), lambda: MLP(2, 1, hidden=c.hidden, depth=c.depth,
                                                                activation=c.activation, layer_norm=c.layer_norm))
        m.critic.to(device)
    if cfg.method != "bc":
        net = _seeded(_seed(cfg.seed, 2), lambda: EnergyNet(2, 0, hidden=en.hidden, depth=en.depth))
        m.energy = (PreconditionedEnergy(net, m.behaviour.schedule, float(x.double().var(0).mean()))
                    if en.precondition else net).to(device)
    return m


# ----------------------------------------------------------------------------------------- stages
def _seed(base: int, stage: int) -> int:
    return base * 7919 + stage


def _decay(part) -> int | None:
    return part.steps if part.lr_decay else None


def _critic_part(cfg: ToyConfig) -> dict:
    """The critic fields a regression on e(x) depends on (the RL-only ones would only split the cache)."""
    c = cfg.critic
    return {k: getattr(c, k) for k in ("kind", "steps", "batch", "lr", "lr_decay", "hidden", "depth", "activation",
                                      "layer_norm")}


def energy_learner(cfg: ToyConfig, m: ToyModels) -> EnergyLearner:
    """The energy stage's learner for ``cfg`` (its target reads the true reward, or the critic once trained)."""
    e, task, sched = cfg.energy, toy.get_task(cfg.task), m.behaviour.schedule
    critic = m.critic
    q_fn = (lambda s, a: critic(a).squeeze(-1)) if critic is not None else (lambda s, a: task.reward(a))
    gaussian = cfg.method == "aepo" and e.posterior == "gaussian"
    eps_table = (EpsNormTable.estimate(m.behaviour.eps, m.x[:4096], None, sched)
                 if gaussian and e.covariance == "isotropic" else None)
    fit_cov = torch.cov(m.x.T) if gaussian and e.covariance == "gaussian-fit" else None
    return EnergyLearner(m.energy, e, schedule=sched, eps_fn=m.behaviour.eps, q_fn=q_fn, eps_table=eps_table,
                         fit_cov=fit_cov, decay_steps=_decay(e), method=cfg.method)


def data_q(m: ToyModels) -> torch.Tensor:
    """Q at every data point (N,): the true reward, or the fitted critic once its stage is trained."""
    with torch.no_grad():
        return m.e if m.critic is None else m.critic(m.x).squeeze(-1)


def support_batch(m: ToyModels, k: int, n: int, g: torch.Generator, q: torch.Tensor) -> dict:
    """``support`` (n, k, 2): k data points per row, drawn uniformly with ``g``, and ``support_q`` (n, k): q at them."""
    i = torch.randint(0, m.x.shape[0], (n, k), generator=g, device=m.x.device)
    return {"support": m.x[i], "support_q": q[i]}


def _energy_batches(cfg: ToyConfig, m: ToyModels, device):
    """The energy stage's batch source. qgpo: ``support`` (B, K, 2) data points and ``support_q`` (B, K), Q at
    them; aepo, mse: ``a`` (B, 2) (aepo: a fraction ``energy.cover`` uniform on the box), and for AEPO's
    in-support posteriors also ``support`` / ``support_q`` (K = ``support.k`` data points per row)."""
    e, K, N = cfg.energy, cfg.support.k, m.x.shape[0]
    held: dict = {}

    def support(g) -> dict:
        if "q" not in held:  # Q at every data point, after the critic stage
            held["q"] = data_q(m)
        return support_batch(m, K, e.batch, g, held["q"])

    def batch(g) -> dict:
        if cfg.method == "qgpo":
            return {"s": None, **support(g)}
        a = m.x[torch.randint(0, N, (e.batch,), generator=g, device=device)]
        n_cover = round(e.cover * e.batch) if cfg.method == "aepo" else 0
        if n_cover:  # AEPO's target is a function of x_t alone, so it can be trained off the data too
            box = (2 * torch.rand(n_cover, 2, generator=g, device=device, dtype=a.dtype) - 1) * BOX
            a = torch.cat([a[n_cover:], box])
        return {"s": None, "a": a, **(support(g) if _uses_support(cfg) else {})}

    return batch


def build_stages(cfg: ToyConfig, m: ToyModels, device) -> list[Stage]:
    """The run's stages in order, each with its config part and upstream hashes (a function of ``cfg`` only).

    The behaviour and critic stages are seeded from ``data_seed`` and hash only the data and their own
    part, so every method, beta and seed of a task shares them; the energy stage is seeded from ``seed`` and
    hashes the behaviour stage only when its target reads the behaviour model (AEPO's Gaussian posterior), so a
    run with another behaviour model reuses every other energy.
    """
    x, e, N = m.x, m.e, m.x.shape[0]
    data = {"task": cfg.task, "data_seed": cfg.data_seed, "n_data": cfg.n_data}
    b, c = cfg.behaviour, cfg.critic

    def draw(g, n):
        return torch.randint(0, N, (n,), generator=g, device=device)

    stages = [Stage("behaviour", {"data": data, "behaviour": b}, b.steps,
                    lambda: BehaviourLearner(m.behaviour, b.lr, decay_steps=_decay(b)),
                    lambda g: {"a": x[draw(g, b.batch)], "s": None}, seed=_seed(cfg.data_seed, 0), device=device)]
    if cfg.method == "bc":
        return stages
    # only AEPO's Gaussian target reads eps_theta; the in-support ones read data points and Q (and QGPO, MSE neither)
    upstream = [stage_hash(stages[0])] if cfg.method == "aepo" and cfg.energy.posterior == "gaussian" else []
    if m.critic is not None:
        stages.append(Stage("critic", {"data": data, "critic": _critic_part(cfg)}, c.steps,
                            lambda: RegressionLearner(m.critic, c.lr, decay_steps=_decay(c)),
                            lambda g: (lambda i: {"x": x[i], "y": e[i]})(draw(g, c.batch)),
                            seed=_seed(cfg.data_seed, 1), device=device))
        upstream.append(stage_hash(stages[-1]))
    part = {"data": data, "method": cfg.method, "critic": cfg.critic.kind, "energy": cfg.energy,
            "support_k": cfg.support.k if _uses_support(cfg) else None}
    stages.append(Stage("energy", part, cfg.energy.steps, lambda: energy_learner(cfg, m),
                        _energy_batches(cfg, m, device), upstream=tuple(upstream), seed=_seed(cfg.seed, 2),
                        device=device))
    return stages


def _data(cfg: ToyConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    task = toy.get_task(cfg.task)
    x = task.sample(cfg.n_data, seed=cfg.data_seed, device=device)
    return x, task.reward(x)


def _train_entry(st: Stage, store: StageStore, cfg: ToyConfig, log, progress: bool, device) -> dict:
    """Train (or load) one cache entry; while it trains, its lock refuses a second writer of the same entry."""
    learner, stats = run_cached_stage(st, store, log=log, log_every=cfg.log_every,
                                      checkpoint_every=cfg.checkpoint_every, progress=progress, map_location=device)
    stats = dict(stats)
    if isinstance(learner, CapturedLearner) and learner.how() is not None:
        stats["capture"] = learner.how()
    return stats


def train_toy(cfg: ToyConfig, *, cache_dir=None, progress: bool = True, log: MetricsLog | None = None,
              trained_only: bool = False) -> ToyModels:
    """Train every stage the method needs into the cache ``<cache_dir>/<task>/`` (finished entries are loaded,
    an entry killed mid-way resumes from its last periodic checkpoint). Returns the trained models.
    ``trained_only``: load finished stages and train nothing (an error naming the first stage the cache lacks)."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    x, e = _data(cfg, device)
    m = _models(cfg, x, e, device)
    store = StageStore(Path(cache_dir or default_cache_dir()) / cfg.task, keyed=True)
    stages = build_stages(cfg, m, device)
    for st in stages:  # a broken or foreign checkpoint is an error before any training starts
        ck = store.load(st.name, stage_hash(st))
        if trained_only and (ck is None or ck["step"] < ck["steps"]):
            raise ValueError(f"cache_dir: {store.path(st.name, stage_hash(st))} is not a finished {st.name} stage of "
                             f"this config ({cfg.task} {estimator_label(cfg)}, seed {cfg.seed}, {st.name} "
                             f"{st.steps} steps); nothing is trained here: train the run first, or pass the cache "
                             "it was trained into")
    if cfg.capture:  # the same stages (and hashes), each step one CUDA graph
        stages = [captured_stage(st, device) for st in stages]
    for st in stages:
        m.info[st.name] = _train_entry(st, store, cfg, log, progress, device)
        getattr(m, st.name).requires_grad_(False).eval()
    if m.critic is not None:
        m.info["critic"]["heldout_rmse"] = heldout_rmse(cfg, m.critic)
    return m


def heldout_rmse(cfg: ToyConfig, critic: nn.Module, n: int = 4096) -> float:
    """RMS of the fitted critic against the true reward e(x) on ``n`` fresh points of ``cfg``'s task (a draw
    seeded apart from the training set, the same for every critic of a task and data seed)."""
    task = toy.get_task(cfg.task)
    device = next(critic.parameters()).device
    xv = task.sample(n, seed=99_991 + cfg.data_seed, device=device)
    with torch.no_grad():
        return float(((critic(xv).squeeze(-1) - task.reward(xv)) ** 2).mean().sqrt())


def train_critic(cfg: ToyConfig, *, cache_dir=None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train (or load from the stage cache) only the fitted critic of ``cfg`` (``critic.kind = "regression"``),
    the very stage :func:`train_toy` trains and shares; (critic, its stage info with ``heldout_rmse``)."""
    check_config(cfg)
    if not uses_critic(cfg):
        raise ValueError(f"critic.kind: train_critic trains the fitted critic (critic.kind 'regression', a method "
                         f"other than bc), got critic.kind {cfg.critic.kind!r} with method {cfg.method!r}")
    device = resolve_device(cfg.device)
    x, e = _data(cfg, device)
    m = _models(cfg, x, e, device)
    store = StageStore(Path(cache_dir or default_cache_dir()) / cfg.task, keyed=True)
    st = next(s for s in build_stages(cfg, m, device) if s.name == "critic")
    info = _train_entry(st, store, cfg, None, progress, device)
    m.critic.requires_grad_(False).eval()
    return m.critic, dict(info, heldout_rmse=heldout_rmse(cfg, m.critic))


# ----------------------------------------------------------------------------------------- evaluation
def guided_samples(models: ToyModels, guidance_scale: float, n: int, *, seed: int = 0) -> torch.Tensor:
    """n samples (n, 2) of the guided sampler at ``guidance_scale`` (the behaviour model when there is no
    energy), on the CPU, not clipped (the caller clips to the box and counts what left it)."""
    _number("guidance_scale", guidance_scale)
    n = toy.check_count("n", n, bytes_per_item=2 * 4 * 64)
    s = models.cfg.sampling
    guide = None if models.energy is None else energy_guidance(models.energy)
    w = float(guidance_scale) if guide is not None else 0.0
    t_max = s.guidance_t_max if s.guidance_t_max < models.behaviour.schedule.t_max else None
    g = torch.Generator(device=models.x.device).manual_seed(50_000 + seed)
    x = models.behaviour.sample(n, n_steps=s.steps, solver=s.solver, guidance=guide, guidance_scale=w, generator=g,
                                guidance_t_max=t_max)
    return x.detach().cpu()


def energy_errors(models: ToyModels, times=None) -> dict:
    """{t: RMS error of f_phi against the exact E_t} on the grid, up to a constant, weighted by mu_t."""
    if models.energy is None:
        return {}
    cfg = models.cfg
    dev = models.x.device
    pts, _ = toy.make_grid(cfg.eval.grid_size, BOX, device=dev)
    x, e = models.x[:cfg.eval.n_ref_data], models.e[:cfg.eval.n_ref_data]
    out = {}
    for t in (cfg.eval.error_times if times is None else times):
        E, logp = toy.exact_intermediate_energy(pts, t, x, e, cfg.energy.beta, models.behaviour.schedule,
                                                return_log_density=True)
        with torch.no_grad():
            f = models.energy(None, pts, torch.full((pts.shape[0],), float(t), device=dev))
        out[f"{t:g}"] = toy.energy_error(f, E, logp)
    return out


def run_floor(cfg: ToyConfig) -> float:
    """The noise floor a run of ``cfg`` is read against: the expected one of its task, beta and eval settings."""
    ev = cfg.eval
    return toy.expected_floor(cfg.task, cfg.energy.beta, ev.n_samples, pool_size=ev.pool_size,
                              n_projections=ev.n_projections)


def draw_target(cfg: ToyConfig, d: int = 0) -> torch.Tensor:
    """Draw ``d``'s exact target set: ``eval.n_samples`` points of pi, seeded by 20_000 + seed + d."""
    ev = cfg.eval
    return toy.target_samples(toy.get_task(cfg.task), cfg.energy.beta, ev.n_samples, pool_size=ev.pool_size,
                              seed=20_000 + cfg.seed + d)


def draw_distance(models: ToyModels, guidance_scale: float, d: int, target: torch.Tensor | None = None) -> tuple:
    """Draw ``d`` of the distance at ``guidance_scale``: guided samples of sampler seed ``seed + d`` (clipped to the
    box) against draw d's exact target set (``target``, else :func:`draw_target`). (distance, raw samples, clipped
    samples, seconds the sampler took)."""
    cfg, ev = models.cfg, models.cfg.eval
    target = draw_target(cfg, d) if target is None else target
    t0 = time.perf_counter()
    raw = guided_samples(models, guidance_scale, ev.n_samples, seed=cfg.seed + d)
    dt = time.perf_counter() - t0
    xs = raw if cfg.energy.clip is None else raw.clamp(-cfg.energy.clip, cfg.energy.clip)
    return toy.sliced_wasserstein(xs, target, ev.n_projections), raw, xs, dt


def sample_mass(models: ToyModels, axis: str, threshold: float, *, guidance_scale: float = 1.0, d: int = 0) -> dict:
    """Where draw ``d``'s guided samples (the very ones its distance is measured on) put their mass against the
    exact target set of that draw: the share of each with coordinate ``axis`` ("x" or "y") above ``threshold``,
    and each set's quartiles on both axes. A distance says how far apart the two sets are; this says where."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis: expected 'x' or 'y', got {axis!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    if not (isinstance(d, int) and 0 <= d < models.cfg.eval.draws):
        raise ValueError(f"d: expected one of the run's {models.cfg.eval.draws} distance draws (0 to "
                         f"{models.cfg.eval.draws - 1}), got {d!r}")
    target = draw_target(models.cfg, d)
    _, _, xs, _ = draw_distance(models, guidance_scale, d, target)
    i, q = (0 if axis == "x" else 1), torch.tensor([0.25, 0.5, 0.75], dtype=xs.dtype)
    share = lambda pts: float((pts[:, i] > threshold).double().mean())  # noqa: E731
    quartiles = lambda pts: {a: torch.quantile(pts[:, j], q.to(pts)).tolist() for j, a in enumerate("xy")}  # noqa: E731
    return dict(task=models.cfg.task, guidance_scale=guidance_scale, draw=d, axis=axis, threshold=threshold,
                samples_share=share(xs), target_share=share(target), samples_quartiles=quartiles(xs),
                target_quartiles=quartiles(target))


def draws_of(row: dict) -> int:
    """The distance draws behind one guidance scale's row of a ``results.json`` (1 for runs evaluated before
    rows recorded their ``distances``)."""
    return len(row.get("distances", [row["distance"]]))


def evaluate_toy(models: ToyModels, *, keep_samples: bool = False, budget: bool = True) -> dict:
    """Per guidance scale: the distance to exact target samples as the mean over ``eval.draws`` draws (each draw's
    in ``distances``), its floor, and from draw 0 the mean reward and the share of samples outside the box; with
    ``budget`` also parts 4-5 of the error budget (:func:`aepo_lite.toy.trained_budget.trained_budget`)."""
    cfg, ev = models.cfg, models.cfg.eval
    task, beta, clip = toy.get_task(cfg.task), cfg.energy.beta, cfg.energy.clip
    scales = (0.0,) if models.energy is None else cfg.sampling.guidance_scales
    targets = [draw_target(cfg, d) for d in range(ev.draws)]
    target, floor = targets[0], run_floor(cfg)
    rows, samples = [], {}
    for w in scales:
        draws = [draw_distance(models, w, d, t) for d, t in enumerate(targets)]
        dists, (_, raw, xs, dt) = [x[0] for x in draws], draws[0]
        rows.append(dict(guidance_scale=w, distance=sum(dists) / len(dists), distances=dists, floor=floor,
                         mean_reward=float(task.reward(xs).mean()), points_per_s=ev.n_samples / max(dt, 1e-9),
                         frac_outside_box=float((raw.abs() > (clip or math.inf)).any(1).float().mean())))
        samples[w] = xs
    out = dict(task=cfg.task, method=cfg.method, estimator=estimator(cfg), label=estimator_label(cfg),
               critic=critic_label(cfg), beta=beta, seed=cfg.seed, preset=cfg.preset, results=rows,
               target_mean_reward=float(task.reward(target).mean()),
               behaviour_mean_reward=float(task.reward(task.sample(ev.pool_size, seed=7)).mean()),
               energy_error=energy_errors(models), train_info=models.info)
    if budget:  # parts 4-5 of the error budget (aepo_lite.toy.trained_budget)
        from aepo_lite.toy.trained_budget import trained_budget
        out["budget"] = trained_budget(models, targets)
    if keep_samples:
        out["_samples"], out["_target"] = samples, target
    return out


# ----------------------------------------------------------------------------------------- a run folder
def default_out(cfg: ToyConfig, root="runs/toy") -> Path:
    """``<root>/<task>/<method[-estimator]>-b<beta>[-<critic kind>]-<preset>-s<seed>``: every setting that makes
    two runs of the grid distinct (any other difference is refused by the folder's config.json)."""
    method = estimator_label(cfg).replace("(", "-").replace("/", "-").rstrip(")")
    parts = [method, f"b{cfg.energy.beta:g}"] + ([] if cfg.method == "bc" else [cfg.critic.kind])
    return Path(root) / cfg.task / "-".join(parts + [cfg.preset, f"s{cfg.seed}"])


def _check_not_less(out: Path, cfg: ToyConfig) -> None:
    """Refuse to overwrite a folder's evaluation with one of fewer distance draws."""
    p = out / "results.json"
    if not p.exists():
        return
    try:
        had = draws_of(read_json(p)["results"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return  # an unreadable or partial results.json holds nothing to keep
    if had > cfg.eval.draws:
        raise ValueError(f"eval.draws: {out} holds an evaluation of {had} distance draws; {cfg.eval.draws} would "
                         f"overwrite it with less (set eval.draws={had}, or use another folder)")


def run_toy(cfg: ToyConfig, out_dir, *, cache_dir=None, progress: bool = True, figure: bool = True,
            budget: bool = True) -> dict:
    """Train (or load) and evaluate one config into ``out_dir``: ``config.json``, ``metrics.jsonl``,
    ``results.json`` and ``figure.png``. The folder is locked while the run writes it."""
    check_config(cfg)
    out = Path(out_dir)
    with RunLock(out):
        check_run_folder(out, to_dict(cfg), ignore=RUN_FIELDS_FREE + REEVAL_FIELDS, part="energy")
        _check_not_less(out, cfg)
        atomic_write_json(out / "config.json", to_dict(cfg))
        log = MetricsLog(out / "metrics.jsonl")
        try:
            models = train_toy(cfg, cache_dir=cache_dir, progress=progress, log=log)
        finally:
            log.close()
        results = evaluate_toy(models, keep_samples=figure, budget=budget)
        samples, target = results.pop("_samples", None), results.pop("_target", None)
        atomic_write_json(out / "results.json", results)
        if figure:
            from aepo_lite.toy.report import plot_run
            plot_run(models, results, samples, target, out / "figure.png")
    return results
