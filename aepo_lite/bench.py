"""The speed bench: how fast each training stage and sampler of the library runs here, and how long
the ``full`` preset (QGPO's published settings, docs/derivation.md section 7) would take at that rate.

Offline-RL stages (random data of Hopper's shape, resident on the device; nothing read from disk):

  behaviour          ``BehaviourLearner.step`` (denoising score matching)              steps/s
  critic_<kind>      the critic learner's ``step``: ``iql`` or ``insupport``         steps/s
  energy_<method>    ``EnergyLearner.step``: aepo | mse | qgpo                        steps/s
  support_sampling   K unguided behaviour actions per state, one support pass        samples/s
                     (one chunk of 4096 actions; 16 chunks on CUDA, as the run samples them)
  guided_b<B>        ``Agent.act_unit`` (the guided sampler acting runs), batch B     samples/s

With ``toy`` naming a toy task, the toy learners instead, at the toy preset's sizes: behaviour,
``critic_regression`` (``RegressionLearner``; in the extrapolated pipelines only when the preset's
``critic.kind`` is ``regression``, which every method's Q then comes from, else from e(x)),
``energy_<method>``, and unguided / guided points/s. The toy energy is timed without the toy's
c_in(t) input scaling (one multiply per call; it lives in ``aepo_lite.toy.pipeline``).

The networks are the agent's own (:class:`aepo_lite.rl.agent.Agent`, one per method, sharing one
behaviour model and one critic per kind), every step is the library learner's ``step`` on a batch
laid out as the agent's stages lay it out, and after its stage a network is frozen as the agent
freezes it. Nothing here writes a training step. Sizes come from the config parts of
:class:`BenchConfig`, whose defaults are :class:`~aepo_lite.config.TrainConfig`'s (the full preset).

A stage is timed as loops of calls with one device synchronisation at each loop's end, so a
training step's rate is what a training loop with no host synchronisation gets. ``compile``
compiles every network the training stages run, in place (:func:`~aepo_lite.device.compile_module`;
CUDA graphs on CUDA, each step then one CUDA-graph step, as ``train --compile`` runs);
``sampling.compile`` makes the guided stages use the agent's compiled sampler step. Compilation
happens in each stage's untimed warm-up calls (``warmup_seconds``). ``capture`` instead replays each training
step, its batch draw included, as one CUDA graph (:class:`~aepo_lite.training.captured.CapturedStep`; captured in
the first call, which the warm-up times; on the CPU the same steps run eagerly), and the guided stages' sampling
calls too (``sampling.capture``: :class:`~aepo_lite.core.diffusion.CapturedSampler`, one graph per batch size).

``run_bench(cfg) -> dict`` is the API; ``aepo-lite bench`` prints it and writes it as JSON + Markdown.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from aepo_lite.config import (PRESETS, BehaviourConfig, CriticConfig, EnergyConfig, SamplingConfig, SupportConfig,
                              ToyConfig, TrainConfig, apply_overrides, config_diff, preset_config, to_dict)
from aepo_lite.core.aepo import ENERGY_METHODS, EnergyLearner, EpsNormTable
from aepo_lite.core.diffusion import DiffusionModel, energy_guidance
from aepo_lite.core.nets import MLP, EnergyNet, NoiseNet
from aepo_lite.device import compile_limits, compile_mode, compile_module, resolve_device
from aepo_lite.training import BehaviourLearner, RegressionLearner

__all__ = ["BenchConfig", "quick_config", "tiny_config", "check_bench_config", "train_config", "run_bench",
           "time_call", "extrapolate", "predict", "environment", "to_markdown", "RLStages", "ToyStages",
           "SUPPORT_CHUNK"]

SUPPORT_CHUNK = 4096  # actions per support-sampling call: rl.agent.SupportSampler's chunk


def _full() -> TrainConfig:
    return preset_config(TrainConfig, "full")


@dataclass
class BenchConfig:
    """What ``aepo-lite bench`` times. The config parts' defaults are the full preset's (TrainConfig's)."""

    device: str = "auto"  # auto | cpu | cuda (or cuda:N)
    state_dim: int = 11  # state size of the random data (Hopper: 11)
    action_dim: int = 3  # action size of the random data (Hopper: 3)
    methods: tuple[str, ...] = ("aepo", "mse", "qgpo")  # energy learners timed (aepo | mse | qgpo)
    sample_batches: tuple[int, ...] = (1, 10, 256, 4096)  # batch sizes of the guided-sampling stages
    guidance_scale: float = 3.0  # w of the guided stages (the rate does not depend on w > 0)
    dataset_size: int = 1_000_000  # transitions of the extrapolated run (D4RL locomotion medium: 1M)
    episode_len: int = 1000  # environment steps per evaluation episode in the extrapolation (an upper bound)
    warmup: int = 3  # untimed calls before timing each stage (compiled: at least 3)
    min_time: float = 1.0  # seconds one timed loop should last (sets the number of calls in it)
    repeats: int = 3  # timed loops per stage; the median is reported
    compile: bool = False  # torch.compile every network the training stages run (CUDA graphs on CUDA)
    capture: bool = False  # each training step (batch draw included) and sampling call one CUDA graph; eager on CPU
    tf32: bool = False  # CUDA only: allow TF32 matmuls
    threads: Optional[int] = None  # torch CPU threads; None = torch's default (1 is steadier on a shared machine)
    seed: int = 0  # seeds the random data and the networks
    toy: str = ""  # time this toy task (e.g. 8gaussians) at the toy preset's sizes instead of the RL stages
    toy_preset: str = "full"  # the toy preset whose sizes are timed and extrapolated (smoke | full)
    behaviour: BehaviourConfig = field(default_factory=lambda: _full().behaviour)
    critic: CriticConfig = field(default_factory=lambda: _full().critic)
    support: SupportConfig = field(default_factory=lambda: _full().support)
    energy: EnergyConfig = field(default_factory=lambda: _full().energy)
    sampling: SamplingConfig = field(default_factory=lambda: _full().sampling)


def quick_config(**overrides) -> BenchConfig:
    """The same sizes, one short loop per stage (``aepo-lite bench --quick``); ``overrides`` nested like a config."""
    return apply_overrides(BenchConfig(warmup=1, min_time=0.2, repeats=1), overrides)


def tiny_config(**overrides) -> BenchConfig:
    """Tiny networks and batches on the CPU: checks that the bench runs, measures nothing useful (tests)."""
    base = {"device": "cpu", "threads": 1, "warmup": 1, "min_time": 0.01, "repeats": 1, "sample_batches": (1, 8),
            "behaviour": dict(batch=64, hidden=16, blocks=1), "critic": dict(batch=16, hidden=16),
            "support": dict(k=4, steps=3), "energy": dict(batch=16, hidden=16, depth=2, n_samples=4),
            "sampling": dict(steps=3)}
    return apply_overrides(apply_overrides(BenchConfig(), base), overrides)


def train_config(cfg: BenchConfig, method: str) -> TrainConfig:
    """The offline-RL run config whose networks and learners the bench times for ``method``."""
    return TrainConfig(method=method, seed=cfg.seed, device=cfg.device, compile=cfg.compile, behaviour=cfg.behaviour,
                       critic=cfg.critic, support=cfg.support, energy=cfg.energy, sampling=cfg.sampling)


def _positive(name: str, v, kind=int) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else int)
    if not (ok and math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive {'number' if kind is float else 'integer'}, got {v!r}")


def check_bench_config(cfg: BenchConfig) -> BenchConfig:
    """Raise a ValueError naming the first bad field (dotted, as on the command line)."""
    from aepo_lite.rl.agent import check_config
    for name in ("state_dim", "action_dim", "dataset_size", "episode_len", "repeats"):
        _positive(name, getattr(cfg, name))
    _positive("min_time", cfg.min_time, float)
    if isinstance(cfg.warmup, bool) or not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ValueError(f"warmup: expected an integer >= 0, got {cfg.warmup!r}")
    if cfg.threads is not None:
        _positive("threads", cfg.threads)
    if not cfg.methods or any(m not in ENERGY_METHODS for m in cfg.methods):
        raise ValueError(f"methods: expected one or more of {ENERGY_METHODS}, got {cfg.methods!r}")
    if not cfg.sample_batches:
        raise ValueError("sample_batches: expected one or more batch sizes, got none")
    for b in cfg.sample_batches:
        _positive("sample_batches", b)
    if not (isinstance(cfg.guidance_scale, (int, float)) and math.isfinite(cfg.guidance_scale)
            and cfg.guidance_scale >= 0):
        raise ValueError(f"guidance_scale: expected a finite number >= 0, got {cfg.guidance_scale!r}")
    resolve_device(cfg.device)
    _check_capture(cfg)
    if cfg.toy:
        from aepo_lite.toy.tasks import task_names
        if cfg.toy not in task_names():
            raise ValueError(f"toy: unknown toy task {cfg.toy!r}; known tasks: {', '.join(task_names())}")
        if cfg.toy_preset not in PRESETS["toy"]:
            raise ValueError(f"toy_preset: expected one of {tuple(PRESETS['toy'])}, got {cfg.toy_preset!r}")
    else:
        for m in cfg.methods:
            check_config(train_config(cfg, m))
    return cfg


def _check_capture(cfg: BenchConfig) -> None:
    """``capture`` excludes ``compile`` (a learning-rate schedule is stepped between replays)."""
    if cfg.capture and cfg.compile:
        raise ValueError("capture: --capture and --compile both make CUDA graphs of the training step; choose one")


# ----------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    """Device and library versions, for the JSON and the Markdown table."""
    from aepo_lite import __version__
    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "aepo_lite": __version__, "platform": platform.platform(),
           "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_1min": _loadavg()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], *, device: torch.device, warmup: int, min_time: float,
              repeats: int, info: dict | None = None) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` timed loops, each ~``min_time`` long, synchronised at the ends only.

    ``info``, when given, gets ``warmup_seconds``: the untimed warm-up calls (compilation, when compiled)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    sync()
    if info is not None:
        info["warmup_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    n = max(1, int(min_time / max(one, 1e-9)))
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / n)
    return out


@dataclass
class Timed:
    """One stage to time: ``build()`` makes the call (when its turn comes, after the stages before it)."""

    name: str  # behaviour, critic_iql, energy_aepo, guided_b256, ...
    unit: str  # steps/s (training) or samples/s (sampling)
    batch: int  # rows per call
    build: Callable[[], Callable[[], object]]
    trains: nn.Module | None = None  # the network the stage trains: frozen after it, as the agent does


def _noop() -> None:
    return None


class _Stages:
    """Shared by the RL and toy stages: resident data, batch indices, one call per training step."""

    def __init__(self, cfg: BenchConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        cuda_graphs = cfg.compile and compile_mode(device) == "reduce-overhead"
        # CUDA-graph trees: each training step is one CUDA-graph step (what `train --compile` marks; pytorch#160281)
        self.step_begin = torch.compiler.cudagraph_mark_step_begin if cuda_graphs else _noop
        self.n = 0

    def _draw(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, self.n, shape, device=self.device)

    def _steps(self, learner, batch_of: Callable[[], dict]) -> Callable[[], None]:
        """The call a training stage times: the batch source, then the learner's own ``step`` (with ``capture``,
        both in one replayed CUDA graph: :class:`~aepo_lite.training.captured.CapturedStep`)."""
        if self.cfg.capture:
            from aepo_lite.training.captured import CapturedStep
            return CapturedStep(learner, device=self.device, source=batch_of, fallback=True).run  # uncapturable: eager
        step_begin = self.step_begin

        def call():
            step_begin()
            learner.step(batch_of())
        return call

    def _sampler(self, sample: Callable[[], torch.Tensor]) -> Callable[[], Callable[[], torch.Tensor]]:
        """A sampling stage's ``build``: compiled with CUDA graphs, each sampler call is one CUDA-graph step, so
        an output of the compiled behaviour net stays valid while the energy's gradient runs (pytorch#160281)."""
        step_begin = self.step_begin

        def call():
            step_begin()
            return sample()
        return lambda: call

    def _compile(self, nets) -> None:
        if self.cfg.compile:
            for net in nets:
                compile_module(net, self.device)


class RLStages(_Stages):
    """The offline-RL agent's networks and a :class:`Timed` per stage (see the module docstring)."""

    def __init__(self, cfg: BenchConfig, device: torch.device):
        from aepo_lite.rl.agent import Agent, critic_kind
        super().__init__(cfg, device)
        torch.manual_seed(cfg.seed)
        k, d = cfg.state_dim, cfg.action_dim
        self.agents, self.critics = {}, {}
        for m in cfg.methods:
            tc = train_config(cfg, m)
            if cfg.capture:  # --capture: the guided stages' sampling calls are captured too
                tc = replace(tc, sampling=replace(tc.sampling, capture=True))
            agent = Agent(tc, k, d, np.zeros(k), np.ones(k), -np.ones(d), np.ones(d), device)
            first = next(iter(self.agents.values()), agent)
            agent.behaviour = first.behaviour  # one behaviour model for every method (as rl-grid's runs share it)
            agent.critic = self.critics.setdefault(critic_kind(tc), agent.critic)  # one critic per kind
            self.agents[m] = agent
        self.behaviour = first.behaviour
        self._compile([self.behaviour.net] + [n for c in self.critics.values() for n in c.children()]
                      + [a.energy for a in self.agents.values()])
        self.n = 16 * max(cfg.behaviour.batch, cfg.critic.batch, cfg.energy.batch)
        K = cfg.support.k
        g = torch.Generator().manual_seed(cfg.seed)
        data = {"s": torch.randn(self.n, k, generator=g), "a": torch.rand(self.n, d, generator=g) * 2 - 1,
                "r": torch.randn(self.n, generator=g), "s2": torch.randn(self.n, k, generator=g),
                "done": (torch.rand(self.n, generator=g) < 0.01).float(),
                "support": torch.rand(self.n, K, d, generator=g) * 2 - 1}
        self.data = {key: v.to(device) for key, v in data.items()}

    def plan(self) -> list[Timed]:
        cfg, D = self.cfg, self.data
        b = cfg.behaviour
        out = [Timed("behaviour", "steps/s", b.batch, self._behaviour, self.behaviour)]
        out += [Timed(f"critic_{kind}", "steps/s", cfg.critic.batch, lambda c=c: self._critic(c), c)
                for kind, c in self.critics.items()]
        out += [Timed(f"energy_{m}", "steps/s", cfg.energy.batch, lambda m=m: self._energy(m), a.energy)
                for m, a in self.agents.items()]
        from aepo_lite.rl.agent import SUPPORT_PER_CALL_CUDA
        per = max(1, SUPPORT_CHUNK // cfg.support.k) * (SUPPORT_PER_CALL_CUDA if self.device.type == "cuda" else 1)
        s_support = D["s"][:per].repeat_interleave(cfg.support.k, 0)
        support = self._sampler(lambda: self.behaviour.sample(cond=s_support, n_steps=cfg.support.steps,
                                                              solver=cfg.support.solver, clip=1.0))
        out.append(Timed("support_sampling", "samples/s", s_support.shape[0], support))
        agent = next(iter(self.agents.values()))
        for B in cfg.sample_batches:
            s = torch.randn(B, cfg.state_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
            out.append(Timed(f"guided_b{B}", "samples/s", B,
                             self._sampler(lambda s=s: agent.act_unit(s, cfg.guidance_scale))))
        return out

    def _behaviour(self):
        b, D = self.cfg.behaviour, self.data
        learner = BehaviourLearner(self.behaviour, b.lr, decay_steps=b.steps if b.lr_decay else None)

        def batch():
            i = self._draw(b.batch)
            return {"a": D["a"][i], "s": D["s"][i]}
        return self._steps(learner, batch)

    def _critic(self, critic):
        B, D, keys = self.cfg.critic.batch, self.data, ("s", "a", "r", "s2", "done")
        insupport = not hasattr(critic, "v")

        def batch():
            i = self._draw(B)
            out = {key: D[key][i] for key in keys}
            if insupport:
                out["support2"] = D["support"][i]  # K behaviour actions at s' (rl.agent's critic batch)
            return out
        return self._steps(critic, batch)

    def _energy(self, method: str):
        """``EnergyLearner`` as rl.agent's energy stage builds it; qgpo's batch (and AEPO's, with an in-support
        posterior) scores its support with the critic."""
        cfg, D, agent = self.cfg, self.data, self.agents[method]
        critic, e = agent.critic, cfg.energy
        q_fn = critic.q_fn
        if e.baseline == "value" and hasattr(critic, "v"):
            q_fn = lambda s, a: critic.q_fn(s, a) - critic.v(s)  # noqa: E731  rl.agent's per-state shift
        eps_table = None
        if method == "aepo" and e.covariance == "isotropic":
            rows = torch.arange(min(self.n, 8192), device=self.device)
            eps_table = EpsNormTable.estimate(self.behaviour.eps, D["a"][rows], D["s"][rows], self.behaviour.schedule)
        learner = EnergyLearner(agent.energy, e, schedule=self.behaviour.schedule, eps_fn=self.behaviour.eps,
                                q_fn=q_fn, eps_table=eps_table, method=method,
                                decay_steps=e.steps if e.lr_decay else None)

        def batch():
            i = self._draw(e.batch)
            out = {"s": D["s"][i], "a": D["a"][i]}
            if method == "qgpo" or (method == "aepo" and e.posterior != "gaussian"):
                sup = D["support"][i]
                B, K, d = sup.shape
                with torch.no_grad():
                    q = critic.q_fn(out["s"].repeat_interleave(K, 0), sup.reshape(B * K, d))
                out["support_q"] = q.reshape(B, K)
                out["support"] = sup
            return out
        return self._steps(learner, batch)

    def extrapolate(self, stages: dict) -> dict:
        """The full preset's time at the measured rates (:func:`extrapolate`)."""
        from aepo_lite.rl.agent import critic_kind, needs
        full, cfg = _full(), self.cfg
        work = {"behaviour": full.behaviour.steps, "support_sampling": cfg.dataset_size * full.support.k}
        work.update({n: full.critic.steps for n in stages if n.startswith("critic_")})
        work.update({n: full.energy.steps for n in stages if n.startswith("energy_")})
        pipelines = {}
        for m in cfg.methods:
            tc = replace(full, method=m, critic=replace(full.critic, kind=cfg.critic.kind))
            names = ["behaviour"] + (["support_sampling"] if needs(tc, "support") else [])
            pipelines[m] = names + [f"critic_{critic_kind(tc)}", f"energy_{m}"]
        ev = full.eval
        rows = ev.envs * ev.candidates  # states per sampler call: the environments stepped together
        calls = len(full.sampling.guidance_scales) * math.ceil(ev.episodes / ev.envs) * cfg.episode_len
        note = (f"{len(full.sampling.guidance_scales)} scales x {math.ceil(ev.episodes / ev.envs)} rounds of {ev.envs} "
                f"environments x {cfg.episode_len} steps ({ev.episodes} episodes per scale), sampler only")
        parts = ("behaviour", "critic", "support", "energy", "sampling")
        differs = config_diff({p: to_dict(getattr(full, p)) for p in parts},
                              {p: to_dict(getattr(cfg, p)) for p in parts},
                              ignore=("critic.kind", "sampling.compile", "sampling.capture"))
        return extrapolate(stages, "full", work, pipelines, evaluation=(calls, rows, note), differs=differs)


class ToyStages(_Stages):
    """A toy task's networks at the toy preset's sizes (built with aepo_lite.core / training, as the toy runs)."""

    def __init__(self, cfg: BenchConfig, device: torch.device):
        from aepo_lite.toy.tasks import get_task
        super().__init__(cfg, device)
        self.tc = tc = preset_config(ToyConfig, cfg.toy_preset, task=cfg.toy)
        self.task = get_task(cfg.toy)
        torch.manual_seed(cfg.seed)
        self.x = self.task.sample(tc.n_data, seed=tc.data_seed, device=device)
        self.e, self.n = self.task.reward(self.x), self.x.shape[0]
        # the toy's matched reward access: every method reads the fitted critic (critic.kind "regression") or e(x)
        self.fitted = tc.critic.kind == "regression"
        dim = self.x.shape[1]
        b, c, e = tc.behaviour, tc.critic, tc.energy
        self.behaviour = DiffusionModel(NoiseNet(dim, 0, b.hidden, b.blocks)).to(device)
        self.critic = MLP(dim, 1, c.hidden, c.depth, c.activation).to(device)
        self.energies = {m: EnergyNet(dim, 0, e.hidden, e.depth).to(device) for m in cfg.methods}
        self._compile([self.behaviour.net, self.critic, *self.energies.values()])

    def plan(self) -> list[Timed]:
        tc, x, e = self.tc, self.x, self.e
        b, c = tc.behaviour, tc.critic
        decay = lambda part: part.steps if part.lr_decay else None  # noqa: E731
        out = [Timed("behaviour", "steps/s", b.batch, lambda: self._steps(
            BehaviourLearner(self.behaviour, b.lr, decay_steps=decay(b)),
            lambda: {"a": x[self._draw(b.batch)], "s": None}), self.behaviour)]
        def critic_batch():  # timed whatever the preset's critic.kind: the fitted critic's rate is worth knowing
            i = self._draw(c.batch)
            return {"x": x[i], "y": e[i]}
        out.append(Timed("critic_regression", "steps/s", c.batch, lambda: self._steps(
            RegressionLearner(self.critic, c.lr, decay_steps=decay(c)), critic_batch), self.critic))
        out += [Timed(f"energy_{m}", "steps/s", tc.energy.batch, lambda m=m: self._energy(m), net)
                for m, net in self.energies.items()]
        n, s = tc.eval.n_samples, tc.sampling
        guide = energy_guidance(next(iter(self.energies.values())))
        for name, kw in (("unguided", {}), ("guided", {"guidance": guide, "guidance_scale": s.guidance_scales[0]})):
            out.append(Timed(f"{name}_b{n}", "samples/s", n, self._sampler(lambda kw=kw: self.behaviour.sample(
                n, n_steps=s.steps, solver=s.solver, **kw))))
        return out

    def _energy(self, method: str):
        tc, x, e = self.tc, self.x, self.e
        ecfg = tc.energy
        q_fn = (lambda s, a: self.critic(a).squeeze(-1)) if self.fitted else (lambda s, a: self.task.reward(a))
        eps_table = fit_cov = None
        if method == "aepo" and ecfg.covariance == "isotropic":
            eps_table = EpsNormTable.estimate(self.behaviour.eps, x[:4096], None, self.behaviour.schedule)
        if method == "aepo" and ecfg.covariance == "gaussian-fit":
            fit_cov = torch.cov(x.T)
        learner = EnergyLearner(self.energies[method], ecfg, schedule=self.behaviour.schedule,
                                eps_fn=self.behaviour.eps, q_fn=q_fn, eps_table=eps_table, fit_cov=fit_cov,
                                method=method, decay_steps=ecfg.steps if ecfg.lr_decay else None)
        B, K = ecfg.batch, tc.support.k
        if method == "qgpo" and self.fitted:
            with torch.no_grad():
                e = self.critic(x).squeeze(-1)  # Q at every data point, after the critic stage

        def batch():
            if method == "qgpo":  # K data points per group and Q at them
                i = self._draw(B, K)
                return {"s": None, "support": x[i], "support_q": e[i]}
            return {"s": None, "a": x[self._draw(B)]}
        return self._steps(learner, batch)

    def extrapolate(self, stages: dict) -> dict:
        """The toy preset's time at the measured rates."""
        tc = self.tc
        work = {"behaviour": tc.behaviour.steps, "critic_regression": tc.critic.steps}
        work.update({f"energy_{m}": tc.energy.steps for m in self.energies})
        pipelines = {m: ["behaviour"] + (["critic_regression"] if self.fitted else []) + [f"energy_{m}"]
                     for m in self.energies}
        scales = tc.sampling.guidance_scales
        note = f"{len(scales)} guidance scale(s) x {tc.eval.n_samples} guided samples, sampler only"
        return extrapolate(stages, f"toy {self.cfg.toy_preset}", work, pipelines,
                           evaluation=(len(scales), tc.eval.n_samples, note))


def extrapolate(stages: dict, preset: str, work: dict, pipelines: dict, *, evaluation: tuple | None = None,
                differs: list | None = None) -> dict:
    """Seconds a preset takes at the measured rates: per stage (``work`` steps or samples / rate), per
    method's pipeline (the sum of its stages), and its evaluation (``(calls, rows, note)``: sampler
    calls of ``rows`` states, timed at the guided stage whose batch is nearest ``rows``)."""
    seconds = {name: w / stages[name]["rate"] for name, w in work.items() if name in stages}
    piped = {m: {"stages": list(names), "seconds": sum(seconds[n] for n in names),
                 "hours": sum(seconds[n] for n in names) / 3600}
             for m, names in pipelines.items() if all(n in seconds for n in names)}
    ev = None
    guided = {s["batch"]: name for name, s in stages.items() if name.startswith("guided_b")}
    if evaluation is not None and guided:
        calls, rows, note = evaluation
        b = min(guided, key=lambda size: (abs(math.log(size / rows)), size))
        ev = {"sampler_calls": calls, "rows": rows, "timed_stage": guided[b], "note": note,
              "seconds": calls * stages[guided[b]]["seconds_per_call"]}
    return {"preset": preset, "work": {k: w for k, w in work.items() if k in stages}, "seconds": seconds,
            "pipelines": piped, "evaluation": ev, "differs_from_preset": list(differs or [])}


def predict(stages: dict, work: dict) -> float | None:
    """Seconds ``work`` ({stage: steps or samples}) takes at the rates of ``stages`` (a bench result's), as the
    extrapolation adds them up; None when a stage was not timed. scripts/gpu_check.py sets it beside a measured
    end-to-end run of that work (scripts/seeds_timing.py), the check of the extrapolation."""
    if not work or any(name not in stages for name in work):
        return None
    return sum(w / stages[name]["rate"] for name, w in work.items())


# ----------------------------------------------------------------------------- running
@contextlib.contextmanager
def _settings(cfg: BenchConfig, device: torch.device):
    """Threads, TF32 and dynamo's recompile limit for the bench, restored after it."""
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with compile_limits() if cfg.compile else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def time_plan(plan: list[Timed], cfg: BenchConfig, device: torch.device, log=None) -> dict:
    """Time each stage in order (freezing what it trained after it); ``{name: {unit, batch, rate, ...}}``."""
    # compiled: the first call compiles; CUDA-graph trees run a function eagerly once, record it on the
    # second call and replay from the third, so three untimed calls before the calibrating one
    warmup = max(cfg.warmup, 3) if cfg.compile else cfg.warmup
    stages = {}
    for st in plan:
        info: dict = {}
        st_call = st.build()
        secs = time_call(st_call, device=device, warmup=warmup, min_time=cfg.min_time, repeats=cfg.repeats, info=info)
        if st.trains is not None:
            st.trains.requires_grad_(False).eval()
        sec = statistics.median(secs)
        cap = getattr(st_call, "__self__", None)  # --capture: the CapturedStep
        not_captured = getattr(cap, "capture_error", None)  # it fell back
        syncs = getattr(cap, "host_syncs", None)  # on the CPU: what would stop a capture on CUDA
        per = st.batch if st.unit == "samples/s" else 1
        stages[st.name] = {"unit": st.unit, "batch": st.batch, "seconds_per_call": sec, "rate": per / sec,
                           "repeats": [per / s for s in secs], "warmup_seconds": info["warmup_seconds"]}
        if syncs is not None:
            stages[st.name]["host_syncs"] = syncs
        if not_captured:
            stages[st.name]["capture_error"] = not_captured
            if log:
                log(f"  {st.name}: timed eagerly, {not_captured}")
        if log:
            log(f"  {st.name:<18} batch {st.batch:>5}  {per / sec:>12.1f} {st.unit}"
                + (f"  (warm-up {info['warmup_seconds']:.1f} s)" if cfg.compile or cfg.capture else ""))
    return stages


def run_bench(cfg: BenchConfig | None = None, *, log: Callable[[str], None] | None = None) -> dict:
    """Time every stage; ``{"environment", "config", "stages", "extrapolation"}`` (JSON-ready)."""
    cfg = check_bench_config(cfg or BenchConfig())
    device = resolve_device(cfg.device)
    load_start = _loadavg()
    with _settings(cfg, device):
        built = ToyStages(cfg, device) if cfg.toy else RLStages(cfg, device)
        stages = time_plan(built.plan(), cfg, device, log)
        env = environment(device)
    env["load_average_1min_start"] = load_start
    return {"environment": env, "config": to_dict(cfg), "stages": stages, "extrapolation": built.extrapolate(stages)}


# ----------------------------------------------------------------------------- report
def _hms(sec: float) -> str:
    if not math.isfinite(sec):
        return "inf"
    h, rem = divmod(int(round(sec)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


_ORDER = ("behaviour", "critic_iql", "critic_insupport", "critic_softmax", "critic_regression", "energy_aepo",
          "energy_mse", "energy_qgpo", "energy_cep", "support_sampling", "unguided", "guided")  # *_softmax, *_cep: saved


def _stage_key(name: str):
    """The order stages run in (a JSON file written with sorted keys renders the same table)."""
    head, _, size = name.rpartition("_b")
    if head in _ORDER and size.isdigit():
        return (_ORDER.index(head), int(size), name)
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), 0, name)


def _extrapolation(result: dict) -> dict:
    """A result's extrapolation; one saved by the bench before its config parts (``full_preset``, the full
    preset's evaluation timed at batch 1) reads as the same fields."""
    if "extrapolation" in result:
        return result["extrapolation"]
    old = result["full_preset"]
    ev = old.get("evaluation")
    return {"preset": "full", "work": old["work"], "seconds": old["seconds"], "pipelines": old["pipelines"],
            "evaluation": ev and dict(ev, timed_stage=None), "differs_from_preset": []}  # its note names the batch


def _check_sections(result: dict) -> list[str]:
    """The extra tables of a ``scripts/gpu_check.sh`` result (absent from a plain bench result): the same stages
    timed eagerly, compiled and captured (``variants``: rates by stage), the side-by-side timings of the GPU paths
    (``paths``: scripts/gpu_paths.py's rows), several seeds trained end to end (``seeds``: scripts/seeds_timing.py)
    and each check's exit status (``checks``)."""
    lines, stages = [], result["stages"]
    variants = result.get("variants") or {}
    if variants:
        names = list(variants)
        lines += ["", "| stage | eager | " + " | ".join(names) + " | " + " | ".join(f"{n}/eager" for n in names) + " |",
                  "|---|---:|" + "---:|" * (2 * len(names))]
        for name, s in sorted(stages.items(), key=lambda kv: _stage_key(kv[0])):
            rates = [variants[n].get(name) for n in names]
            eager = [n for n in names if name in (result.get("variant_errors") or {}).get(n, {})]
            name = name + "".join(f" ({n}: ran eagerly, not capturable)" for n in eager)
            lines.append(f"| {name} | {s['rate']:.1f} {s['unit']} | "
                         + " | ".join("" if r is None else f"{r:.1f}" for r in rates) + " | "
                         + " | ".join("" if r is None else f"{r / s['rate']:.2f}x" for r in rates) + " |")
    for part, rows in (result.get("paths") or {}).get("parts", {}).items():
        lines += ["", f"| {part} | old | new | old ms | new ms | old/new | aten ops old -> new | "
                      "kernel-launching ops old -> new |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            o, n = r["old"], r["new"]
            la = r.get("launches")
            lines.append(f"| {r['name']} | {o} | {n} | {r['ms'][o]:.3f} | {r['ms'][n]:.3f} | {r['ratio']:.2f}x | "
                         f"{r['ops'][o]} -> {r['ops'][n]} | " + (f"{la[o]} -> {la[n]} |" if la else " |"))
    seeds = result.get("seeds")
    if seeds and seeds.get("rows"):
        n = seeds["seeds"]
        lines += ["", f"| several seeds, end to end ({seeds['steps_per_stage']} steps a stage, "
                      f"{seeds['transitions']} synthetic transitions) | 1 seed | {n} seeds together | "
                      f"time({n}) / time(1) | 1 seed, captured steps | 1 seed, the bench's prediction |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in seeds["rows"]:
            pred = predict(stages, r.get("work") or {})
            lines.append(f"| {r['method']} | {r['one_seed_s']:.1f} s | {r['n_seeds_s']:.1f} s | {r['ratio']:.2f} | "
                         + (f"{r['one_seed_captured_s']:.1f} s |" if "one_seed_captured_s" in r else " |")
                         + (" |" if pred is None else f" {pred:.1f} s (measured / predicted "
                                                      f"{r['one_seed_s'] / pred:.2f}) |"))
        lines += ["", "The prediction adds the run's work (steps, support samples) at the eager bench's rates, as the "
                  "preset's extrapolation does; the measured run also loads the data and writes checkpoints."]
    tf32 = result.get("tf32")
    if tf32 and tf32.get("pairs"):
        lines += ["", f"| TF32 against float32 (toy, {tf32['energy_steps']} energy steps, seed 0) | energy error "
                      "tf32 / fp32 | distance tf32 / fp32 | time tf32 / fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {p['task']} {p['method']} | {p['err_ratio']:.3f} | {p['distance_ratio']:.3f} | "
                  f"{p['time_ratio']:.2f} |" for p in tf32["pairs"]]
    checks = result.get("checks") or {}
    if checks:
        lines += ["", "| check | exit status | seconds | last line |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {'skipped' if c['rc'] == -1 else c['rc']} | {c['seconds']:.0f} | {c.get('summary', '')} |"
                  for k, c in checks.items()]
    return lines


def to_markdown(result: dict) -> str:
    """The bench result as Markdown tables (stage rates, the preset's times, environment)."""
    env, stages, ex = result["environment"], result["stages"], _extrapolation(result)
    lines = [f"| stage | batch | rate | {ex['preset']} preset: work | time |", "|---|---:|---:|---:|---:|"]
    for name, s in sorted(stages.items(), key=lambda kv: _stage_key(kv[0])):
        work, t = ex["work"].get(name), ex["seconds"].get(name)
        lines.append(f"| {name} | {s['batch']} | {s['rate']:.1f} {s['unit']} | "
                     f"{'' if work is None else f'{work:,}'} | {'' if t is None else _hms(t)} |")
    lines += ["", f"| pipeline ({ex['preset']} preset) | stages | time |", "|---|---|---:|"]
    for m, p in sorted(ex["pipelines"].items(), key=lambda kv: _stage_key("energy_" + kv[0])):
        lines.append(f"| {m} | {' + '.join(p['stages'])} | {_hms(p['seconds'])} |")
    if ex.get("evaluation"):
        e = ex["evaluation"]
        timed = f" (timed as {e['timed_stage']})" if e.get("timed_stage") else ""
        lines.append(f"| evaluation sweep | {e['note']}{timed} | {_hms(e['seconds'])} |")
    if ex.get("differs_from_preset"):
        lines += ["", f"Timed at settings other than the {ex['preset']} preset's: "
                      f"{', '.join(ex['differs_from_preset'])} (the times above are its step counts at these rates)."]
    lines += _check_sections(result)
    if result.get("config", {}).get("capture"):
        eager = "" if env["device"].startswith("cuda") else " (on the CPU: the same step run eagerly)"
        fell = [n for n, s in stages.items() if "capture_error" in s]
        fell = f" Not capturable, so timed eagerly: {', '.join(fell)}." if fell else ""
        lines += ["", "Training steps captured: each replayed as one CUDA graph, batch draw included, and so are "
                      f"the guided stages' sampling calls (--capture){eager}.{fell}"]
        audited = {n: s["host_syncs"] for n, s in stages.items() if "host_syncs" in s}
        if audited:
            blocked = [f"{n} ({', '.join(v)})" for n, v in audited.items() if v]
            lines.append("Checked on the CPU for operators that synchronise with the host on CUDA: "
                         + (f"these would not capture: {'; '.join(blocked)}." if blocked else
                            f"none found in {len(audited)} training steps."))
    dev = env.get("gpu") or env["cpu"]
    start = env.get("load_average_1min_start")
    load = ("" if start is None else f"{start} at the start, ") + f"{env['load_average_1min']} at the end"
    lines += ["", f"Device: {env['device']} ({dev}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
                  f"load average {load}). torch {env['torch']}, numpy {env['numpy']}, python {env['python']}, "
                  f"aepo_lite {env['aepo_lite']}."]
    return "\n".join(lines) + "\n"
