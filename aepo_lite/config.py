"""Configs: one part per component, shared by the offline-RL agent and the toy tasks, and the presets.

A run's config is a tree of dataclasses: top-level fields (what to train, seeds, device, logging)
and one part per component: ``behaviour`` (the diffusion behaviour model), ``critic``,
``support`` (the support actions QGPO's recipe and the in-support targets use), ``energy`` (the
intermediate energy f_phi), ``sampling`` (the guided sampler) and ``eval``. Every field has one
name everywhere and a comment, which is its ``--help`` text: the command line is generated from
these classes (``aepo-lite train --energy.beta 3``). A stage's checkpoint is keyed by a hash of
the parts it depends on, so a setting that changes a result always lands in its hash.

Presets are data (:data:`PRESETS`): nested overrides of the defaults, written once. The defaults
of :class:`TrainConfig` are the ``full`` preset (QGPO's published settings, docs/derivation.md
section 7); the bench extrapolates that same preset.
"""
from __future__ import annotations

import copy
import difflib
import json
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

__all__ = ["BehaviourConfig", "CriticConfig", "SupportConfig", "EnergyConfig", "SamplingConfig", "EvalConfig",
           "ToyEvalConfig", "TrainConfig", "ToyConfig", "PRESETS", "METHODS", "from_dict", "to_dict",
           "apply_overrides", "read_config_file", "load_config_file", "field_paths", "preset_config", "flatten", "config_diff",
           "estimator_name"]

METHODS = ("aepo", "qgpo", "mse", "bc")  # one name per method, in RL and on the toy tasks


@dataclass
class BehaviourConfig:
    """The diffusion behaviour model mu(a|s): a noise network trained by denoising score matching."""

    steps: int = 600_000  # gradient steps (QGPO: 600k)
    batch: int = 4096  # batch size (QGPO: 4096)
    lr: float = 1e-4  # Adam learning rate (QGPO: 1e-4)
    lr_decay: bool = False  # cosine-decay the learning rate to 0 over the steps
    hidden: int = 256  # noise network width
    blocks: int = 3  # noise network residual blocks


@dataclass
class CriticConfig:
    """The critic Q(s, a): IQL, QGPO's in-support softmax Q, or (toy tasks) a regression on the known reward."""

    # RL: iql | insupport | mc (ours: Q and V regressed on the data's Monte-Carlo returns; "" = the method's
    # default); toy: reward (the true e(x)) | regression
    kind: str = ""
    steps: int = 500_000  # gradient steps (QGPO updates its critic for the first 500k)
    batch: int = 256  # batch size
    lr: float = 3e-4  # Adam learning rate
    lr_decay: bool = False  # cosine-decay the learning rate to 0 over the steps (the toy's fitted critic only)
    hidden: int = 256  # Q/V width
    depth: int = 2  # Q/V hidden layers
    activation: str = "mish"  # smooth (silu|mish|gelu|tanh), or relu (QGPO's) only where Q is never differentiated
    gamma: float = 0.99  # discount
    tau_target: float = 0.005  # Polyak rate of the target Q
    expectile: float = 0.7  # IQL expectile (AntMaze: 0.9)
    beta_q: float = 1.0  # in-support softmax temperature beta_Q
    layer_norm: bool = False  # LayerNorm in the Q/V networks


@dataclass
class SupportConfig:
    """Support actions a^(j) ~ mu(.|s): QGPO's contrastive groups and in-support critic (toy: data points)."""

    k: int = 16  # K actions per state (AntMaze: 32)
    solver: str = "dpm2"  # sampler of the support actions
    steps: int = 15  # its network evaluations (docs/derivation.md section 6c: QGPO's 15)


@dataclass
class EnergyConfig:
    """The intermediate energy f_phi(s, a_t, t) and its target (AEPO's analytic one, CEP's, or MSE's)."""

    steps: int = 1_000_000  # gradient steps (QGPO: 1M)
    batch: int = 256  # batch size: states (qgpo: contrastive groups of support.k actions)
    lr: float = 3e-4  # Adam learning rate
    lr_decay: bool = False  # cosine-decay the learning rate to 0 over the steps
    hidden: int = 256  # energy network width
    depth: int = 3  # energy network hidden layers
    beta: float = 3.0  # inverse temperature of pi ∝ mu exp(beta Q)
    covariance: str = "tweedie"  # AEPO posterior covariance: tweedie | isotropic | gaussian-fit | none
    expansion: str = "sampled"  # AEPO expansion of Q: first | second | sampled
    n_samples: int = 16  # AEPO sampled expansion: Monte Carlo samples per a_t
    posterior: str = "particles"  # AEPO posterior: particles | mixture (ours, 4b; K = support.k) | gaussian (covariance, expansion)
    bandwidth: float = 0.0  # AEPO mixture posterior: kernel bandwidth h >= 0 around each support action
    # AEPO in-support targets (ours): regress f's differences between a state's K noised support actions (one t)
    # on the target's, so f need not fit the per-state offset that guidance never uses (posterior gaussian: False)
    centered: bool = field(default=True, metadata={"hash_default": False})
    # how the centered targets are fitted (ours; read only where centered): "softmax", QGPO's contrastive loss with
    # the target as labels, -sum_k softmax_k(y) log softmax_k(f) per group; "squared", the regression of the
    # differences above (the same optimum, f = y + c). Default softmax by measurement (docs/results.md); the toy
    # config pins squared, the fit its rows were measured with
    fit: str = field(default="softmax", metadata={"hash_default": "squared"})
    clip: Optional[float] = 1.0  # clip the posterior mean (and sampled actions) to [-clip, clip]; None = no box
    grad_clip: Optional[float] = None  # gradient-norm clipping of f_phi; None = off
    baseline: str = "value"  # RL, aepo/mse with IQL: regress on beta (Q - V(s)) ("value") or beta Q ("none")
    cover: float = 0.0  # toy, aepo: fraction of each batch drawn uniformly on the box instead of from the data
    precondition: bool = False  # toy: feed f_phi c_in(t) x_t (the Gaussian posterior-mean scaling)


def estimator_name(energy: "EnergyConfig", k: int) -> str:
    """AEPO's estimator as rows name it: ``<covariance>/<expansion>`` for the Gaussian posterior, else the in-support
    posterior with its K support actions (``particles-K8``, ``mixture-K64-h0.05``, ``particles-K8-centered``,
    ``particles-K8-centered-softmax``)."""
    e = energy
    if e.posterior == "gaussian":
        return f"{e.covariance}/{e.expansion}"
    return (f"{e.posterior}-K{k}" + (f"-h{e.bandwidth:g}" if e.posterior == "mixture" else "")
            + ("-centered" if e.centered else "") + ("-softmax" if e.centered and e.fit == "softmax" else ""))


@dataclass
class SamplingConfig:
    """The guided sampler: eps_guided = eps_theta - w sigma_t grad f_phi, with w swept at evaluation."""

    solver: str = "dpm2"  # sampler (QGPO: DPM-Solver order 2)
    steps: int = 15  # network evaluations per action (QGPO: 15)
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)  # w swept at evaluation (bc: 0)
    guidance_t_max: float = 1.0  # guide only where t <= this (1.0: everywhere, the method as written)
    compile: bool = False  # torch.compile the guided sampler step (CUDA graphs on CUDA); the first call compiles
    capture: bool = False  # each sampling call one CUDA graph per batch size and w (core.diffusion.CapturedSampler)


@dataclass
class EvalConfig:
    """Offline RL evaluation in Gymnasium (docs/derivation.md section 6c)."""

    episodes: int = 10  # episodes per guidance scale
    seed: int = 100_000  # episode i resets with seed + i (the same for every run)
    envs: int = 10  # environments stepped together (one batched sampler call per step)
    max_episode_steps: Optional[int] = None  # cap on episode length (smoke only; None: the environment's)
    candidates: int = 1  # best-of-N: N actions per state, keep the one with the largest Q


@dataclass
class ToyEvalConfig:
    """Toy evaluation against exact references (docs/derivation.md section 6)."""

    n_samples: int = 2000  # guided samples per guidance scale (and size of each exact target set)
    pool_size: int = 100_000  # behaviour pool resampled for exact target samples
    n_projections: int = 128  # directions of the sliced Wasserstein distance
    grid_size: int = 40  # the energy-error grid is grid_size x grid_size on [-1.2, 1.2]^2
    error_times: tuple[float, ...] = (0.05, 0.2, 0.5)  # diffusion times at which f_phi is compared with E_t
    n_ref_data: int = 10_000  # data points behind the exact E_t reference
    draws: int = 4  # distance draws per guidance scale (draw d: sampler seed and exact target set of seed + d); the
    # distance is their mean, since one draw varies by 7-42% (figures/toy2d_eval_noise.md); 1 = draw 0 alone


@dataclass
class TrainConfig:
    """One offline-RL run: a dataset, a method, a seed. Saved as ``DIR/config.json``. Defaults: the full preset."""

    dataset: str = ""  # Minari dataset id (local, or downloaded when online)
    method: str = "aepo"  # aepo | qgpo | mse | bc
    preset: str = "full"  # start from this named preset (smoke | bench | full); its values come first, flags last
    seed: int = 0  # seeds every stage and the sampling noise
    device: str = "auto"  # auto | cpu | cuda
    reward_scaling: str = "auto"  # IQL's conventions: auto | locomotion | antmaze | none
    log_every: int = 1000  # metrics line every this many steps
    checkpoint_every: int = 10_000  # periodic checkpoint every this many steps (a killed run resumes there)
    tensorboard: bool = False  # also write TensorBoard scalars to DIR/tb (the tensorboard extra)
    compile: bool = False  # torch.compile every network for training (CUDA graphs on CUDA)
    capture: bool = False  # each training step one CUDA graph (training.CapturedStep; eager on the CPU)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ToyConfig:
    """One toy run: a task, a method, beta (energy.beta), a seed. Defaults: the toy full preset."""

    task: str = "8gaussians"  # registered toy task (aepo_lite.toy.tasks.task_names())
    method: str = "aepo"  # aepo | qgpo | mse | bc
    preset: str = "full"  # start from this named preset (smoke | full); its values come first, flags last
    seed: int = 0  # seeds the energy network, its batches, the samples and the reference sets
    data_seed: int = 0  # seeds the task's training set, shared by every run of a task
    n_data: int = 50_000  # behaviour points x^j ~ mu in the training set
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 200  # metrics line every this many steps
    checkpoint_every: int = 1000  # periodic checkpoint every this many steps
    capture: bool = False  # each training step one CUDA graph (training.CapturedStep; eager on the CPU)
    behaviour: BehaviourConfig = field(default_factory=lambda: BehaviourConfig(
        steps=3000, batch=512, lr=2e-3, lr_decay=True, hidden=128, blocks=2))
    # the fitted critic (kind "regression") trains 24000 steps: chosen by measurement (figures/toy2d_critic_steps.md,
    # its error against e(x) by budget; docs/results.md); 1500 until session 67, where it cost the targets reading it
    critic: CriticConfig = field(default_factory=lambda: CriticConfig(
        kind="reward", steps=24_000, batch=512, lr=2e-3, lr_decay=True, hidden=128, depth=3, activation="silu"))
    support: SupportConfig = field(default_factory=lambda: SupportConfig(k=16))
    energy: EnergyConfig = field(default_factory=lambda: EnergyConfig(
        steps=600, batch=256, lr=1e-3, lr_decay=True, hidden=128, depth=3, beta=10.0, posterior="gaussian",
        covariance="gaussian-fit", expansion="sampled", centered=False, fit="squared", cover=0.25,
        precondition=True, baseline="none"))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        solver="dpmpp2m", steps=20, guidance_scales=(1.0,)))
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


# Presets: nested overrides of the defaults above, the only place a preset is written.
PRESETS: dict[str, dict[str, dict]] = {
    "rl": {
        # seconds on a CPU: the test suite and chapter 3 at smoke scale
        "smoke": {"log_every": 20, "checkpoint_every": 20,
                  "behaviour": dict(steps=60, batch=64, lr=1e-3, hidden=32, blocks=1),
                  "critic": dict(steps=60, batch=64, hidden=32),
                  "support": dict(k=4, solver="dpmpp2m", steps=3),
                  "energy": dict(steps=40, batch=32, hidden=32, depth=2),
                  "sampling": dict(solver="dpmpp2m", steps=3, guidance_scales=(0.0, 1.0)),
                  "eval": dict(episodes=2, envs=2, max_episode_steps=50)},
        # what a 2-core CPU affords on a 200k-transition dataset (a CPU benchmark, not QGPO's settings);
        # sampling at QGPO's 15 steps for acting and support actions (docs/derivation.md section 6c)
        "bench": {"log_every": 500, "checkpoint_every": 1000,
                  "behaviour": dict(steps=6_000, batch=128, lr=1e-3, hidden=64, blocks=2),
                  # LayerNorm in Q/V and 40000 steps: chosen by the 6c sweep with it (docs/results.md, rl_6c_ln.csv);
                  # the table in rl_6c.csv used 4000 steps without LayerNorm (its override files pin those)
                  "critic": dict(steps=40_000, batch=128, hidden=64, layer_norm=True),
                  "support": dict(k=8, solver="dpmpp2m", steps=15),
                  # 256 x 3 trained 20000 steps: chosen by the 6c sweep with it against 64 x 2 / 2000 steps (docs/results.md,
                  # rl_6c_big.csv vs rl_6c_ln.csv); the older tables' override files pin the smaller energy
                  "energy": dict(steps=20_000, batch=128, lr=1e-3, hidden=256, depth=3),
                  "sampling": dict(solver="dpmpp2m", steps=15, guidance_scales=(0.0, 0.03, 0.1, 0.3, 1.0, 3.0)),
                  "eval": dict(episodes=10, envs=10)},
        # docs/derivation.md section 7: QGPO's published settings (for a GPU): the defaults
        "full": {},
    },
    "toy": {
        "smoke": {"n_data": 20_000, "log_every": 100, "checkpoint_every": 500,
                  "behaviour": dict(steps=1500), "critic": dict(steps=800), "energy": dict(steps=800),
                  "eval": dict(n_samples=1000, n_ref_data=20_000, pool_size=20_000, draws=1)},
        "full": {},
        # the full preset with a longer energy budget (4000 steps; whether it is converged is measured by
        # aepo-lite toy-convergence, figures/toy2d_convergence.md): the matched toy grid of docs/results.md
        "long": {"energy": dict(steps=4000)},
        # four times that (16000 steps): the top of the convergence curve, for each method's best guidance scale
        # there (figures/toy2d_xlong.csv; the stage cache of the curve's runs is shared, so only sampling is new)
        "xlong": {"energy": dict(steps=16000)},
        # twice that (32000 steps): shown converged for both methods on 3 of 6 tasks (docs/results.md), for the
        # 3-seed best-w tables (figures/toy2d_xxlong.csv; the convergence curve's stage cache is shared)
        "xxlong": {"energy": dict(steps=32000)},
    },
}


# ----------------------------------------------------------------------------------- dict <-> config
def to_dict(cfg) -> dict:
    """A config as a plain nested dict (JSON-able; tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(path: str, key: str, cls) -> ValueError:
    near = difflib.get_close_matches(key, _names(cls), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else f"; valid: {', '.join(_names(cls))}"
    return ValueError(f"{path + key}: not a config field{hint}")


# what a field's declared type accepts (bool is not a number here, and 3.0 is not an integer)
_KINDS = {"int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
          "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
          "bool": ("true or false", lambda v: isinstance(v, bool)),
          "str": ("a string", lambda v: isinstance(v, str))}


def _coerce(f, value, where: str):
    """``value`` for the field ``f`` (dotted name ``where``), checked against its declared type: a config file's
    ``"beta": "x"`` is an error naming ``energy.beta`` here, not a TypeError deep in training. Lists become tuples."""
    t = str(f.type).replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        if value is None:
            return None
        t = t[len("Optional["):-1]
    if t.startswith("tuple[") and t.endswith(",...]"):
        inner = t[len("tuple["):-len(",...]")]
        what, ok = _KINDS.get(inner, ("a value", lambda v: True))
        if not isinstance(value, (list, tuple)) or not all(ok(v) for v in value):
            raise ValueError(f"{where}: expected a list of values, each {what}, got {value!r}")
        return tuple(value)
    what, ok = _KINDS.get(t, ("", lambda v: True))
    if not ok(value):
        raise ValueError(f"{where}: expected {what}, got {value!r}")
    return value


def apply_overrides(cfg, overrides: dict, path: str = ""):
    """A copy of ``cfg`` with nested ``overrides`` applied; an unknown key is an error naming the nearest fields."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{path.rstrip('.') or 'config'}: expected a mapping of fields, got {overrides!r}")
    cfg = copy.deepcopy(cfg)
    by_name = {f.name: f for f in fields(cfg)}
    for k, v in overrides.items():
        if k not in by_name:
            raise _unknown(path, k, type(cfg))
        cur = getattr(cfg, k)
        if is_dataclass(cur):
            setattr(cfg, k, apply_overrides(cur, v, f"{path}{k}."))
        else:
            setattr(cfg, k, _coerce(by_name[k], v, path + k))
    return cfg


def from_dict(cls, d: dict):
    """A config of class ``cls`` from a nested dict (a saved config.json); unknown keys are errors. A field
    added later with ``metadata={"hash_default": v}`` and missing from ``d`` takes ``v``, the value that
    reproduces the run that saved it (not today's default)."""
    return apply_overrides(cls(), _with_saved_defaults(cls(), d))


def _with_saved_defaults(cfg, d):
    if not isinstance(d, dict):
        return d
    out = dict(d)
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name not in out and "hash_default" in f.metadata:
            out[f.name] = f.metadata["hash_default"]
        elif is_dataclass(v) and isinstance(out.get(f.name), dict):
            out[f.name] = _with_saved_defaults(v, out[f.name])
    return out


def preset_config(cls, preset: str, **top):
    """``cls``'s defaults with the named preset applied, then top-level fields ``top`` (e.g. dataset, method)."""
    kind = "toy" if cls is ToyConfig else "rl"
    if preset not in PRESETS[kind]:
        raise ValueError(f"preset: expected one of {tuple(PRESETS[kind])}, got {preset!r}")
    return apply_overrides(cls(preset=preset), dict(PRESETS[kind][preset], **top))


def field_paths(cls, prefix: str = "") -> list[str]:
    """Every leaf field as a dotted path (``energy.beta``): what the command line must accept."""
    out = []
    for f in fields(cls):
        t = f.default_factory() if f.default_factory is not MISSING else None  # type: ignore[misc]
        if is_dataclass(t):
            out += field_paths(type(t), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def read_config_file(path) -> dict:
    """A JSON (or YAML, by suffix) mapping from a file. A parse error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config: cannot read {path} ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"config: {path}{where} does not parse as YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path} line {e.lineno} does not parse as JSON ({e.msg})") from None
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"config: {path} holds a {type(d).__name__}, not a mapping of fields")
    return d or {}


def load_config_file(path, cls):
    """Read a JSON (or YAML) config file into ``cls``; an unknown field is an error naming the nearest ones."""
    return from_dict(cls, read_config_file(path))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"energy.beta": 3.0, ...}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_diff(old: dict, new: dict, ignore=()) -> list[str]:
    """Dotted paths whose values differ between two nested config dicts (a path under ``ignore`` is skipped;
    a path missing from ``old``, a field newer than the saved config, counts as equal)."""
    a, b = flatten(old), flatten(new)
    skip = tuple(ignore)
    return sorted(k for k in b if not any(k == p or k.startswith(p + ".") for p in skip)
                  and k in a and not _same(a[k], b[k]))


def _same(x, y) -> bool:
    """Equal config values: numbers by value (``3`` in a hand-written config.json is ``3.0``), lists item by item."""
    number = (int, float)
    if isinstance(x, number) and isinstance(y, number) and not isinstance(x, bool) and not isinstance(y, bool):
        return x == y
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    return json.dumps(x, default=str) == json.dumps(y, default=str)
