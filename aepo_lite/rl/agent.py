"""The offline-RL agent: its stages, acting and evaluation.

A run is a list of stages on :mod:`aepo_lite.training` (checkpointed under ``DIR/checkpoints/``,
periodically inside each stage, and resumed from there):

  1. ``behaviour``: the diffusion behaviour model mu(a|s) (denoising score matching);
  2. ``support``  : K actions a^(j) ~ mu(.|s) for every observation row (QGPO's contrastive groups and
                    in-support critic, and AEPO's in-support targets; only when one of them is used);
  3. ``critic``   : IQL or QGPO's in-support softmax Q (:mod:`aepo_lite.core.critics`);
  4. ``energy``   : the intermediate energy f_phi (:mod:`aepo_lite.core.aepo`): AEPO's analytic target,
                    QGPO's contrastive energy (CEP) or MSE. Behaviour cloning (``bc``) stops after stage 1.

Methods: ``aepo`` (IQL critic by default), ``qgpo`` (CEP + in-support critic, QGPO's recipe),
``mse`` (IQL critic), ``bc`` (guidance scale 0). Acting draws actions from the behaviour model
guided by grad_{a_t} f_phi at a guidance scale passed as an argument, optionally best-of-N
candidates ranked by Q. The config is :class:`aepo_lite.config.TrainConfig`.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from aepo_lite._checks import check_scalar, check_seed
from aepo_lite._io import atomic_write_json, read_json
from aepo_lite.config import METHODS, PRESETS, TrainConfig, apply_overrides, config_diff, estimator_name, flatten, \
    from_dict, preset_config, to_dict
from aepo_lite.core import guidance as G
from aepo_lite.core.aepo import EnergyLearner, EpsNormTable, differentiates_q
from aepo_lite.core.critics import CRITICS, make_critic
from aepo_lite.core.diffusion import SOLVERS, CapturedSampler, DiffusionModel, FusedGuidedEps, energy_guidance
from aepo_lite.core.nets import SMOOTH_ACTIVATIONS, EnergyNet, NoiseNet
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.device import compile_limits, compile_mode, compile_module, resolve_device, seed_everything
from aepo_lite.rl.data import OfflineData, REWARD_SCALINGS, flatten_observation, load_minari, open_minari, \
    returns_to_go
from aepo_lite.rl.evaluation import reference_scores, run_episodes, summarize_returns
from aepo_lite.training import BehaviourLearner, RunLock, Stage, StageStore, run_stage, stage_hash
from aepo_lite.training.captured import CapturedLearner, captured_stage
from aepo_lite.training.stages import MetricsLog, check_run_folder, run_cached_stage

__all__ = ["Agent", "TrainConfig", "METHODS", "PRESETS", "STAGES", "EVAL_FIELDS", "make_config", "check_config",
           "critic_kind", "domain_settings", "needs", "estimator_label", "train", "train_seeds",
           "train_stacked_stages", "train_stacked_in_runs", "load_run", "evaluate_run", "evaluation_done"]

STAGES = ("behaviour", "support", "critic", "energy")
# what may change between evaluations of one trained run (and on a resume): acting, evaluation, logging, speed
EVAL_FIELDS = ("preset", "device", "log_every", "checkpoint_every", "tensorboard", "compile", "capture", "sampling",
               "eval")


def make_config(dataset: str, method: str, preset: str, **overrides) -> TrainConfig:
    """A checked :class:`TrainConfig`: the preset, the dataset's domain settings, then ``overrides``.

    ``overrides`` are top-level fields or parts as dicts, e.g. ``seed=1, energy=dict(beta=5.0)``;
    None values are ignored.
    """
    cfg = domain_settings(preset_config(TrainConfig, preset, dataset=dataset, method=method))
    return check_config(apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}))


def domain_settings(cfg: TrainConfig) -> TrainConfig:
    """The dataset's domain settings (its suite's overrides, :mod:`aepo_lite.rl.suites`). Sizes and sweeps (the
    ``support`` and ``sampling`` parts) apply to the full preset only; smaller presets keep their own."""
    from aepo_lite.rl.suites import domain_overrides
    over = domain_overrides(cfg.dataset)
    if cfg.preset != "full":
        over = {k: v for k, v in over.items() if k not in ("support", "sampling")}
    return apply_overrides(cfg, over)


def default_critic(method: str) -> str:
    """The critic a method trains unless ``critic.kind`` names another: qgpo its in-support Q, the others IQL."""
    return "insupport" if method == "qgpo" else "iql"


def critic_kind(cfg: TrainConfig) -> str:
    """The critic a run trains: ``critic.kind``, or the method's default (:func:`default_critic`)."""
    return cfg.critic.kind or default_critic(cfg.method)


def _support_in_energy(cfg: TrainConfig) -> bool:
    return cfg.method == "qgpo" or (cfg.method == "aepo" and cfg.energy.posterior != "gaussian")


def needs(cfg: TrainConfig, stage: str) -> bool:
    """Whether the run's method trains ``stage``."""
    if stage == "behaviour":
        return True
    if cfg.method == "bc":
        return False
    if stage == "support":
        return _support_in_energy(cfg) or critic_kind(cfg) == "insupport"
    return True


def estimator_label(cfg: TrainConfig) -> str:
    """A row label naming what differs between energy targets, e.g. ``aepo(tweedie/sampled)``,
    ``aepo(particles-K8)``, ``aepo(mixture-K8-h0.05)``, ``aepo(particles-K8-centered)``; a critic other than
    the method's default is named after it (``mse+insupport``, ``qgpo+iql``)."""
    label = f"aepo({estimator_name(cfg.energy, cfg.support.k)})" if cfg.method == "aepo" else cfg.method
    if cfg.method != "bc" and critic_kind(cfg) != default_critic(cfg.method):
        label += f"+{critic_kind(cfg)}"
    return label


def _positive_ints(cfg: TrainConfig) -> dict:
    return {"behaviour.steps": cfg.behaviour.steps, "behaviour.batch": cfg.behaviour.batch,
            "behaviour.hidden": cfg.behaviour.hidden, "behaviour.blocks": cfg.behaviour.blocks,
            "critic.steps": cfg.critic.steps, "critic.batch": cfg.critic.batch, "critic.hidden": cfg.critic.hidden,
            "critic.depth": cfg.critic.depth, "support.k": cfg.support.k, "support.steps": cfg.support.steps,
            "energy.steps": cfg.energy.steps, "energy.batch": cfg.energy.batch, "energy.hidden": cfg.energy.hidden,
            "energy.depth": cfg.energy.depth, "energy.n_samples": cfg.energy.n_samples,
            "sampling.steps": cfg.sampling.steps, "eval.episodes": cfg.eval.episodes, "eval.envs": cfg.eval.envs,
            "eval.candidates": cfg.eval.candidates, "log_every": cfg.log_every,
            "checkpoint_every": cfg.checkpoint_every}


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Raise a ValueError naming the first bad field (dotted, as on the command line), before any data is read."""
    _check_choices(cfg)
    for k, v in _positive_ints(cfg).items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}: expected a positive integer, got {v!r}")
    _check_numbers(cfg)
    _check_sizes(cfg)
    _check_combinations(cfg)
    resolve_device(cfg.device)
    return cfg


def _check_choices(cfg: TrainConfig) -> None:
    _choice("method", cfg.method, METHODS)
    _choice("preset", cfg.preset, PRESETS["rl"])
    _choice("reward_scaling", cfg.reward_scaling, REWARD_SCALINGS)
    _choice("critic.kind", cfg.critic.kind, ("",) + CRITICS)
    _choice("sampling.solver", cfg.sampling.solver, SOLVERS)
    _choice("support.solver", cfg.support.solver, SOLVERS)
    _choice("energy.covariance", cfg.energy.covariance, G.COVARIANCES)
    _choice("energy.expansion", cfg.energy.expansion, G.EXPANSIONS)
    _choice("energy.posterior", cfg.energy.posterior, G.POSTERIORS)
    _choice("energy.fit", cfg.energy.fit, G.GROUP_FITS)
    _choice("energy.baseline", cfg.energy.baseline, ("value", "none"))
    _choice("critic.activation", cfg.critic.activation, SMOOTH_ACTIVATIONS + ("relu",))


def _check_numbers(cfg: TrainConfig) -> None:
    """Seeds, rates and ranges: each a finite number in its range (the critic's too, named as flags)."""
    check_seed("seed", cfg.seed)
    check_seed("eval.seed", cfg.eval.seed)
    for k, lr in (("behaviour.lr", cfg.behaviour.lr), ("critic.lr", cfg.critic.lr), ("energy.lr", cfg.energy.lr)):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"{k}: expected a positive learning rate, got {lr!r}")
    c, e = cfg.critic, cfg.energy
    ranges = (("energy.beta", e.beta, 0.0, None, False), ("critic.gamma", c.gamma, 0.0, 1.0, False),
              ("critic.tau_target", c.tau_target, 0.0, 1.0, True), ("critic.expectile", c.expectile, 0.0, 1.0, True),
              ("critic.beta_q", c.beta_q, 0.0, None, False), ("energy.bandwidth", e.bandwidth, 0.0, None, False),
              ("energy.cover", e.cover, 0.0, 1.0, False),
              ("sampling.guidance_t_max", cfg.sampling.guidance_t_max, 0.0, 1.0, True))
    for name, v, lo, hi, lo_open in ranges:  # (name, value, low, high, low excluded)
        check_scalar(name, v, low=lo, high=hi, low_open=lo_open)
    for name, v in (("energy.clip", e.clip), ("energy.grad_clip", e.grad_clip)):
        if v is not None:  # None: no clipping
            check_scalar(name, v, low=0.0, low_open=True)
    if not cfg.sampling.guidance_scales or any(not math.isfinite(w) or w < 0 for w in cfg.sampling.guidance_scales):
        raise ValueError(f"sampling.guidance_scales: expected non-negative numbers, got {cfg.sampling.guidance_scales}")
    cap = cfg.eval.max_episode_steps
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"eval.max_episode_steps: expected a positive integer (None: the environment's), got {cap!r}")


def _check_sizes(cfg: TrainConfig) -> None:
    """Networks and batches whose weights (with gradients and Adam's moments) or activations fit in memory: a
    width of 10^8 is an error naming it, not minutes of allocation."""
    from aepo_lite.toy.tasks import check_count
    for part, layers in (("behaviour", 2 * cfg.behaviour.blocks + 2), ("critic", 5 * (cfg.critic.depth + 1)),
                         ("energy", cfg.energy.depth + 1)):
        p = getattr(cfg, part)
        check_count(f"{part}.hidden", p.hidden, bytes_per_item=16 * layers * p.hidden)
        check_count(f"{part}.batch", p.batch, bytes_per_item=16 * layers * p.hidden)


def _check_combinations(cfg: TrainConfig) -> None:
    if cfg.method == "bc" and cfg.eval.candidates > 1:
        raise ValueError("eval.candidates: best-of-N ranks by Q, and the bc method trains no critic")
    if cfg.critic.activation == "relu" and differentiates_q(cfg.method, cfg.energy):
        raise ValueError(f"critic.activation: a ReLU critic has no curvature; AEPO's {cfg.energy.expansion!r} "
                         "expansion differentiates Q in the action (use a smooth activation, or "
                         "energy.expansion='sampled')")
    if cfg.critic.lr_decay and cfg.method != "bc":
        raise ValueError("critic.lr_decay: the offline-RL critics (iql, insupport) train at a constant learning rate, "
                         "as IQL's and QGPO's do; lr_decay applies to the toy tasks' fitted critic only (drop "
                         "--critic.lr-decay)")
    if cfg.capture and cfg.compile:
        raise ValueError("capture: a captured step replays one CUDA graph of the whole step; with compile=True the "
                         "networks capture their own graphs. Pass one of --capture and --compile")
    if cfg.sampling.capture and cfg.sampling.compile:
        raise ValueError("sampling.capture: a captured sampler replays one CUDA graph of the whole sampling call; "
                         "sampling.compile makes graphs of its own. Pass one of --sampling.capture and "
                         "--sampling.compile")
    if cfg.sampling.capture and cfg.sampling.solver == "ddpm":
        raise ValueError("sampling.capture: ddpm draws fresh noise at every step and cannot be replayed; use another "
                         "sampling.solver or drop --sampling.capture")
    if cfg.compile and cfg.method == "aepo" and cfg.energy.expansion == "second":
        raise ValueError("compile: AEPO's 'second' expansion differentiates the critic twice, which torch.compile "
                         "does not support; use energy.expansion='sampled' or 'first', or compile=False")
    if cfg.energy.centered and cfg.method == "aepo" and cfg.energy.posterior == "gaussian":
        raise ValueError("energy.centered: the centered regression groups each state's support actions; it needs "
                         "energy.posterior particles or mixture (with energy.posterior gaussian, also pass "
                         "--energy.no-centered)")
    if cfg.energy.covariance == "gaussian-fit" and cfg.method == "aepo" and cfg.energy.posterior == "gaussian":
        raise ValueError("energy.covariance: 'gaussian-fit' needs a Gaussian behaviour per state; the RL agent "
                         "supports tweedie | isotropic | none")


class Agent:
    """The networks of one run and the data normalisation; :meth:`act` is the policy."""

    def __init__(self, cfg: TrainConfig, state_dim: int, action_dim: int, obs_mean: np.ndarray, obs_std: np.ndarray,
                 action_low: np.ndarray, action_high: np.ndarray, device: torch.device):
        self.cfg, self.device = cfg, device
        self.state_dim, self.action_dim = state_dim, action_dim
        self.obs_mean = torch.as_tensor(obs_mean, dtype=torch.float32, device=device)
        self.obs_std = torch.as_tensor(obs_std, dtype=torch.float32, device=device)
        self.action_low, self.action_high = np.asarray(action_low, np.float64), np.asarray(action_high, np.float64)
        self.behaviour = DiffusionModel(NoiseNet(action_dim, state_dim, cfg.behaviour.hidden, cfg.behaviour.blocks),
                                        VPSchedule()).to(device)
        self.critic = None
        self.energy = None
        self._fused = None  # the compiled guided sampler step (compile_sampler)
        self._captured: dict[int, CapturedSampler] = {}  # sampling.capture: one per batch size
        if cfg.method != "bc":
            ccfg = replace(cfg.critic, kind=critic_kind(cfg))
            self.critic = make_critic(state_dim, action_dim, ccfg).to(device)
            self.energy = EnergyNet(action_dim, state_dim, cfg.energy.hidden, cfg.energy.depth).to(device)

    # ------------------------------------------------------------------ acting
    def normalize(self, obs: np.ndarray) -> torch.Tensor:
        """Raw (flattened) observations (n, k) -> normalised states on the device."""
        s = torch.as_tensor(np.asarray(obs, np.float32), device=self.device)
        if s.ndim != 2 or s.shape[1] != self.state_dim:
            raise ValueError(f"obs: expected shape (n, {self.state_dim}), got {tuple(s.shape)}")
        return (s - self.obs_mean) / self.obs_std

    def act_unit(self, s: torch.Tensor, guidance_scale: float, *, n_candidates: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised states s (n, k) -> actions in [-1, 1]^d (n, d) at guidance scale w."""
        cfg = self.cfg
        if guidance_scale != 0 and self.energy is None:
            raise ValueError(f"guidance_scale: the {cfg.method} agent has no energy network; use 0")
        if n_candidates > 1 and self.critic is None:
            raise ValueError("n_candidates: best-of-N needs a critic")
        n = s.shape[0]
        s_rep = s.repeat_interleave(n_candidates, 0) if n_candidates > 1 else s
        t_max = cfg.sampling.guidance_t_max if cfg.sampling.guidance_t_max < self.behaviour.schedule.t_max else None
        if cfg.sampling.capture:
            return self._best_of(s_rep, self._captured_sample(s_rep, guidance_scale, t_max, generator), n,
                                 n_candidates)
        guide = fused = None
        if self.energy is not None and guidance_scale != 0:
            if cfg.sampling.compile:
                if self._fused is None:  # compiled once per agent (and batch size), then reused
                    self._fused = FusedGuidedEps(self.behaviour.eps, self.energy, compile=True)
                fused = self._fused
            else:
                guide = energy_guidance(self.energy)
        rows = s_rep.shape[0]
        if fused is not None and rows & (rows - 1):
            # a compiled graph per batch size: pad to the next power of two (the last state repeated), so the
            # shrinking batches at the end of an evaluation reuse a few graphs instead of compiling each size
            s_rep = torch.cat([s_rep, s_rep[-1:].expand((1 << (rows - 1).bit_length()) - rows, -1)])
        a = self.behaviour.sample(cond=s_rep, n_steps=cfg.sampling.steps, solver=cfg.sampling.solver, guidance=guide,
                                  guided_eps=fused, guidance_t_max=t_max, guidance_scale=float(guidance_scale),
                                  generator=generator, clip=1.0)[:rows]
        return self._best_of(s_rep[:rows], a, n, n_candidates)

    def _best_of(self, s_rep: torch.Tensor, a: torch.Tensor, n: int, n_candidates: int) -> torch.Tensor:
        """The action of each state with the largest Q among its n_candidates (all of a when there is one)."""
        if n_candidates > 1:
            with torch.no_grad():
                q = self.critic.q_fn(s_rep, a).reshape(n, n_candidates)
            a = a.reshape(n, n_candidates, -1)[torch.arange(n, device=a.device), q.argmax(1)]
        return a

    def _captured_sample(self, s: torch.Tensor, w: float, t_max, generator) -> torch.Tensor:
        """``sampling.capture``: the behaviour's sample through a :class:`CapturedSampler` (one per batch size; on
        CUDA rows padded to the next power of two with zero noise, so shrinking batches reuse a few graphs). The
        starting noise is drawn for the real rows as the plain path draws it, so on the CPU the actions are the
        plain path's exactly."""
        rows, cfg = s.shape[0], self.cfg.sampling
        x_T = self.behaviour.initial_noise(rows, self.action_dim, generator)
        size = 1 << (rows - 1).bit_length() if s.device.type == "cuda" else rows
        if size > rows:
            s = torch.cat([s, s[-1:].expand(size - rows, -1)])
            x_T = torch.cat([x_T, x_T.new_zeros(size - rows, x_T.shape[1])])
        if size not in self._captured:
            guide = energy_guidance(self.energy) if self.energy is not None else None
            self._captured[size] = CapturedSampler(self.behaviour.eps, schedule=self.behaviour.schedule, x_T=x_T,
                                                   cond=s, n_steps=cfg.steps, solver=cfg.solver, guidance=guide,
                                                   guidance_t_max=t_max)
        return self._captured[size](x_T, s, float(w)).clamp(-1.0, 1.0)[:rows]

    def act(self, obs: np.ndarray, guidance_scale: float, *, n_candidates: int = 1,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Raw observations (n, k) -> environment actions (n, d) at guidance scale w."""
        a = self.act_unit(self.normalize(obs), guidance_scale, n_candidates=n_candidates, generator=generator)
        a = a.detach().cpu().double().numpy()
        return self.action_low + (a + 1.0) * 0.5 * (self.action_high - self.action_low)


# ---------------------------------------------------------------------------------- training
SUPPORT_PER_CALL_CUDA = 16  # support chunks a sampling pass on CUDA (65536 actions at K = 16; CPU: 1)


class SupportSampler:
    """The ``support`` stage's learner: each step draws K behaviour actions for the next chunk of
    observation rows (a sampling stage resumes chunk by chunk like a training stage).

    ``per_call`` chunks are sampled in one pass (default: :data:`SUPPORT_PER_CALL_CUDA` on CUDA, where a pass
    of 4096 rows waits on kernel launches; 1 elsewhere), their starting noise drawn chunk by chunk from the
    stage's generator as single passes draw it, so the actions are those of one chunk a pass up to
    floating-point rounding; the steps that follow take the chunks sampled ahead. A solver that draws noise at
    every step (``ddpm``) samples one chunk a pass."""

    def __init__(self, behaviour: DiffusionModel, obs: torch.Tensor, cfg: TrainConfig, chunk: int = 4096,
                 per_call: int | None = None):
        self.behaviour, self.obs, self.cfg = behaviour, obs, cfg.support
        self.per = max(1, chunk // cfg.support.k)
        self.per_call = 1 if cfg.support.solver == "ddpm" else (
            per_call or (SUPPORT_PER_CALL_CUDA if obs.device.type == "cuda" else 1))
        self.chunks: list[torch.Tensor] = []  # sampled so far (possibly ahead of the steps taken)
        self.done = 0  # steps taken

    @staticmethod
    def n_steps(rows: int, k: int, chunk: int = 4096) -> int:
        return math.ceil(rows / max(1, chunk // k))

    def step(self, batch: dict) -> dict:
        if self.done >= len(self.chunks):
            self._sample(batch["generator"])
        self.done += 1
        return {}

    def _sample(self, g: torch.Generator | None) -> None:
        """The next ``per_call`` chunks in one pass (what ``DiffusionModel.sample`` draws for one chunk a pass:
        the starting noise chunk by chunk from ``g``, then ``g`` for a solver's later noise, clipped to 1)."""
        from aepo_lite.core.diffusion import sample
        i, K = len(self.chunks) * self.per, self.cfg.k
        rows = self.obs[i:i + self.per * self.per_call]
        p, d = next(self.behaviour.parameters()), self.behaviour.net.action_dim
        sizes = [min(self.per, rows.shape[0] - j) * K for j in range(0, rows.shape[0], self.per)]
        x_T = torch.cat([torch.randn((n, d), generator=g, dtype=p.dtype, device=g.device if g is not None else p.device)
                         for n in sizes]).to(p.device)
        a = sample(self.behaviour.eps, x_T, schedule=self.behaviour.schedule, cond=rows.repeat_interleave(K, 0),
                   n_steps=self.cfg.steps, solver=self.cfg.solver, generator=g).clamp(-1.0, 1.0)
        self.chunks += [c.reshape(-1, K, d) for c in a.split(sizes)]

    @property
    def support(self) -> torch.Tensor:
        """(M, K, d): K actions for each of the M observation rows."""
        return torch.cat(self.chunks)

    def state_dict(self) -> dict:
        return {"chunks": [c.cpu() for c in self.chunks], "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.chunks = [c.to(self.obs.device) for c in state["chunks"]]
        self.done = state.get("done", len(self.chunks))  # checkpoints before sampling ahead: one chunk a step


def _energy_learner(cfg: TrainConfig, agent: Agent, T: dict, draw) -> EnergyLearner:
    critic, eps_table = agent.critic, None
    if cfg.method == "aepo" and cfg.energy.posterior == "gaussian" and cfg.energy.covariance == "isotropic":
        i = draw(None, min(T["a"].shape[0], 8192))
        eps_table = EpsNormTable.estimate(agent.behaviour.eps, T["a"][i], T["obs"][T["idx"][i]], agent.behaviour.schedule)
    q_fn = critic.q_fn
    if cfg.energy.baseline == "value" and hasattr(critic, "v"):
        q_fn = lambda s, a: critic.q_fn(s, a) - critic.v(s)  # noqa: E731  (a per-state shift)
    return EnergyLearner(agent.energy, cfg.energy, schedule=agent.behaviour.schedule, eps_fn=agent.behaviour.eps,
                         q_fn=q_fn, eps_table=eps_table, method=cfg.method,
                         decay_steps=cfg.energy.steps if cfg.energy.lr_decay else None)


def build_stages(cfg: TrainConfig, agent: Agent, T: dict, device: torch.device) -> list[Stage]:
    """The run's stages, in order, each with its config part and upstream hashes (a function of ``cfg`` only)."""
    N, M = T["a"].shape[0], T["obs"].shape[0]
    held: dict = {}  # results of earlier stages that later batch sources read (the support actions)

    def draw(g, batch):
        return torch.randint(0, N, (batch,), generator=g, device=device)

    def seed(i):
        return (cfg.seed * 7919 + i) % 2**63  # any seed check_seed accepts

    data = {"dataset": cfg.dataset, "transitions": N}
    b = cfg.behaviour
    stages = [Stage("behaviour", {"data": data, "behaviour": b}, b.steps, seed=seed(0), device=device,
                    learner=lambda: BehaviourLearner(agent.behaviour, b.lr, decay_steps=b.steps if b.lr_decay else None),
                    batches=lambda g: (lambda i: {"a": T["a"][i], "s": T["obs"][T["idx"][i]]})(draw(g, b.batch)))]
    if cfg.method == "bc":
        return stages
    up = {"behaviour": stage_hash(stages[0])}
    if needs(cfg, "support"):
        stages.append(Stage("support", {"support": cfg.support}, SupportSampler.n_steps(M, cfg.support.k),
                            lambda: held.setdefault("support", SupportSampler(agent.behaviour, T["obs"], cfg)),
                            lambda g: {"generator": g}, upstream=(up["behaviour"],), seed=seed(1)))
        up["support"] = stage_hash(stages[-1])

    kind = critic_kind(cfg)
    if kind == "mc":  # the return to go of each transition, computed once (the rewards as the critic sees them)
        T = dict(T, g=torch.as_tensor(returns_to_go(T["r"].cpu().numpy(), T["idx"].cpu().numpy(),
                                                    T["next_idx"].cpu().numpy(), cfg.critic.gamma),
                                      dtype=torch.float32, device=device))

    def critic_batch(g):
        i = draw(g, cfg.critic.batch)
        if kind == "mc":
            return {"s": T["obs"][T["idx"][i]], "a": T["a"][i], "g": T["g"][i]}
        out = {"s": T["obs"][T["idx"][i]], "a": T["a"][i], "r": T["r"][i], "s2": T["obs"][T["next_idx"][i]],
               "done": T["done"][i]}
        if "support" in held:
            out["support2"] = held["support"].support[T["next_idx"][i]]
        return out

    stages.append(Stage("critic", {"data": dict(data, reward_scaling=cfg.reward_scaling),
                                   "critic": replace(cfg.critic, kind=kind)}, cfg.critic.steps, lambda: agent.critic,
                        critic_batch, upstream=(up["support"],) if kind == "insupport" else (), seed=seed(2),
                        device=device))
    up["critic"] = stage_hash(stages[-1])

    def energy_batch(g, with_q: bool = True):
        """with_q=False: without ``support_q`` (several seeds' stacked batches compute it in one call)."""
        i = draw(g, cfg.energy.batch)
        s = T["obs"][T["idx"][i]]
        out = {"s": s, "a": T["a"][i]}
        if _support_in_energy(cfg):
            sup = held["support"].support[T["idx"][i]]
            B, K, d = sup.shape
            if with_q:
                with torch.no_grad():
                    out["support_q"] = agent.critic.q_fn(s.repeat_interleave(K, 0),
                                                         sup.reshape(B * K, d)).reshape(B, K)
            out["support"] = sup
        return out

    stages.append(Stage("energy", {"method": cfg.method, "energy": cfg.energy}, cfg.energy.steps,
                        lambda: _energy_learner(cfg, agent, T, draw), energy_batch,
                        upstream=tuple(up[k] for k in ("behaviour", "support", "critic") if k in up), seed=seed(3),
                        device=device))
    return stages


def train(cfg: TrainConfig, run_dir, *, data: OfflineData | None = None, progress: bool = True,
          init_behaviour: str | Path | None = None, stage_cache: str | Path | None = None,
          until: str | None = None) -> Agent:
    """Train every stage the method needs into ``run_dir``: finished stages are loaded, a stage killed
    mid-way resumes from its last periodic checkpoint.

    ``init_behaviour``: another run directory to copy finished stages from instead of training them
    (its behaviour stage must match this config; its support and critic stages are copied when they match).
    ``stage_cache``: a folder of stages shared by runs (behaviour, support, critic, keyed by their content
    hash): each is trained there once and copied into every run that needs it.
    ``until``: a stage name; train the stages before it only (``train_seeds`` trains the energy stages of several
    seeds together after that).
    """
    check_config(cfg)
    if until is not None and until not in STAGES:
        raise ValueError(f"until: expected one of {STAGES}, got {until!r}")
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        check_run_folder(run_dir, to_dict(cfg), ignore=EVAL_FIELDS)
        if data is None:
            data, _ = load_minari(cfg.dataset, reward_scaling=cfg.reward_scaling)
        elif data.dataset_id != cfg.dataset:
            raise ValueError(f"data: holds {data.dataset_id!r}, the config names {cfg.dataset!r}")
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        mean, std = data.obs_stats()
        agent = Agent(cfg, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, device)
        T = data.tensors(device)
        stages = build_stages(cfg, agent, T, device)
        store = StageStore(run_dir / "checkpoints", data=data.fingerprint())
        cache = None if stage_cache is None else StageStore(Path(stage_cache), keyed=True, data=store.data)
        for st in stages:  # a broken or foreign checkpoint (or one trained on other data) is an error first
            store.load(st.name, stage_hash(st))
        stats_path = run_dir / "train_stats.json"
        stats = read_json(stats_path) if stats_path.exists() else {}
        if init_behaviour is not None:
            stats.update(_copy_stages(Path(init_behaviour), store, stages))
        atomic_write_json(run_dir / "config.json", to_dict(cfg))
        before_step = _compile(cfg, agent, device)
        if cfg.capture:
            stages = [captured_stage(st, device) for st in stages]
        limits = compile_limits() if cfg.compile else contextlib.nullcontext()
        log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tb" if cfg.tensorboard else None)
        try:
            with limits:
                for st in stages:
                    if st.name == until:
                        break
                    if cache is not None and st.name != "energy":
                        got = _from_cache(st, store, cache, log, cfg, progress, device)
                        stats[st.name] = got or stats.get(st.name, {})
                    copied = {k: v for k, v in stats.get(st.name, {}).items() if k == "copied_from"}
                    learner, got = run_stage(st, store, log=log, log_every=cfg.log_every,
                                             checkpoint_every=cfg.checkpoint_every, progress=progress,
                                             map_location=device, before_step=before_step)
                    stats[st.name] = dict(got, **copied)
                    if isinstance(learner, CapturedLearner) and learner.how() is not None:
                        stats[st.name]["capture"] = learner.how()
                    atomic_write_json(stats_path, stats)
                    _freeze(agent, st.name)
        finally:
            log.close()
    return agent


STACKED = ("behaviour", "support", "critic")  # the stages several seeds can train together here (support: a
# solver that draws no noise after the start; the critic: IQL only, train_stacked_in_runs stacks both kinds)


def train_stacked_stages(cfgs: list[TrainConfig], stage_cache, *, data: OfflineData | None = None,
                         progress: bool = True, stages=STACKED) -> dict[str, dict[int, dict]]:
    """Train the behaviour stages (the support stages, and the IQL critic stages) of several seeds together, each
    as one stacked model (one vmapped loss, one Adam per network; the support actions of every seed in one
    sampling pass: :mod:`aepo_lite.training.stacked`), into the shared stage cache ``stage_cache``.

    ``cfgs``: one config per seed, equal in everything but the seed. Each seed's checkpoint is written under
    the hash its own run computes, so ``train(cfg, run_dir, stage_cache=stage_cache)`` copies it instead of
    training it. Its networks are those of a run that trained the seed alone, up to floating-point rounding.
    The in-support critic is not stacked here: it reads each seed's support actions, a stage of each run
    (:func:`train_stacked_in_runs` stacks it on the runs' finished support stages).
    Seeds whose stage the cache already holds are skipped; a killed stacked stage resumes from its own
    checkpoint (``<stage>-stacked-<hash>.pt`` in the cache, removed once every seed's is written).
    Returns ``{stage: {seed: stats}}`` of the seeds trained here.
    """
    from aepo_lite.training.stacked import StackedBatches, StackedBehaviourLearner, StackedCritic
    if not cfgs:
        raise ValueError("seeds: give at least one config")
    bad = [s for s in stages if s not in STACKED]
    if bad:
        raise ValueError(f"stages: only {STACKED} stack, got {bad}")
    cfgs = [check_config(c) for c in cfgs]
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: each seed once, got {seeds}")
    base = to_dict(cfgs[0])
    for c in cfgs[1:]:
        diff = config_diff(base, to_dict(c), ignore=("seed",))
        if diff:
            a, b = flatten(base), flatten(to_dict(c))
            raise ValueError(f"seeds: several seeds train together only with one config; seed {c.seed} differs from "
                             f"seed {cfgs[0].seed} in " + ", ".join(f"{k} ({b[k]!r} vs {a[k]!r})" for k in diff[:4]))
    if data is None:
        data, _ = load_minari(cfgs[0].dataset, reward_scaling=cfgs[0].reward_scaling)
    elif data.dataset_id != cfgs[0].dataset:
        raise ValueError(f"data: holds {data.dataset_id!r}, the config names {cfgs[0].dataset!r}")
    device = resolve_device(cfgs[0].device)
    cache = StageStore(Path(stage_cache), keyed=True, data=data.fingerprint())
    mean, std = data.obs_stats()
    T = data.tensors(device)
    runs = []
    for c in cfgs:
        seed_everything(c.seed)  # as train() does before it builds the agent: the seed's initial networks
        agent = Agent(c, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, device)
        runs.append((c, agent, {st.name: st for st in build_stages(c, agent, T, device)}))
    out = {}
    for name in stages:
        if name == "critic" and (cfgs[0].method == "bc" or critic_kind(cfgs[0]) != "iql"):
            continue
        if name == "support" and ("support" not in runs[0][2] or cfgs[0].support.solver == "ddpm"):
            continue  # no support stage, or one whose sampler draws noise at every step (each seed alone)
        todo = [(c, agent, sts[name]) for c, agent, sts in runs if not cache.is_complete(name, stage_hash(sts[name]))]
        if not todo:
            continue
        if name == "support":
            out[name] = _stacked_support(runs, todo, cache, cfgs[0], device, progress)
            continue
        # run_stage seeds a single run's batch generator, and torch's global generator (the behaviour's noise),
        # with stage.seed; the critic draws no noise
        src = StackedBatches(todo[0][2].batches, [torch.Generator(device=device).manual_seed(st.seed)
                                                  for *_, st in todo])
        if name == "behaviour":  # no draw when built: its noise generators are simply seeded
            noise = [torch.Generator(device=device).manual_seed(st.seed) for *_, st in todo]
            b = cfgs[0].behaviour
            make = lambda: StackedBehaviourLearner([a.behaviour for _, a, _ in todo], b.lr, generators=noise,  # noqa: E731
                                                   decay_steps=b.steps if b.lr_decay else None, batches=src)
            unstack = lambda learner, i, agent: learner.unstacked(i, agent.behaviour).state_dict()  # noqa: E731
        else:
            make = lambda: StackedCritic([a.critic for _, a, _ in todo], batches=src)  # noqa: E731
            unstack = lambda learner, i, agent: learner.unstacked(i, agent.critic).state_dict()  # noqa: E731
        out[name] = _stacked_stage(name, todo, make, unstack, src, cache, cfgs[0], device, progress)
    return out


def _stacked_support(runs, todo, cache: StageStore, cfg: TrainConfig, device, progress: bool) -> dict[int, dict]:
    """The support stages of ``todo`` in one sampling pass a chunk, from each seed's finished behaviour model
    (loaded from ``cache``)."""
    from aepo_lite.training.stacked import StackedBatches, StackedSupportSampler
    for c, agent, sts in runs:
        if not cache.is_complete("behaviour", stage_hash(sts["behaviour"])):
            raise ValueError(f"stages: seed {c.seed} has no finished behaviour stage in {cache.root}; "
                             "stack 'behaviour' first")
    behaviour = {c.seed: sts["behaviour"] for c, _, sts in runs}
    for c, agent, _ in todo:
        run_stage(behaviour[c.seed], cache, progress=False, map_location=device)
        _freeze(agent, "behaviour")
    gens = [torch.Generator().manual_seed(st.seed) for *_, st in todo]  # as run_stage seeds each pass
    return _stacked_stage("support", todo,
                          lambda: StackedSupportSampler([st.learner() for *_, st in todo], generators=gens),
                          lambda learner, i, agent: learner.unstacked(i).state_dict(),
                          StackedBatches(lambda g: {}, gens), cache, cfg, device, progress)


def _stacked_stage(name, todo, make, unstack, src, cache: StageStore, cfg: TrainConfig, device, progress: bool,
                   save=None) -> dict[int, dict]:
    """One stacked stage (resumable, in the cache ``cache``), then each seed's checkpoint under its own hash:
    ``save(entry, checkpoint)`` for each entry of ``todo`` (default: into ``cache``, under the entry's lock)."""
    steps = todo[0][2].steps
    stacked = Stage(f"{name}-stacked", {"seeds": [stage_hash(e[2]) for e in todo]}, steps, learner=make,
                    batches=src, device=device)
    hs = stage_hash(stacked)
    cache.root.mkdir(parents=True, exist_ok=True)
    learner, stats = run_cached_stage(stacked, cache, log=MetricsLog(cache.root / f"{stacked.name}-{hs}.jsonl"),
                                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                      progress=progress, map_location=device)

    def to_cache(entry, ck):
        h = stage_hash(entry[2])
        with RunLock(cache.root, what="cache", name=f".{name}-{h}.lock", wait=24 * 3600):
            cache.save(name, h, ck)
    out, gens = {}, getattr(learner, "generators", None)  # the noise generators (the critic draws none)
    for i, entry in enumerate(todo):
        c = entry[0]
        rng = {"torch": gens[i].get_state() if gens is not None and device.type == "cpu" else torch.get_rng_state(),
               "batches": src.generators[i].get_state()}
        out[c.seed] = dict(stats, stacked_seeds=[e[0].seed for e in todo])
        (save or to_cache)(entry, {"step": steps, "steps": steps, "learner": unstack(learner, i, entry[1]),
                                   "rng": rng, "stats": out[c.seed]})
    cache.path(stacked.name, hs).unlink(missing_ok=True)  # every seed's own checkpoint is written
    return out


def _noise_after(seed: int, build, device):
    """``build()`` under ``torch.manual_seed(seed)``, as run_stage builds a stage's learner, and a generator that
    continues torch's global stream from there (what that run's steps then draw from)."""
    torch.manual_seed(seed)
    built = build()
    g = torch.Generator(device=device)
    g.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
    return built, g


def train_stacked_in_runs(cfgs: list[TrainConfig], run_dirs: list, stage: str, *, stage_cache, data: OfflineData,
                          progress: bool = True) -> dict[int, dict]:
    """The ``stage`` ("critic" or "energy") of several seeds' runs trained together, on each run's finished
    earlier stages (``train(..., until=stage)`` first): the critics as one :class:`StackedCritic` (IQL or
    in-support: each seed's batches read its own support actions), the energy networks as one
    :class:`StackedEnergyLearner` (each seed's learner computes its own targets from its own behaviour model,
    support actions and critic; a Monte-Carlo critic is left to ``train``). A seed's critic checkpoint goes into
    ``stage_cache`` (its run copies it from there, as any shared stage), its energy checkpoint into its run; the
    stacked one lives in ``stage_cache`` while it trains (resumable). Seeds whose stage is already there (or started
    alone) are left to ``train``. Returns ``{seed: stats}`` of the seeds trained here."""
    from aepo_lite.training.stacked import StackedBatches, StackedCritic, StackedEnergyLearner, StackedQ
    if stage not in ("critic", "energy"):
        raise ValueError(f"stage: expected 'critic' or 'energy', got {stage!r}")
    if cfgs[0].method == "bc" or (stage == "critic" and critic_kind(cfgs[0]) == "mc"):
        return {}  # no critic; the Monte-Carlo critic, trained per seed by ``train``
    device = resolve_device(cfgs[0].device)
    cache = StageStore(Path(stage_cache), keyed=True, data=data.fingerprint())
    mean, std = data.obs_stats()
    T = data.tensors(device)
    with contextlib.ExitStack() as locks:
        todo = []
        for c, d in zip(cfgs, run_dirs):
            locks.enter_context(RunLock(d))
            seed_everything(c.seed)
            agent = Agent(c, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, device)
            stages = build_stages(c, agent, T, device)
            names = [st.name for st in stages]
            store = StageStore(Path(d) / "checkpoints", data=cache.data)
            target = stages[names.index(stage)]
            h = stage_hash(target)
            if store.load(stage, h) is not None or (stage == "critic" and cache.load(stage, h) is not None):
                continue
            for st in stages[:names.index(stage)]:  # finished: loaded (the support sampler fills the batches' support)
                if not store.is_complete(st.name, stage_hash(st)):
                    raise ValueError(f"out: {d} has no finished {st.name} stage; train it first "
                                     f"(train(..., until={stage!r}))")
                run_stage(st, store, progress=False, map_location=device)
                _freeze(agent, st.name)
            todo.append((c, agent, target, store))
        if len(todo) < 2:
            return {}
        gens = [torch.Generator(device=device).manual_seed(st.seed) for _, _, st, _ in todo]
        if stage == "energy" and _support_in_energy(cfgs[0]):  # Q at every seed's support actions in one call
            src = StackedBatches([functools.partial(st.batches, with_q=False) for _, _, st, _ in todo], gens,
                                 after=StackedQ([a.critic for _, a, _, _ in todo]).support_q)
        else:
            src = StackedBatches([st.batches for _, _, st, _ in todo], gens)
        if stage == "critic":
            return _stacked_stage("critic", todo, lambda: StackedCritic([a.critic for _, a, _, _ in todo], batches=src),
                                  lambda learner, i, agent: learner.unstacked(i, agent.critic).state_dict(), src,
                                  cache, cfgs[0], device, progress)

        def make():
            learners, gens = zip(*(_noise_after(st.seed, st.learner, device) for _, _, st, _ in todo))
            return StackedEnergyLearner(list(learners), generators=list(gens), batches=src)
        return _stacked_stage("energy", todo, make, lambda learner, i, agent: learner.unstacked(i).state_dict(), src,
                              cache, cfgs[0], device, progress,
                              save=lambda e, ck: e[3].save("energy", stage_hash(e[2]), ck))


def train_seeds(cfgs: list[TrainConfig], run_dirs: list, *, stage_cache, data: OfflineData | None = None,
                progress: bool = True) -> list[Agent]:
    """Several seeds of one config, trained together where the stages allow: the behaviour stages
    and their support actions (:func:`train_stacked_stages`, into ``stage_cache``), the critics together,
    the energy networks together (:func:`train_stacked_in_runs`); finally each seed's run (:func:`train`), which
    finds its stages finished and evaluates. One seed: ``train``."""
    if len(run_dirs) != len(cfgs):
        raise ValueError(f"out: expected one run directory per seed ({len(cfgs)}), got {len(run_dirs)}")
    if len(set(map(str, run_dirs))) != len(run_dirs):
        raise ValueError("out: the seeds' run directories must differ")
    if data is None and cfgs:
        data, _ = load_minari(cfgs[0].dataset, reward_scaling=cfgs[0].reward_scaling)
    if len(cfgs) > 1:
        train_stacked_stages(cfgs, stage_cache, data=data, progress=progress, stages=("behaviour", "support"))
        for stage in ("critic", "energy"):
            for c, d in zip(cfgs, run_dirs):
                train(c, d, data=data, progress=progress, stage_cache=stage_cache, until=stage)
            train_stacked_in_runs(cfgs, run_dirs, stage, stage_cache=stage_cache, data=data, progress=progress)
    return [train(c, d, data=data, progress=progress, stage_cache=stage_cache) for c, d in zip(cfgs, run_dirs)]


def _copy_stages(src: Path, store: StageStore, stages: list[Stage]) -> dict:
    other, stats = StageStore(src / "checkpoints", data=store.data), {}
    for st in stages:
        if st.name == "energy":
            break
        copied = store.copy_from(other, st.name, stage_hash(st))
        if copied is not None:
            stats[st.name] = dict(copied, copied_from=str(src))
        elif st.name == "behaviour" and not store.path(st.name, stage_hash(st)).exists():
            raise ValueError(f"init_behaviour: {src} has no finished behaviour stage trained with this config "
                             "(same dataset, seed and behaviour settings)")
    return stats


def _from_cache(st: Stage, store: StageStore, cache: StageStore, log, cfg: TrainConfig, progress: bool,
                device) -> dict | None:
    """A stage shared by runs of one dataset and seed (behaviour, support, critic): trained once in the cache
    (a lock makes a second run wait for the writer), then copied into this run; its stats, or None when the
    run already has its own checkpoint of it (which then resumes as usual)."""
    h = stage_hash(st)
    if store.path(st.name, h).exists():
        return None
    run_cached_stage(st, cache, log=log, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                     progress=progress, map_location=device)
    got = store.copy_from(cache, st.name, h)
    return None if got is None else dict(got, copied_from=str(cache.root))


def _freeze(agent: Agent, stage: str) -> None:
    mod = {"behaviour": agent.behaviour, "critic": agent.critic, "energy": agent.energy}.get(stage)
    if mod is not None:
        mod.requires_grad_(False).eval()


def _compile(cfg: TrainConfig, agent: Agent, device: torch.device):
    """Compile every network in place (the learners then run the compiled ones); the per-step hook."""
    if not cfg.compile:
        return None
    nets = [agent.behaviour.net] + ([] if agent.critic is None else [*agent.critic.children(), agent.energy])
    for net in nets:
        compile_module(net, device)
    if compile_mode(device) == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin  # each step is one CUDA-graph step
    return None


def load_run(run_dir, *, device: str | None = None, data: OfflineData | None = None,
             overrides: dict | None = None) -> tuple[Agent, TrainConfig, OfflineData]:
    """Rebuild a trained agent from ``run_dir``; ``overrides`` (nested, e.g. ``{"sampling": {"steps": 15}}``)
    may change acting and evaluation settings only."""
    run_dir = Path(run_dir)
    p = run_dir / "config.json"
    if not p.exists():
        raise ValueError(f"run: {run_dir} has no config.json (not an aepo-lite run directory)")
    saved = read_json(p)
    if not isinstance(saved.get("behaviour"), dict):
        raise ValueError(f"run: {run_dir} was made by an older aepo-lite layout (a flat config.json); train it again")
    cfg = from_dict(TrainConfig, saved)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(k for k in over if k not in EVAL_FIELDS)
    if bad:
        raise ValueError(f"overrides: {bad} are training settings and cannot change at evaluation")
    cfg = apply_overrides(cfg, over)
    asked = (over.get("sampling") or {}).get("guidance_scales") or ()
    if cfg.method == "bc" and any(float(w) != 0 for w in asked):  # not evaluated at 0 in silence
        raise ValueError(f"sampling.guidance_scales: the bc method has no energy, so only 0 is meaningful; got "
                         f"{tuple(asked)}")
    if device is not None:
        cfg.device = device
    check_config(cfg)
    if data is None:
        data, _ = load_minari(cfg.dataset, reward_scaling=cfg.reward_scaling)
    mean, std = data.obs_stats()
    dev = resolve_device(cfg.device)
    agent = Agent(cfg, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, dev)
    T = data.tensors(dev)
    store = StageStore(run_dir / "checkpoints", data=data.fingerprint())
    for st in build_stages(cfg, agent, T, dev):
        if st.name == "support":
            continue
        ck = store.load(st.name, stage_hash(st), dev)
        if ck is None or ck["step"] < ck["steps"]:
            raise ValueError(f"run: {run_dir} has no finished {st.name} stage; train it first "
                             f"(aepo-lite train --config {p} --out {run_dir})")
        st.learner().load_state_dict(ck["learner"])
        _freeze(agent, st.name)
    return agent, cfg, data


# ---------------------------------------------------------------------------------- evaluation
def _eval_env_factory(cfg: TrainConfig, minari_ds):
    import gymnasium as gym
    cap = cfg.eval.max_episode_steps
    kw = {} if cap is None else {"max_episode_steps": cap}

    def make():
        env = minari_ds.recover_environment(eval_env=True, **kw)
        if isinstance(env.observation_space, gym.spaces.Dict):
            space = env.observation_space
            k = gym.spaces.flatdim(space)
            env = gym.wrappers.TransformObservation(env, lambda o: flatten_observation(space, o),
                                                    gym.spaces.Box(-np.inf, np.inf, (k,), np.float64))
        return env

    return make


def _row_settings(cfg: TrainConfig) -> dict:
    """Every evaluation setting that changes a result row (reports never merge rows that differ in one)."""
    return {"episodes": cfg.eval.episodes, "candidates": cfg.eval.candidates, "eval_seed": cfg.eval.seed,
            "sample_steps": cfg.sampling.steps, "solver": cfg.sampling.solver,
            "guidance_t_max": cfg.sampling.guidance_t_max, "max_episode_steps": cfg.eval.max_episode_steps}


def evaluation_done(run_dir, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a result row for every guidance scale of ``cfg`` at its evaluation settings
    (and was trained with its training settings)."""
    run_dir = Path(run_dir)
    try:
        res, saved = read_json(run_dir / "results.json"), read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return False
    if config_diff(saved, to_dict(cfg), ignore=EVAL_FIELDS) or saved.get("method") != cfg.method:
        return False
    scales = (0.0,) if cfg.method == "bc" else tuple(float(w) for w in cfg.sampling.guidance_scales)
    settings = _row_settings(cfg)
    have = {r["guidance_scale"] for r in res.get("rows", []) if all(r.get(k) == v for k, v in settings.items())}
    return set(scales) <= have


def _saved_results(path: Path) -> dict:
    """The results an evaluation adds its rows to: ``{}`` when there are none yet; a file that is not a results dict
    with a list of rows is an error naming it (before any evaluation, and it is left as it is)."""
    results = read_json(path) if path.exists() else {}
    if not isinstance(results, dict) or not isinstance(results.get("rows", []), list):
        what = type(results).__name__ if not isinstance(results, dict) else f"'rows': {type(results['rows']).__name__}"
        raise ValueError(f"run: {path} is not a results file of `aepo-lite eval` (it holds a {what}); move it away "
                         "(its rows are not replaced) and evaluate again")
    return results


def evaluate_run(run_dir, *, guidance_scales=None, episodes: int | None = None, device: str | None = None,
                 n_candidates: int | None = None, guidance_t_max: float | None = None,
                 compile_sampler: bool | None = None, sample_steps: int | None = None, overrides: dict | None = None,
                 progress: bool = True) -> dict:
    """Evaluate a trained run at each guidance scale and merge into ``DIR/results.json``.

    Rows are keyed by the guidance scale and the evaluation settings (:func:`_row_settings`): an
    evaluation with other settings adds rows beside the old ones, never over them. Returns the
    results dict (``overrides``: nested sampling/eval values, as ``load_run`` takes): ``rows``, each with ``guidance_scale``, ``return_mean``, ``return_std``,
    ``normalized_score_mean`` (or None), ``normalized_score_std``, the settings, ``actions_per_s``.
    """
    run_dir = Path(run_dir)
    over = {"sampling": {k: v for k, v in (("guidance_scales", None if guidance_scales is None else
                                            tuple(float(w) for w in guidance_scales)),
                                           ("guidance_t_max", guidance_t_max), ("compile", compile_sampler),
                                           ("steps", sample_steps)) if v is not None},
            "eval": {k: v for k, v in (("episodes", episodes), ("candidates", n_candidates)) if v is not None}}
    for part, values in (overrides or {}).items():  # nested ``sampling`` / ``eval`` overrides (the eval command's)
        over[part] = {**values, **over.get(part, {})}
    if not (run_dir / "config.json").is_file():  # before the lock, which would make the folder of a typo
        raise ValueError(f"run: {run_dir} has no config.json (not an aepo-lite run directory)")
    with RunLock(run_dir, what="run"):
        res_path = run_dir / "results.json"
        results = _saved_results(res_path)
        agent, cfg, data = load_run(run_dir, device=device, overrides=over)
        scales = (0.0,) if cfg.method == "bc" else tuple(float(w) for w in cfg.sampling.guidance_scales)
        ds = open_minari(cfg.dataset)
        lo, hi, source = reference_scores(cfg.dataset, dict(ds.storage.metadata))
        make_env = _eval_env_factory(cfg, ds)
        rows = [r for r in results.get("rows", []) if isinstance(r, dict)]
        settings = _row_settings(cfg)
        results.update({"dataset": cfg.dataset, "method": cfg.method, "label": estimator_label(cfg), "seed": cfg.seed,
                        "preset": cfg.preset, "transitions": data.n, "ref_min_score": lo, "ref_max_score": hi,
                        "ref_source": source, "dataset_mean_return": float(np.mean(data.episode_returns)),
                        "data_fingerprint": data.fingerprint()})
        for w in scales:
            g = torch.Generator().manual_seed((cfg.seed * 7919 + 17) % 2**63)
            pol = lambda obs, w=w, g=g: agent.act(obs, w, n_candidates=cfg.eval.candidates, generator=g)  # noqa: E731
            eps, timing = run_episodes(make_env, pol, cfg.eval.episodes, seed=cfg.eval.seed, n_envs=cfg.eval.envs,
                                       progress=progress, desc=f"eval w={w:g}")
            row = dict(summarize_returns([e.ret for e in eps], lo, hi), guidance_scale=w, **settings,
                       actions_per_s=timing["actions"] / max(timing["policy_seconds"], 1e-9))
            key = {"guidance_scale": w, **settings}
            rows = [r for r in rows if any(r.get(k) != v for k, v in key.items())] + [row]
            results["rows"] = rows
            atomic_write_json(res_path, results)  # after each scale: a killed evaluation keeps what it finished
    return results
