"""The offline-RL agent: staged training, resume, acting and evaluation.

Stages (each checkpointed atomically under ``DIR/checkpoints/<stage>.pt`` and skipped on resume):

  1. ``behaviour``: the diffusion behaviour model mu(a|s) (denoising score matching);
  2. ``support``  : K actions a^(j) ~ mu(.|s) for every observation row (QGPO; only when the
                    in-support critic or CEP needs them);
  3. ``critic``   : IQL or QGPO's in-support softmax Q (``critics.py``);
  4. ``energy``   : the intermediate energy f_phi (``aepo.py``): AEPO's analytic target, CEP
                    (QGPO) or MSE. Behaviour cloning (``bc``) stops after stage 1.

Methods: ``aepo`` (IQL critic by default), ``qgpo`` (CEP + in-support critic, QGPO's recipe),
``mse`` (IQL critic), ``bc`` (guidance scale 0). Acting draws actions from the behaviour model
guided by grad_{a_t} f_phi at a guidance scale passed as an argument, optionally best-of-N
candidates ranked by Q.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aepo_lite._io import append_jsonl, atomic_torch_save, atomic_write_json, read_json
from aepo_lite.config import EnergyConfig
from aepo_lite.core.aepo import EnergyLearner, EpsNormTable
from aepo_lite.config import CriticConfig
from aepo_lite.core.critics import make_critic
from aepo_lite.rl.data import OfflineData, flatten_observation, load_minari
from aepo_lite.device import adam, compile_limits, compile_mode, compile_module, resolve_device, seed_everything
from aepo_lite.core.diffusion import SOLVERS, DiffusionModel, FusedGuidedEps, energy_guidance
from aepo_lite.rl.evaluation import reference_scores, run_episodes, summarize_returns
from aepo_lite.core.nets import EnergyNet, NoiseNet
from aepo_lite.core.schedule import VPSchedule

__all__ = ["AgentConfig", "Agent", "METHODS", "PRESETS", "make_config", "train", "load_run", "evaluate_run",
           "STAGES"]

METHODS = ("aepo", "qgpo", "mse", "bc")
STAGES = ("behaviour", "support", "critic", "energy")


@dataclass
class AgentConfig:
    """Everything a run needs; saved as ``DIR/config.json``. Defaults are the ``full`` preset."""

    dataset: str = ""  # Minari dataset id (local, or downloaded when online)
    method: str = "aepo"  # aepo | qgpo | mse | bc
    preset: str = "full"  # the preset these values started from: smoke | bench | full
    seed: int = 0  # seeds every stage (stage i reseeds with seed * 7919 + i) and the sampling noise
    device: str = "auto"  # auto | cpu | cuda (resolved once, never stored as a literal)
    reward_scaling: str = "auto"  # IQL's conventions: auto | locomotion | antmaze | none
    # --- behaviour model (diffusion) -------------------------------------------------------
    behaviour_steps: int = 600_000  # gradient steps (QGPO: 600k)
    behaviour_batch: int = 4096  # batch size (QGPO: 4096)
    behaviour_lr: float = 1e-4  # Adam learning rate (QGPO: 1e-4)
    behaviour_hidden: int = 256  # NoiseNet width
    behaviour_blocks: int = 3  # NoiseNet residual blocks
    # --- critic ------------------------------------------------------------------------------
    critic: str = ""  # iql | insupport; "" = the method's default (qgpo: insupport, others: iql)
    critic_steps: int = 500_000  # gradient steps (QGPO updates its critic for the first 500k)
    critic_batch: int = 256  # batch size
    critic_lr: float = 3e-4  # Adam learning rate
    critic_hidden: int = 256  # Q/V width
    critic_depth: int = 2  # Q/V hidden layers
    critic_activation: str = "mish"  # Q/V activation: smooth (silu|mish|gelu|tanh), or relu (QGPO's) where Q is
    #   only evaluated: qgpo, mse, and aepo with the sampled expansion (first/second order differentiate Q)
    gamma: float = 0.99  # discount
    tau_target: float = 0.005  # Polyak rate of the target Q
    expectile: float = 0.7  # IQL expectile (AntMaze: 0.9)
    beta_q: float = 1.0  # in-support softmax temperature beta_Q
    # --- support actions (QGPO) --------------------------------------------------------------
    support_k: int = 16  # K actions per state from the behaviour model (AntMaze: 32)
    support_solver: str = "dpm2"  # sampler for the support actions
    support_steps: int = 15  # its network evaluations
    # --- energy ------------------------------------------------------------------------------
    energy_steps: int = 1_000_000  # gradient steps (QGPO: 1M)
    energy_batch: int = 256  # batch size (states; CEP uses K actions per state)
    energy_lr: float = 3e-4  # Adam learning rate
    energy_hidden: int = 256  # EnergyNet width
    energy_depth: int = 3  # EnergyNet hidden layers
    beta: float = 3.0  # inverse temperature of pi ∝ mu exp(beta Q)
    covariance: str = "tweedie"  # AEPO posterior covariance: tweedie | isotropic | gaussian-fit | none
    expansion: str = "sampled"  # AEPO expansion of Q: first | second | sampled (sampled measured better, README)
    n_samples: int = 16  # AEPO sampled expansion: Monte Carlo samples
    energy_baseline: str = "value"  # aepo/mse with IQL: regress on beta (Q - V(s)) ("value") or beta Q ("none");
    #   a per-state shift leaves grad_{a_t} E_t, the guidance, unchanged and spares the net a large offset
    # --- acting and evaluation (may change between evaluations of one run) --------------------
    solver: str = "dpm2"  # action sampler (QGPO: DPM-Solver order 2)
    sample_steps: int = 15  # its network evaluations (QGPO: 15)
    guidance_scales: tuple = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)  # swept at evaluation (bc: 0 only)
    guidance_t_max: float = 1.0  # guide only where t <= this (1.0 = everywhere, the method as written)
    n_candidates: int = 1  # best-of-N: sample N actions per state, keep the one with the largest Q
    compile_sampler: bool = False  # torch.compile the guided sampler step (CUDA: CUDA graphs); first call compiles
    eval_episodes: int = 10  # episodes per guidance scale
    eval_seed: int = 100_000  # episode i of an evaluation resets with seed eval_seed + i (all runs alike)
    eval_envs: int = 10  # environments stepped together (one batched sampler call per step)
    eval_max_episode_steps: Optional[int] = None  # cap on episode length (smoke only; None = the env's)
    # --- logging -----------------------------------------------------------------------------
    log_every: int = 1000  # metrics line every this many steps
    tensorboard: bool = False  # also write TensorBoard scalars to DIR/tb (needs tensorboard)
    compile: bool = False  # torch.compile every network for training (CUDA: CUDA graphs); costs a compile at the
    #   start of each stage and measured no faster on a CPU (README, Performance)

    def critic_kind(self) -> str:
        return self.critic or ("insupport" if self.method == "qgpo" else "iql")

    def needs(self, stage: str) -> bool:
        if stage == "behaviour":
            return True
        if self.method == "bc":
            return False
        if stage == "support":
            return self.method == "qgpo" or self.critic_kind() == "insupport"
        return True


# fields that only change acting/evaluation/logging/speed: a run may be resumed or re-evaluated with other values
EVAL_FIELDS = ("device", "solver", "sample_steps", "guidance_scales", "guidance_t_max", "n_candidates", "compile_sampler",
               "eval_episodes", "eval_seed", "eval_envs", "eval_max_episode_steps", "log_every", "tensorboard", "compile", "preset")
_STAGE_FIELDS = {
    "behaviour": ("dataset", "seed", "behaviour_steps", "behaviour_batch", "behaviour_lr", "behaviour_hidden",
                  "behaviour_blocks"),
    "support": ("support_k", "support_solver", "support_steps"),
    "critic": ("reward_scaling", "critic_steps", "critic_batch", "critic_lr", "critic_hidden", "critic_depth",
               "critic_activation", "gamma", "tau_target", "expectile", "beta_q"),
    "energy": ("method", "energy_steps", "energy_batch", "energy_lr", "energy_hidden", "energy_depth", "beta",
               "covariance", "expansion", "n_samples", "energy_baseline"),
}

PRESETS: dict[str, dict] = {
    # seconds on a CPU: the test suite and the notebook's smoke scale
    "smoke": dict(behaviour_steps=60, behaviour_batch=64, behaviour_lr=1e-3, behaviour_hidden=32, behaviour_blocks=1,
                  critic_steps=60, critic_batch=64, critic_hidden=32, energy_steps=40, energy_batch=32, energy_hidden=32,
                  energy_depth=2, support_k=4, support_solver="dpmpp2m", support_steps=3, solver="dpmpp2m",
                  sample_steps=3, guidance_scales=(0.0, 1.0), eval_episodes=2, eval_envs=2,
                  eval_max_episode_steps=50, log_every=20),
    # what a 2-core CPU session affords on a 200k-transition dataset (README: a CPU benchmark,
    # not QGPO's settings)
    "bench": dict(behaviour_steps=6_000, behaviour_batch=128, behaviour_lr=1e-3, behaviour_hidden=64,
                  behaviour_blocks=2, critic_steps=4_000, critic_batch=128, critic_hidden=64, energy_steps=2_000,
                  energy_batch=128, energy_lr=1e-3, energy_hidden=64, energy_depth=2, support_k=8,
                  support_solver="dpmpp2m", support_steps=4, solver="dpmpp2m", sample_steps=5,
                  guidance_scales=(0.03, 0.1, 0.3, 1.0, 3.0), eval_episodes=5, eval_envs=5, log_every=500),
    # method.md section 7: QGPO's published settings (for a GPU)
    "full": dict(),
}


def make_config(dataset: str, method: str, preset: str = "smoke", **overrides) -> AgentConfig:
    """A resolved :class:`AgentConfig`: the preset's values, then ``overrides``."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    names = {f.name for f in fields(AgentConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"overrides: unknown config field(s) {bad}")
    vals = dict(PRESETS[preset])
    vals.update({k: v for k, v in overrides.items() if v is not None})
    cfg = AgentConfig(dataset=dataset, method=method, preset=preset, **vals)
    if "antmaze" in dataset.lower() and "support_k" not in overrides and preset == "full":
        cfg.support_k = 32
    if "antmaze" in dataset.lower() and "expectile" not in overrides:
        cfg.expectile = 0.9
    check_config(cfg)
    return cfg


def check_config(cfg: AgentConfig) -> AgentConfig:
    """Raise a ValueError naming the first bad field."""
    if cfg.method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {cfg.method!r}")
    if cfg.critic not in ("", "iql", "insupport"):
        raise ValueError(f"critic: expected '', 'iql' or 'insupport', got {cfg.critic!r}")
    for k in ("behaviour_steps", "behaviour_batch", "critic_steps", "critic_batch", "energy_steps", "energy_batch",
              "support_k", "support_steps", "sample_steps", "n_candidates", "eval_episodes", "eval_envs", "log_every"):
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}: expected a positive integer, got {v!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {cfg.seed!r}")
    for k in ("solver", "support_solver"):
        if getattr(cfg, k) not in SOLVERS:
            raise ValueError(f"{k}: expected one of {SOLVERS}, got {getattr(cfg, k)!r}")
    if any((not np.isfinite(w)) or w < 0 for w in cfg.guidance_scales):
        raise ValueError(f"guidance_scales: expected non-negative numbers, got {cfg.guidance_scales}")
    if cfg.method == "bc" and cfg.n_candidates > 1:
        raise ValueError("n_candidates: best-of-N ranks by Q, and the bc method trains no critic")
    from aepo_lite.core import guidance as G
    if cfg.covariance not in G.COVARIANCES:
        raise ValueError(f"covariance: expected one of {G.COVARIANCES}, got {cfg.covariance!r}")
    if cfg.expansion not in G.EXPANSIONS:
        raise ValueError(f"expansion: expected one of {G.EXPANSIONS}, got {cfg.expansion!r}")
    from aepo_lite.core.nets import SMOOTH_ACTIVATIONS
    if cfg.critic_activation not in SMOOTH_ACTIVATIONS + ("relu",):
        raise ValueError(f"critic_activation: expected one of {SMOOTH_ACTIVATIONS + ('relu',)}, got {cfg.critic_activation!r}")
    if cfg.critic_activation == "relu" and cfg.method == "aepo" and cfg.expansion != "sampled":
        raise ValueError(f"critic_activation: a ReLU critic has no curvature; AEPO's {cfg.expansion!r} expansion "
                         "differentiates Q in the action (use a smooth activation, or expansion='sampled')")
    if cfg.compile and cfg.method == "aepo" and cfg.expansion == "second":
        raise ValueError("compile: AEPO's 'second' expansion differentiates the critic twice, which torch.compile "
                         "does not support; use expansion='sampled' or 'first', or compile=False")
    if cfg.energy_baseline not in ("value", "none"):
        raise ValueError(f"energy_baseline: expected 'value' or 'none', got {cfg.energy_baseline!r}")
    if cfg.covariance == "gaussian-fit":
        raise ValueError("covariance: 'gaussian-fit' needs a Gaussian behaviour per state; the RL agent supports "
                         "tweedie | isotropic | none")
    return cfg


def config_from_dict(d: dict) -> AgentConfig:
    names = {f.name for f in fields(AgentConfig)}
    d = {k: v for k, v in d.items() if k in names}
    if "guidance_scales" in d:
        d["guidance_scales"] = tuple(float(w) for w in d["guidance_scales"])
    return AgentConfig(**d)


def stage_fingerprint(cfg: AgentConfig, stage: str) -> str:
    """A hash of every field the stage's result depends on (its own and its inputs')."""
    deps = {"behaviour": ["behaviour"], "support": ["behaviour", "support"],
            "critic": ["behaviour", "critic"] + (["support"] if cfg.needs("support") else []),
            "energy": ["behaviour", "critic", "energy"] + (["support"] if cfg.needs("support") else [])}[stage]
    vals = {k: getattr(cfg, k) for s in deps for k in _STAGE_FIELDS[s]}
    if vals.get("critic_activation") == "mish":  # the default: runs made before the field existed keep their hash
        del vals["critic_activation"]
    if stage in ("critic", "energy"):
        vals["critic_kind"] = cfg.critic_kind()
    return hashlib.sha256(json.dumps(vals, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Agent:
    """The networks of one run and the data normalisation; :meth:`act` is the policy."""

    def __init__(self, cfg: AgentConfig, state_dim: int, action_dim: int, obs_mean: np.ndarray, obs_std: np.ndarray,
                 action_low: np.ndarray, action_high: np.ndarray, device: torch.device):
        self.cfg, self.device = cfg, device
        self.state_dim, self.action_dim = state_dim, action_dim
        self.obs_mean = torch.as_tensor(obs_mean, dtype=torch.float32, device=device)
        self.obs_std = torch.as_tensor(obs_std, dtype=torch.float32, device=device)
        self.action_low, self.action_high = np.asarray(action_low, np.float64), np.asarray(action_high, np.float64)
        self.behaviour = DiffusionModel(NoiseNet(action_dim, state_dim, cfg.behaviour_hidden, cfg.behaviour_blocks),
                                        VPSchedule()).to(device)
        self.critic = None
        self.energy = None
        self._fused = None  # the compiled guided sampler step (compile_sampler)
        if cfg.method != "bc":
            ccfg = CriticConfig(kind=cfg.critic_kind(), gamma=cfg.gamma, tau_target=cfg.tau_target,
                                expectile=cfg.expectile, beta_q=cfg.beta_q, lr=cfg.critic_lr, hidden=cfg.critic_hidden,
                                depth=cfg.critic_depth, activation=cfg.critic_activation)
            self.critic = make_critic(state_dim, action_dim, ccfg).to(device)
            self.energy = EnergyNet(action_dim, state_dim, cfg.energy_hidden, cfg.energy_depth).to(device)

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
        guide = fused = None
        if self.energy is not None and guidance_scale != 0:
            if cfg.compile_sampler:
                if self._fused is None:  # compiled once per agent (and batch size), then reused
                    self._fused = FusedGuidedEps(self.behaviour.eps, self.energy, compile=True)
                fused = self._fused
            else:
                guide = energy_guidance(self.energy)
        t_max = cfg.guidance_t_max if cfg.guidance_t_max < self.behaviour.schedule.t_max else None
        rows = s_rep.shape[0]
        if fused is not None and rows & (rows - 1):
            # a compiled graph per batch size: pad to the next power of two (the last state repeated), so the
            # shrinking batches at the end of an evaluation reuse a few graphs instead of compiling each size
            s_rep = torch.cat([s_rep, s_rep[-1:].expand((1 << (rows - 1).bit_length()) - rows, -1)])
        a = self.behaviour.sample(cond=s_rep, n_steps=cfg.sample_steps, solver=cfg.solver, guidance=guide,
                                  guided_eps=fused, guidance_t_max=t_max, guidance_scale=float(guidance_scale),
                                  generator=generator, clip=1.0)[:rows]
        s_rep = s_rep[:rows]
        if n_candidates > 1:
            with torch.no_grad():
                q = self.critic.q_fn(s_rep, a).reshape(n, n_candidates)
            a = a.reshape(n, n_candidates, -1)[torch.arange(n, device=a.device), q.argmax(1)]
        return a

    def act(self, obs: np.ndarray, guidance_scale: float, *, n_candidates: int = 1,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Raw observations (n, k) -> environment actions (n, d) at guidance scale w."""
        a = self.act_unit(self.normalize(obs), guidance_scale, n_candidates=n_candidates, generator=generator)
        a = a.detach().cpu().double().numpy()
        return self.action_low + (a + 1.0) * 0.5 * (self.action_high - self.action_low)


# ---------------------------------------------------------------------------------- training
class _Logger:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # tensorboard not installed
                warnings.warn(f"tensorboard: not available ({e}); metrics go to metrics.jsonl only")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        append_jsonl(self.path, {"stage": stage, "step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _ckpt_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{stage}.pt"


def _load_ckpt(path: Path, fingerprint: str, device) -> dict:
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint: {path} could not be loaded ({type(e).__name__}: {e}). It was left in place; "
                         "move it away to retrain that stage.") from None
    if not isinstance(ck, dict) or "fingerprint" not in ck or "state" not in ck:
        raise ValueError(f"checkpoint: {path} is not an aepo-lite stage checkpoint")
    if ck["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint: {path} was trained with another config (fingerprint {ck['fingerprint']} != "
                         f"{fingerprint}); use a new --out directory")
    return ck


def _guard_run_dir(run_dir: Path, cfg: AgentConfig) -> None:
    """Refuse a run directory made by another method or a different training config."""
    p = run_dir / "config.json"
    if not p.exists():
        if (run_dir / "checkpoints").exists():
            raise ValueError(f"out: {run_dir} holds checkpoints but no config.json; refusing to train over them")
        return
    try:
        old = read_json(p)
    except Exception as e:
        raise ValueError(f"out: {p} is not readable JSON ({e}); refusing to reuse {run_dir}") from None
    if old.get("method") != cfg.method:
        raise ValueError(f"out: {run_dir} was made by method {old.get('method')!r}, not {cfg.method!r}; "
                         "use another --out directory")
    new = asdict(cfg)
    defaults = {f.name: f.default for f in fields(AgentConfig)}  # a field newer than the run: its default
    old = {k: old.get(k, defaults.get(k)) for k in new}
    diff = sorted(k for k in new if k not in EVAL_FIELDS and json.dumps(old.get(k), default=str)
                  != json.dumps(new[k], default=str))
    if diff:
        raise ValueError(f"out: {run_dir} was made with a different config (fields {diff}: "
                         + ", ".join(f"{k}={old.get(k)!r} there vs {new[k]!r} now" for k in diff[:4])
                         + "); use another --out directory")


def _batches_seed(cfg: AgentConfig, stage: str) -> None:
    torch.manual_seed(cfg.seed * 7919 + STAGES.index(stage))


def _run_stage(name: str, n_steps: int, step_fn, logger: _Logger, log_every: int, progress: bool,
               before_step=None) -> dict:
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    bar = tqdm(range(1, n_steps + 1), desc=name, disable=not progress, mininterval=1.0)
    for i in bar:
        if before_step is not None:
            before_step()
        m = step_fn()  # 0-d tensors: read back (a host synchronisation on GPU) only when logged
        if i % log_every == 0 or i == n_steps:
            m = {k: float(v) for k, v in m.items()}
            bad = sorted(k for k, v in m.items() if not math.isfinite(v))
            if bad:
                raise FloatingPointError(f"{name}: step {i} has non-finite {bad} ({m}); check the learning rate, beta, "
                                         "the critic and the data")
            logger.log(name, i, m)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(m.items())[:3]})
    dt = time.perf_counter() - t0
    return {"steps": n_steps, "seconds": dt, "steps_per_s": n_steps / max(dt, 1e-9)}


def _sample_support(agent: Agent, obs: torch.Tensor, cfg: AgentConfig, progress: bool, chunk: int = 4096) -> torch.Tensor:
    """K behaviour actions for every observation row: (M, k) -> (M, K, d)."""
    from tqdm.auto import tqdm
    K, out = cfg.support_k, []
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 101)
    per = max(1, chunk // K)
    for i in tqdm(range(0, obs.shape[0], per), desc="support", disable=not progress, mininterval=1.0):
        s = obs[i:i + per].repeat_interleave(K, 0)
        a = agent.behaviour.sample(cond=s, n_steps=cfg.support_steps, solver=cfg.support_solver, generator=g, clip=1.0)
        out.append(a.reshape(-1, K, agent.action_dim))
    return torch.cat(out)


def train(cfg: AgentConfig, run_dir, *, data: OfflineData | None = None, progress: bool = True,
          init_behaviour: str | Path | None = None) -> Agent:
    """Train every stage the method needs, skipping stages already checkpointed in ``run_dir``.

    ``init_behaviour``: another run directory to copy finished stages from instead of retraining
    them: its behaviour checkpoint (required, same dataset, seed and behaviour settings), and its
    support and critic checkpoints when their fingerprints match this config (an energy-only change).
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    _guard_run_dir(run_dir, cfg)
    device = resolve_device(cfg.device)
    if data is None:
        data, _ = load_minari(cfg.dataset, reward_scaling=cfg.reward_scaling)
    elif data.dataset_id != cfg.dataset:
        raise ValueError(f"data: holds {data.dataset_id!r}, the config names {cfg.dataset!r}")
    for stage in STAGES:  # fail on a broken checkpoint before any training starts
        p = _ckpt_path(run_dir, stage)
        if cfg.needs(stage) and p.exists():
            _load_ckpt(p, stage_fingerprint(cfg, stage), "cpu")
    atomic_write_json(run_dir / "config.json", asdict(cfg))
    seed_everything(cfg.seed)
    mean, std = data.obs_stats()
    agent = Agent(cfg, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, device)
    T = data.tensors(device)
    N = data.n
    before_step = None
    if cfg.compile:
        # in place: the optimisers, learners and Polyak updates below all run the compiled networks
        nets = [agent.behaviour.net] + ([] if agent.critic is None else [*agent.critic.children(), agent.energy])
        for net in nets:
            compile_module(net, device)
        if compile_mode(device) == "reduce-overhead":
            # each step is one CUDA-graph step: outputs read later in the step are not overwritten
            before_step = torch.compiler.cudagraph_mark_step_begin
    limits = compile_limits() if cfg.compile else contextlib.nullcontext()
    with limits:
        return _train_stages(cfg, run_dir, agent, T, N, device, init_behaviour, progress, before_step)


def _train_stages(cfg, run_dir, agent, T, N, device, init_behaviour, progress, before_step) -> Agent:
    logger = _Logger(run_dir, cfg.tensorboard)
    stats_path = run_dir / "train_stats.json"
    stats = read_json(stats_path) if stats_path.exists() else {}
    if init_behaviour is not None:
        for stage in ("support", "critic"):
            src, dst = _ckpt_path(Path(init_behaviour), stage), _ckpt_path(run_dir, stage)
            if cfg.needs(stage) and src.exists() and not dst.exists():
                try:
                    ck = _load_ckpt(src, stage_fingerprint(cfg, stage), "cpu")
                except ValueError:
                    continue  # another config: train it here
                atomic_torch_save(dst, ck)
                stats[stage] = dict(ck.get("stats", {}), copied_from=str(init_behaviour))

    def idx(batch):
        return torch.randint(0, N, (batch,), device=device)

    # 1. behaviour -----------------------------------------------------------------------------
    p = _ckpt_path(run_dir, "behaviour")
    fp = stage_fingerprint(cfg, "behaviour")
    if not p.exists() and init_behaviour is not None:
        src = _ckpt_path(Path(init_behaviour), "behaviour")
        if not src.exists():
            raise ValueError(f"init_behaviour: {src} does not exist")
        ck = _load_ckpt(src, fp, "cpu")
        atomic_torch_save(p, ck)
        stats["behaviour"] = dict(ck.get("stats", {}), copied_from=str(init_behaviour))
    if p.exists():
        agent.behaviour.load_state_dict(_load_ckpt(p, fp, device)["state"])
    else:
        _batches_seed(cfg, "behaviour")
        opt = adam(agent.behaviour.parameters(), cfg.behaviour_lr)

        def step():
            i = idx(cfg.behaviour_batch)
            loss = agent.behaviour.loss(T["a"][i], T["obs"][T["idx"][i]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        st = _run_stage("behaviour", cfg.behaviour_steps, step, logger, cfg.log_every, progress, before_step)
        atomic_torch_save(p, {"stage": "behaviour", "fingerprint": fp, "state": agent.behaviour.state_dict(), "stats": st})
        stats["behaviour"] = st
    atomic_write_json(stats_path, stats)
    agent.behaviour.requires_grad_(False).eval()
    if cfg.method == "bc":
        logger.close()
        return agent

    # 2. support actions -----------------------------------------------------------------------
    support = None
    if cfg.needs("support"):
        p, fp = _ckpt_path(run_dir, "support"), stage_fingerprint(cfg, "support")
        if p.exists():
            support = _load_ckpt(p, fp, device)["state"]["support"]
        else:
            t0 = time.perf_counter()
            support = _sample_support(agent, T["obs"], cfg, progress)
            dt = time.perf_counter() - t0
            st = {"rows": int(support.shape[0]), "k": cfg.support_k, "seconds": dt,
                  "actions_per_s": support.shape[0] * cfg.support_k / max(dt, 1e-9)}
            atomic_torch_save(p, {"stage": "support", "fingerprint": fp, "state": {"support": support.cpu()}, "stats": st})
            stats["support"] = st
            atomic_write_json(stats_path, stats)
        support = support.to(device)

    # 3. critic --------------------------------------------------------------------------------
    p, fp = _ckpt_path(run_dir, "critic"), stage_fingerprint(cfg, "critic")
    critic = agent.critic
    if p.exists():
        critic.load_state_dict(_load_ckpt(p, fp, device)["state"])
    else:
        _batches_seed(cfg, "critic")

        def step():
            i = idx(cfg.critic_batch)
            b = {"s": T["obs"][T["idx"][i]], "a": T["a"][i], "r": T["r"][i], "s2": T["obs"][T["next_idx"][i]],
                 "done": T["done"][i]}
            if support is not None:
                b["support2"] = support[T["next_idx"][i]]
            return critic.step(b)

        st = _run_stage("critic", cfg.critic_steps, step, logger, cfg.log_every, progress, before_step)
        atomic_torch_save(p, {"stage": "critic", "fingerprint": fp, "state": critic.state_dict(), "stats": st})
        stats["critic"] = st
        atomic_write_json(stats_path, stats)
    critic.requires_grad_(False).eval()

    # 4. energy --------------------------------------------------------------------------------
    p, fp = _ckpt_path(run_dir, "energy"), stage_fingerprint(cfg, "energy")
    if p.exists():
        agent.energy.load_state_dict(_load_ckpt(p, fp, device)["state"])
    else:
        _batches_seed(cfg, "energy")
        method = cfg.method
        ecfg = EnergyConfig(beta=cfg.beta, covariance=cfg.covariance, expansion=cfg.expansion,
                            n_samples=cfg.n_samples, clip=1.0, lr=cfg.energy_lr)
        eps_table = None
        if method == "aepo" and cfg.covariance == "isotropic":
            i = idx(min(N, 8192))
            eps_table = EpsNormTable.estimate(agent.behaviour.eps, T["a"][i], T["obs"][T["idx"][i]], agent.behaviour.schedule)
        q_fn = critic.q_fn
        if cfg.energy_baseline == "value" and hasattr(critic, "v"):
            q_fn = lambda s, a: critic.q_fn(s, a) - critic.v(s)  # noqa: E731  (a per-state shift)
        learner = EnergyLearner(agent.energy, ecfg, schedule=agent.behaviour.schedule, eps_fn=agent.behaviour.eps,
                                q_fn=q_fn, eps_table=eps_table, method=method)

        def step():
            i = idx(cfg.energy_batch)
            s = T["obs"][T["idx"][i]]
            b = {"s": s, "a": T["a"][i]}
            if method == "qgpo":
                sup = support[T["idx"][i]]
                B, K, d = sup.shape
                with torch.no_grad():
                    b["support_q"] = critic.q_fn(s.repeat_interleave(K, 0), sup.reshape(B * K, d)).reshape(B, K)
                b["support"] = sup
            return learner.step(b)

        st = _run_stage("energy", cfg.energy_steps, step, logger, cfg.log_every, progress, before_step)
        atomic_torch_save(p, {"stage": "energy", "fingerprint": fp, "state": agent.energy.state_dict(), "stats": st})
        stats["energy"] = st
        atomic_write_json(stats_path, stats)
    agent.energy.requires_grad_(False).eval()
    logger.close()
    return agent


def load_run(run_dir, *, device: str | None = None, data: OfflineData | None = None,
             overrides: dict | None = None) -> tuple[Agent, AgentConfig, OfflineData]:
    """Rebuild a trained agent from ``run_dir`` (every stage its method needs must be there)."""
    run_dir = Path(run_dir)
    p = run_dir / "config.json"
    if not p.exists():
        raise ValueError(f"run: {run_dir} has no config.json (not an aepo-lite run directory)")
    cfg = config_from_dict(read_json(p))
    for k, v in (overrides or {}).items():
        if k not in EVAL_FIELDS:
            raise ValueError(f"overrides: {k} is a training setting and cannot change at evaluation")
        if v is not None:
            setattr(cfg, k, tuple(v) if k == "guidance_scales" else v)
    if device is not None:
        cfg.device = device
    check_config(cfg)
    if data is None:
        data, _ = load_minari(cfg.dataset, reward_scaling=cfg.reward_scaling)
    mean, std = data.obs_stats()
    dev = resolve_device(cfg.device)
    agent = Agent(cfg, data.state_dim, data.action_dim, mean, std, data.action_low, data.action_high, dev)
    for stage, mod in (("behaviour", agent.behaviour), ("critic", agent.critic), ("energy", agent.energy)):
        if not cfg.needs(stage):
            continue
        cp = _ckpt_path(run_dir, stage)
        if not cp.exists():
            raise ValueError(f"run: {run_dir} has no {stage} checkpoint; train it first (aepo-lite train --out {run_dir})")
        mod.load_state_dict(_load_ckpt(cp, stage_fingerprint(cfg, stage), dev)["state"])
        mod.requires_grad_(False).eval()
    return agent, cfg, data


def _eval_env_factory(cfg: AgentConfig, minari_ds):
    import gymnasium as gym
    kw = {} if cfg.eval_max_episode_steps is None else {"max_episode_steps": cfg.eval_max_episode_steps}

    def make():
        env = minari_ds.recover_environment(eval_env=True, **kw)
        if isinstance(env.observation_space, gym.spaces.Dict):
            space = env.observation_space
            k = gym.spaces.flatdim(space)
            env = gym.wrappers.TransformObservation(env, lambda o: flatten_observation(space, o),
                                                    gym.spaces.Box(-np.inf, np.inf, (k,), np.float64))
        return env

    return make


def evaluate_run(run_dir, *, guidance_scales=None, episodes: int | None = None, device: str | None = None,
                 n_candidates: int | None = None, guidance_t_max: float | None = None,
                 compile_sampler: bool | None = None, progress: bool = True) -> dict:
    """Evaluate a trained run at each guidance scale and merge into ``DIR/results.json``.

    Returns the results dict: per scale ``return_mean``, ``return_std``, ``normalized_score_mean``
    (or None), ``normalized_score_std``, ``episodes``, plus ``actions_per_s``.
    """
    from aepo_lite.rl.data import open_minari
    run_dir = Path(run_dir)
    over = {"guidance_scales": guidance_scales, "eval_episodes": episodes, "n_candidates": n_candidates,
            "guidance_t_max": guidance_t_max, "compile_sampler": compile_sampler}
    agent, cfg, data = load_run(run_dir, device=device, overrides=over)
    scales = (0.0,) if cfg.method == "bc" else tuple(float(w) for w in cfg.guidance_scales)
    if cfg.method == "bc" and guidance_scales and any(float(w) != 0 for w in guidance_scales):
        raise ValueError("guidance_scale: the bc method has no energy; only 0 is meaningful")
    ds = open_minari(cfg.dataset)
    lo, hi, source = reference_scores(cfg.dataset, dict(ds.storage.metadata))
    make_env = _eval_env_factory(cfg, ds)
    res_path = run_dir / "results.json"
    results = read_json(res_path) if res_path.exists() else {}
    per = results.get("results", {})
    if per and float(results.get("guidance_t_max", 1.0)) != float(cfg.guidance_t_max):
        raise ValueError(f"guidance_t_max: {res_path} holds results at guidance_t_max="
                         f"{results.get('guidance_t_max', 1.0)}; evaluate a copy of the run to keep both")
    for w in scales:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
        pol = lambda obs, w=w, g=g: agent.act(obs, w, n_candidates=cfg.n_candidates, generator=g)  # noqa: E731
        eps, timing = run_episodes(make_env, pol, cfg.eval_episodes, seed=cfg.eval_seed, n_envs=cfg.eval_envs,
                                   progress=progress, desc=f"eval w={w:g}")
        row = summarize_returns([e.ret for e in eps], lo, hi)
        row.update({"actions_per_s": timing["actions"] / max(timing["policy_seconds"], 1e-9),
                    "n_candidates": cfg.n_candidates, "eval_seed": cfg.eval_seed,
                    "sample_steps": cfg.sample_steps, "solver": cfg.solver})
        per[f"{w:g}"] = row
        results.update({"dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "preset": cfg.preset,
                        "transitions": data.n, "ref_min_score": lo, "ref_max_score": hi, "ref_source": source,
                        "dataset_mean_return": float(np.mean(data.episode_returns)), "results": per,
                        "guidance_t_max": cfg.guidance_t_max})
        atomic_write_json(res_path, results)
    return results
