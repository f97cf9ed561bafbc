"""Stage benchmarks of the pipeline: how fast each stage runs here, and how long the ``full``
preset (QGPO's published settings, docs/derivation.md section 7) would take at that rate.

Stages (random data of D4RL-locomotion shape, resident on the device; nothing is read from disk):

  behaviour          denoising score matching + Adam, batch 4096                 steps/s
  critic_iql         ``critics.IQLCritic`` update (expectile V + twin Q), batch 256  steps/s
  critic_softmax     ``critics.InSupportCritic`` update (K next support actions)   steps/s
  energy_<method>    ``EnergyLearner`` update (aepo | mse | cep), batch 256      steps/s
  support_sampling   unguided behaviour samples, 256 states x K actions          samples/s
  guided_b<B>        energy-guided sampling, batch B (1, 256, 4096), 15 steps    samples/s

``run_bench(cfg) -> dict`` is the whole API; ``aepo-lite bench`` prints it and writes it as JSON.
A training step is timed as a loop of steps with one device synchronisation at the end, so the
rate is what a training loop with no host synchronisation gets (where the library's step has none).

``BenchConfig.compile`` compiles, in place, every network a timed stage runs (:func:`compile_module`):
the behaviour NoiseNet (behaviour training, support sampling, AEPO's posterior), the critics (the
fixed TwinQ that the energy stages query, and each critic learner's Q, target Q and V) and the
EnergyNets (energy training); the guided stages time the agent's compiled sampler step
(``FusedGuidedEps``: eps, energy and its gradient in one graph). Mode ``reduce-overhead`` (CUDA graphs) on
CUDA, inductor's default on the CPU; static shapes, so each batch size compiles once. On CUDA each
timed call first marks a new CUDA-graph step (``torch.compiler.cudagraph_mark_step_begin``); see
:class:`Stages`. Compilation happens in each stage's untimed warm-up calls (``warmup_seconds``).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from aepo_lite.config import EnergyConfig

from aepo_lite.core.aepo import EnergyLearner
from aepo_lite.config import CriticConfig
from aepo_lite.core.critics import make_critic
from aepo_lite.device import adam, compile_limits, compile_mode, compile_module, resolve_device
from aepo_lite.core.diffusion import DiffusionModel, FusedGuidedEps, energy_guidance
from aepo_lite.core.nets import EnergyNet, NoiseNet, TwinQ
from aepo_lite.core.schedule import VPSchedule

__all__ = ["BenchConfig", "FullPreset", "FULL_PRESET", "PIPELINES", "run_bench", "extrapolate", "environment",
           "to_markdown", "quick_config", "tiny_config", "compile_mode", "compile_module"]


@dataclass(frozen=True)
class FullPreset:
    """How much work the ``full`` preset does (docs/derivation.md section 7, QGPO's official code)."""

    behaviour_steps: int = 600_000  # behaviour training steps at batch 4096
    critic_steps: int = 500_000  # critic updated for the first 500k of the energy steps
    energy_steps: int = 1_000_000  # energy training steps at batch 256
    dataset_size: int = 1_000_000  # transitions (D4RL hopper/walker/halfcheetah-medium: 1M; medium-expert: 2M)
    support_k: int = 16  # support actions per state for s and s' (32 on AntMaze)
    guidance_scales: tuple = (0, 1, 2, 3, 5, 8, 10)  # scales swept at evaluation (locomotion)
    eval_episodes: int = 10  # episodes per scale, stepped together (one sampler call per env step)
    episode_len: int = 1000  # env steps per episode (upper bound: early termination is faster)


FULL_PRESET = FullPreset()

# Which stages each method's pipeline runs (the evaluation sweep is reported on its own).
PIPELINES = {
    "aepo": ("behaviour", "critic_iql", "energy_aepo"),
    "mse": ("behaviour", "critic_iql", "energy_mse"),
    "cep": ("behaviour", "support_sampling", "critic_softmax", "energy_cep"),  # QGPO
}


@dataclass
class BenchConfig:
    """What ``run_bench`` measures. Defaults: Hopper shapes, the library's default network sizes."""

    device: str = "auto"  # auto | cpu | cuda
    state_dim: int = 11  # Hopper observation size
    action_dim: int = 3  # Hopper action size
    behaviour_batch: int = 4096  # behaviour training batch (docs/derivation.md section 7)
    batch: int = 256  # critic and energy training batch
    support_k: int = 16  # K support actions per state (cep, softmax critic)
    n_steps: int = 15  # solver steps (network evaluations) for every sampler stage
    solver: str = "dpmpp2m"  # sampler of the guided and support stages
    guidance_scale: float = 3.0  # w of the guided stages
    sample_batches: tuple = (1, 256, 4096)  # batch sizes of the guided-sampling stages
    methods: tuple = ("aepo", "mse", "cep")  # energy learners to time
    covariance: str = "tweedie"  # AEPO posterior covariance of the energy_aepo stage
    expansion: str = "first"  # AEPO expansion of the energy_aepo stage
    noise_hidden: int = 256  # NoiseNet width
    noise_blocks: int = 3  # NoiseNet residual blocks
    energy_hidden: int = 256  # EnergyNet width
    energy_depth: int = 3  # EnergyNet hidden layers
    critic_hidden: int = 256  # TwinQ / ValueNet width
    critic_depth: int = 2  # TwinQ / ValueNet hidden layers
    activation: str | None = None  # one activation for every network; None = each network's default
    warmup: int = 3  # untimed calls before timing each stage
    min_time: float = 1.0  # seconds one timed repeat should last (sets the number of calls)
    repeats: int = 3  # timed repeats per stage; the median is reported
    tf32: bool = False  # CUDA only: TF32 matmuls (off until checked on the toy distance metric)
    compile: bool = False  # torch.compile every network the stages run (CUDA: reduce-overhead, i.e. CUDA graphs)
    seed: int = 0  # seed of the random data and the networks
    threads: int | None = None  # torch CPU threads; None = torch's default (1 is steadier on a shared machine)
    preset: FullPreset = field(default_factory=FullPreset)  # the work to extrapolate to


def quick_config(**kw) -> BenchConfig:
    """The real batch sizes, one short repeat per stage (``aepo-lite bench --quick``)."""
    return BenchConfig(**{"warmup": 1, "min_time": 0.2, "repeats": 1, **kw})


def tiny_config(**kw) -> BenchConfig:
    """Tiny networks and batches: checks the bench runs, measures nothing useful (tests)."""
    return BenchConfig(**{"behaviour_batch": 64, "batch": 16, "support_k": 4, "n_steps": 3, "sample_batches": (1, 8),
                          "noise_hidden": 16, "noise_blocks": 1, "energy_hidden": 16, "energy_depth": 2,
                          "critic_hidden": 16, "critic_depth": 2, "warmup": 1, "min_time": 0.01, "repeats": 1,
                          "device": "cpu", "threads": 1, **kw})


# ----------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    """Device and library versions, for the JSON and the README table."""
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


# ----------------------------------------------------------------------------- the stages
def _noop() -> None:
    return None


class Stages:
    """Builds the networks and closures that one call of each stage runs.

    With ``cfg.compile`` every network a stage runs is compiled in place (:func:`compile_module`) and
    the guided stages use the compiled ``FusedGuidedEps``. On CUDA (``reduce-overhead``: CUDA-graph
    trees) each training step and each sampler call starts with
    ``torch.compiler.cudagraph_mark_step_begin()``. Without it, CUDA-graph trees start a new
    generation at every compiled call that has no backward pending, and a new generation may
    overwrite the outputs of the previous one while the library still reads them (pytorch#160281):
    IQL's ``v`` is read (``v_mean``) after the ``v(s2)`` and Q calls (``critics.IQLCritic.step``), and
    in the unfused guided sampler the behaviour net's eps after the energy's gradient call
    (``diffusion._guided_eps``). Once a step is marked, generations change only at the marks, so
    everything inside one step or one sampler call stays valid.

    Compiled, each stage also gives the shared networks the ``requires_grad`` the agent gives them
    (``agent.py`` freezes the behaviour model and the critic before the energy stage and the energy
    before evaluation): a compiled backward computes the gradient of every input that requires one,
    so AEPO's Jacobian and critic gradient would also compute the weight gradients that eager
    ``autograd.grad`` skips (measured on this CPU, energy_aepo compiled: 6.4 steps/s trainable, 8.9
    frozen; eager 9.95 and 10.14). The uncompiled path leaves them as they are.
    """

    def __init__(self, cfg: BenchConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        k, d, dev = cfg.state_dim, cfg.action_dim, device
        self.schedule = VPSchedule()
        act = {} if cfg.activation is None else {"activation": cfg.activation}
        self.behaviour = DiffusionModel(NoiseNet(d, k, cfg.noise_hidden, cfg.noise_blocks, **act), self.schedule).to(dev)
        self.critic = TwinQ(k, d, cfg.critic_hidden, cfg.critic_depth, **act).to(dev)
        self.critic_target = TwinQ(k, d, cfg.critic_hidden, cfg.critic_depth, **act).to(dev).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.energy = {m: EnergyNet(d, k, cfg.energy_hidden, cfg.energy_depth, **act).to(dev) for m in cfg.methods}
        if cfg.compile:
            if "aepo" in cfg.methods and cfg.expansion == "second":
                # create_graph through a compiled critic: AOTAutograd has no double backward
                raise ValueError("compile: the energy_aepo stage with expansion='second' differentiates the critic "
                                 "twice, which torch.compile does not support; use expansion='first' or 'sampled'")
            for net in (self.behaviour.net, self.critic, *self.energy.values()):
                compile_module(net, dev)
            self.critic.requires_grad_(False)  # the fixed critic the energy stages query; never trained here
        self._stage: str | None = None
        self.eps = self.behaviour.eps  # the compiled NoiseNet when cfg.compile
        self.q = self.critic.q_min  # q_min calls self(s, a): the compiled TwinQ when cfg.compile
        self._step_begin = (torch.compiler.cudagraph_mark_step_begin
                            if cfg.compile and compile_mode(dev) == "reduce-overhead" else _noop)
        # a data set resident on the device: batches are drawn by on-device indexing
        n = 16 * max(cfg.behaviour_batch, cfg.batch)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.data = {"s": torch.randn(n, k, generator=g), "a": torch.rand(n, d, generator=g) * 2 - 1,
                     "r": torch.randn(n, generator=g), "s_": torch.randn(n, k, generator=g),
                     "done": (torch.rand(n, generator=g) < 0.01).float()}
        self.data = {key: v.to(dev) for key, v in self.data.items()}
        self.support = (torch.rand(n // 16, cfg.support_k, d, generator=g) * 2 - 1).to(dev)
        self.n = n

    def _enter(self, stage: str) -> None:
        """Compiled only: the behaviour net trains in the behaviour stage and is frozen after it; an energy
        net trains in its energy stage and is frozen for sampling (set once per stage, at its first call)."""
        if not self.cfg.compile or self._stage == stage:
            return
        self._stage = stage
        self.behaviour.requires_grad_(stage == "behaviour")
        for m, net in self.energy.items():
            net.requires_grad_(stage == f"energy_{m}")

    def batch(self, size: int) -> dict:
        idx = torch.randint(0, self.n, (size,), device=self.device)
        b = {key: v[idx] for key, v in self.data.items()}
        sidx = idx % self.support.shape[0]
        b["support"] = b["fake_a_"] = self.support[sidx]
        return b

    # --- training steps -------------------------------------------------------------------
    def behaviour_step(self):
        opt = adam(self.behaviour.parameters(), 1e-4)
        B = self.cfg.behaviour_batch

        def step():
            self._enter("behaviour")
            self._step_begin()
            b = self.batch(B)
            loss = self.behaviour.loss(b["a"], b["s"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def _critic(self, kind: str):
        cfg = self.cfg
        ccfg = CriticConfig(kind=kind, hidden=cfg.critic_hidden, depth=cfg.critic_depth,
                            **({} if cfg.activation is None else {"activation": cfg.activation}))
        learner = make_critic(cfg.state_dim, cfg.action_dim, ccfg).to(self.device)
        if cfg.compile:
            for net in learner.children():  # its networks: Q, target Q and (IQL) V
                compile_module(net, self.device)
        return learner

    def critic_iql_step(self):
        """The library's IQLCritic.update (expectile V, twin Q, Polyak target)."""
        learner, B = self._critic("iql"), self.cfg.batch

        def step():
            self._step_begin()
            b = self.batch(B)
            learner.update({"s": b["s"], "a": b["a"], "r": b["r"], "s2": b["s_"], "done": b["done"]})
        return step

    def critic_softmax_step(self):
        """The library's InSupportCritic.update (QGPO's softmax target over K next support actions)."""
        learner, B = self._critic("insupport"), self.cfg.batch

        def step():
            self._step_begin()
            b = self.batch(B)
            learner.update({"s": b["s"], "a": b["a"], "r": b["r"], "s2": b["s_"], "done": b["done"],
                            "support2": b["fake_a_"]})
        return step

    def energy_step(self, method: str):
        cfg = self.cfg
        ecfg = EnergyConfig(beta=3.0, covariance=cfg.covariance, expansion=cfg.expansion)
        learner = EnergyLearner(self.energy[method], ecfg, schedule=self.schedule, eps_fn=self.eps, q_fn=self.q,
                                method="qgpo" if method == "cep" else method)
        K, B = cfg.support_k, cfg.batch
        run = learner.step  # no host sync (fused Adam on CUDA: the learner's own optimiser)

        def step():
            self._enter(f"energy_{method}")
            self._step_begin()
            b = self.batch(B)
            if method == "cep":
                with torch.no_grad():
                    s_rep = b["s"].repeat_interleave(K, dim=0)
                    b["support_q"] = self.q(s_rep, b["support"].reshape(B * K, -1)).reshape(B, K)
            run(b)
        return step

    # --- samplers ---------------------------------------------------------------------------
    def support_sampler(self):
        B, K = self.cfg.batch, self.cfg.support_k
        s = self.data["s"][:B].repeat_interleave(K, dim=0)

        def call():
            self._enter("sampling")
            self._step_begin()
            with torch.no_grad():
                return self.behaviour.sample(cond=s, n_steps=self.cfg.n_steps, solver=self.cfg.solver)
        return call, B * K

    def guided_sampler(self, batch: int):
        """Eager: ``energy_guidance`` (eps, then the energy's autograd gradient). Compiled: what the agent runs
        with ``compile_sampler``, :class:`~aepo_lite.core.diffusion.FusedGuidedEps` (eps, energy and its gradient
        traced into one graph per batch size)."""
        energy = self.energy.get("aepo") or next(iter(self.energy.values()))
        s = self.data["s"][:batch]
        if self.cfg.compile:
            kw = {"guided_eps": FusedGuidedEps(self.eps, energy, compile=True, mode=compile_mode(self.device))}
        else:
            kw = {"guidance": energy_guidance(energy)}

        def call():
            self._enter("sampling")
            self._step_begin()
            return self.behaviour.sample(cond=s, n_steps=self.cfg.n_steps, solver=self.cfg.solver,
                                         guidance_scale=self.cfg.guidance_scale, **kw)
        return call, batch


def run_bench(cfg: BenchConfig | None = None, *, log: Callable[[str], None] | None = None) -> dict:
    """Time every stage; return ``{"environment", "config", "stages", "full_preset"}`` (JSON-ready)."""
    cfg = cfg or BenchConfig()
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with _compile_limits(cfg):
            return _run(cfg, device, log)
    finally:
        torch.set_num_threads(threads)


def _compile_limits(cfg: BenchConfig):
    """Compiled: room for every static shape (:func:`~aepo_lite.device.compile_limits`)."""
    return compile_limits() if cfg.compile else contextlib.nullcontext()


def _run(cfg: BenchConfig, device: torch.device, log) -> dict:
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    st = Stages(cfg, device)
    plan: list[tuple[str, str, int, Callable]] = [("behaviour", "steps/s", cfg.behaviour_batch, st.behaviour_step()),
                                                 ("critic_iql", "steps/s", cfg.batch, st.critic_iql_step()),
                                                 ("critic_softmax", "steps/s", cfg.batch, st.critic_softmax_step())]
    plan += [(f"energy_{m}", "steps/s", cfg.batch, st.energy_step(m)) for m in cfg.methods]
    call, n = st.support_sampler()
    plan.append(("support_sampling", "samples/s", n, call))
    for b in cfg.sample_batches:
        call, n = st.guided_sampler(b)
        plan.append((f"guided_b{b}", "samples/s", n, call))

    # compiled: the first call compiles; CUDA-graph trees run a function eagerly once, record it on the
    # second call and replay from the third, so three untimed calls before the calibrating one
    warmup = max(cfg.warmup, 3) if cfg.compile else cfg.warmup
    stages = {}
    for name, unit, batch, fn in plan:
        info: dict = {}
        secs = time_call(fn, device=device, warmup=warmup, min_time=cfg.min_time, repeats=cfg.repeats, info=info)
        sec = statistics.median(secs)
        per = batch if unit == "samples/s" else 1
        stages[name] = {"unit": unit, "batch": batch, "seconds_per_call": sec, "rate": per / sec,
                        "repeats": [per / s for s in secs], "warmup_seconds": info["warmup_seconds"]}
        if log:
            log(f"  {name:<18} batch {batch:>5}  {per / sec:>12.1f} {unit}"
                + (f"  (warm-up {info['warmup_seconds']:.1f} s)" if cfg.compile else ""))
    out = {"environment": environment(device), "config": _jsonable(asdict(cfg)), "stages": stages}
    out["full_preset"] = extrapolate(stages, cfg.preset, n_steps=cfg.n_steps)
    return out


def extrapolate(stages: dict, preset: FullPreset = FULL_PRESET, n_steps: int = 15) -> dict:
    """Seconds the ``full`` preset would take at the measured rates (stage, pipeline and evaluation)."""
    p = preset
    work = {"behaviour": p.behaviour_steps, "critic_iql": p.critic_steps, "critic_softmax": p.critic_steps,
            "support_sampling": 2 * p.dataset_size * p.support_k}  # K actions for every s and every s'
    work.update({name: p.energy_steps for name in stages if name.startswith("energy_")})
    seconds = {name: work[name] / stages[name]["rate"] for name in work if name in stages}
    pipelines = {}
    for method, names in PIPELINES.items():
        if all(n in seconds for n in names):
            total = sum(seconds[n] for n in names)
            pipelines[method] = {"stages": list(names), "seconds": total, "hours": total / 3600}
    evaluation = None
    if "guided_b1" in stages:
        calls = len(p.guidance_scales) * p.episode_len  # episodes stepped together: one call per env step
        evaluation = {"sampler_calls": calls, "seconds": calls * stages["guided_b1"]["seconds_per_call"],
                      "note": f"{len(p.guidance_scales)} scales x {p.episode_len} env steps, {p.eval_episodes} "
                              "episodes per call, timed at batch 1 (sampler only, no simulator)"}
    return {"preset": _jsonable(asdict(p)), "work": work, "seconds": seconds, "pipelines": pipelines,
            "evaluation": evaluation, "n_steps": n_steps}


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


# ----------------------------------------------------------------------------- report
def _hms(sec: float) -> str:
    if not math.isfinite(sec):
        return "inf"
    h, rem = divmod(int(round(sec)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _stage_key(name: str):
    """The order stages run in (a JSON file written with sorted keys renders the same table)."""
    order = ["behaviour", "critic_iql", "critic_softmax", "energy_aepo", "energy_mse", "energy_cep", "support_sampling"]
    if name in order:
        return (order.index(name), 0, name)
    if name.startswith("guided_b") and name[8:].isdigit():
        return (len(order) + 1, int(name[8:]), name)
    return (len(order), 0, name)


def to_markdown(result: dict) -> str:
    """The bench result as a markdown table (stage rates, full-preset times, environment)."""
    env, stages, full = result["environment"], result["stages"], result["full_preset"]
    lines = ["| stage | batch | rate | full preset: work | time |", "|---|---:|---:|---:|---:|"]
    for name, s in sorted(stages.items(), key=lambda kv: _stage_key(kv[0])):
        work = full["work"].get(name)
        t = full["seconds"].get(name)
        lines.append(f"| {name} | {s['batch']} | {s['rate']:.1f} {s['unit']} | "
                     f"{'' if work is None else f'{work:,}'} | {'' if t is None else _hms(t)} |")
    lines += ["", "| pipeline (full preset) | stages | time |", "|---|---|---:|"]
    for m, p in sorted(full["pipelines"].items(), key=lambda kv: _stage_key("energy_" + kv[0])):
        lines.append(f"| {m} | {' + '.join(p['stages'])} | {_hms(p['seconds'])} |")
    if full.get("evaluation"):
        e = full["evaluation"]
        lines.append(f"| evaluation sweep | {e['note']} | {_hms(e['seconds'])} |")
    dev = env.get("gpu") or env["cpu"]
    lines += ["", f"Device: {env['device']} ({dev}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
                  f"load average {env['load_average_1min']} at the end). torch {env['torch']}, numpy {env['numpy']}, "
                  f"python {env['python']}, aepo_lite {env['aepo_lite']}."]
    return "\n".join(lines) + "\n"


def main_print(result: dict, file=sys.stdout) -> None:
    print(to_markdown(result), file=file)
