"""Make D4RL-style Minari datasets locally (``aepo-lite make-dataset``), without jax.

D4RL's recipe, at a budget a CPU can afford:

  - ``random``: uniform random actions;
  - a *policy ladder*: one TD3 agent (stable-baselines3, the ``datasets`` extra) trained for a
    fixed budget of environment steps, with a snapshot and a short deterministic evaluation every
    ``eval_every`` steps. Every episode seen during training is kept (for ``medium-replay``);
  - ``expert``: the best snapshot of the ladder. With a small budget it is *not* an expert in
    D4RL's sense: it is the best policy this budget buys, and the metadata says so;
  - ``medium``: the first snapshot whose evaluation return reaches ``medium_fraction`` (1/3) of
    the expert's (D4RL's "policy trained to about a third of expert performance");
  - ``medium-replay``: the training episodes up to the medium snapshot;
  - ``medium-expert``: half medium, half expert transitions.

Behaviour data is collected with Gaussian action noise (``collect_noise``) on top of the
deterministic TD3 actor. ``ref_min_score`` / ``ref_max_score`` are the mean returns of the random
policy and of the expert snapshot over ``ref_episodes`` (>= 100 by default) episodes. Everything
is seeded: the same arguments give the same dataset on the same machine and library versions. The TD3
training behind a ladder is chaotic in floating point, so another CPU or another release of MuJoCo,
gymnasium, torch or stable-baselines3 can give other snapshots and so another dataset; the ladder and
the dataset record what made them (``made_with``), to tell which. A ladder trains on one torch thread
(``LADDER_THREADS``), so the machine's core count is not among those differences.

Every argument is checked before any work (the name against Minari's id grammar and the Minari
root, the seed, the counts). A make that fails or is interrupted leaves nothing behind: no new
dataset folder, no namespace folder it created, and the dataset it was to replace is restored.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from aepo_lite._checks import check_int, check_seed
from aepo_lite._io import atomic_write_json, read_json
from aepo_lite.rl.evaluation import Episode, check_reference_scores, run_episodes

__all__ = ["QUALITIES", "DatasetRecipe", "REFERENCE_DATASETS", "reference_dataset", "reference_differences",
           "dataset_reference_differences", "make_dataset", "train_policy_ladder", "policy_cache_dir", "made_with"]

QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert")


@dataclass
class DatasetRecipe:
    """How ``make-dataset`` builds a dataset (saved in the dataset's description)."""

    env_id: str  # Gymnasium environment id, e.g. Hopper-v5
    quality: str  # random | medium | medium-replay | medium-expert | expert
    steps: int  # transitions in the dataset
    name: str  # Minari dataset id NAMESPACE/ENV/QUALITY-v0
    seed: int = 0  # seeds the policy training, data collection and reference episodes (0 .. 2**32-1)
    train_steps: int = 60_000  # TD3 environment steps for the policy ladder (the whole budget)
    eval_every: int = 5_000  # snapshot + evaluation period of the ladder (env steps)
    eval_episodes: int = 5  # deterministic episodes per ladder evaluation
    learning_starts: int = 5_000  # uniform-random steps before TD3 starts learning
    medium_fraction: float = 1.0 / 3.0  # medium = first snapshot with return >= fraction * expert return
    collect_noise: float = 0.1  # std of Gaussian action noise while collecting behaviour data
    ref_episodes: int = 100  # episodes for ref_min_score (random) and ref_max_score (expert)
    net_arch: tuple = (128, 128)  # TD3 actor/critic hidden sizes
    train_freq: int = 64  # TD3: collect this many steps, then ...
    gradient_steps: int = 32  # ... take this many gradient steps (update-to-data ratio 1/2, for CPU)
    n_envs: int = 8  # parallel environments when collecting


LADDER_THREADS = 1  # torch threads a TD3 ladder trains on (train_policy_ladder), and make_dataset runs on


def policy_cache_dir() -> Path:
    """Where policy ladders are cached: ``$AEPO_POLICY_CACHE`` or ``<MINARI_DATASETS_PATH>/../aepo_lite_policies``."""
    if os.environ.get("AEPO_POLICY_CACHE"):
        return Path(os.environ["AEPO_POLICY_CACHE"])
    from minari.storage.datasets_root_dir import get_dataset_path
    return Path(get_dataset_path()).parent / "aepo_lite_policies"


def made_with() -> dict:
    """The library versions, the CPU and torch's thread count a ladder or a dataset was made with (what its
    floating point depends on)."""
    import importlib.metadata as md
    import platform

    import torch

    from aepo_lite.bench import _cpu_name
    versions = {}
    for dist in ("aepo-lite", "numpy", "torch", "gymnasium", "mujoco", "stable-baselines3", "minari"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"versions": versions, "python": platform.python_version(), "cpu": _cpu_name(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}


# The local datasets docs/results.md's offline-RL tables were measured on: the make-dataset arguments of its
# commands that are not at their defaults, and what they made there (transitions; episodes where the docs record
# them; the data's mean episode return, from figures/rl_6c_big.csv and rl_6c_heldout_big.csv; the reference returns
# at scores 0 and 100, as its tables print them). A TD3 ladder follows every floating-point difference (CPU, thread
# count, library versions), so a dataset remade elsewhere can differ; make-dataset says whether it does.
REFERENCE_DATASETS = {
    "local/pusher/medium-expert-v0": (
        dict(env_id="Pusher-v5", quality="medium-expert", steps=50_000, train_steps=100_000),
        dict(transitions=50_000, mean_return=-50.24954137423818, ref_min_score=-150.7, ref_max_score=-34.0)),
    "local/invdpendulum/medium-expert-v0": (
        dict(env_id="InvertedDoublePendulum-v5", quality="medium-expert", steps=50_000, medium_fraction=0.1),
        dict(transitions=50_000, mean_return=1356.3438693988815, ref_min_score=49.0, ref_max_score=9093.4)),
    "local/hopper/medium-v0": (
        dict(env_id="Hopper-v5", quality="medium", steps=200_000),
        dict(transitions=200_000, episodes=1647, mean_return=261.7848022237822, ref_min_score=19.1,
             ref_max_score=417.3)),
    "local/pusher/medium-replay-v0": (
        dict(env_id="Pusher-v5", quality="medium-replay", steps=50_000, train_steps=100_000, medium_fraction=0.9),
        dict(transitions=25_000, episodes=250, mean_return=-71.97099669959934, ref_min_score=-150.7,
             ref_max_score=-34.0)),
    "local/hopper/medium-replay-v0": (
        dict(env_id="Hopper-v5", quality="medium-replay", steps=200_000, train_steps=60_000, medium_fraction=0.9),
        dict(transitions=34_839, episodes=546, mean_return=125.42854139075278, ref_min_score=19.1,
             ref_max_score=417.3)),
    "local/halfcheetah/medium-replay-v0": (
        dict(env_id="HalfCheetah-v5", quality="medium-replay", steps=100_000, train_steps=100_000,
             medium_fraction=0.9),
        dict(transitions=90_000, episodes=90, mean_return=1318.9783486655217, ref_min_score=-266.6,
             ref_max_score=4124.3)),
    "local/reacher/medium-expert-v0": (
        dict(env_id="Reacher-v5", quality="medium-expert", steps=20_000, train_steps=50_000),
        dict(transitions=20_000, mean_return=-17.639668559800864, ref_min_score=-43.5, ref_max_score=-4.9)),
}


def reference_dataset(r: DatasetRecipe) -> Optional[tuple[str, dict]]:
    """(its name, what it held) of the dataset the project's tables were measured on that ``r`` would remake (the
    same recipe under any name), or None when no table used this recipe."""
    from dataclasses import asdict, replace
    mine = asdict(replace(r, name=""))
    for name, (args, held) in REFERENCE_DATASETS.items():
        if asdict(DatasetRecipe(name="", **args)) == mine:
            return name, held
    return None


def reference_differences(r: DatasetRecipe, made: dict) -> Optional[list[str]]:
    """How a dataset made by ``r`` differs from the one the project's tables were measured on: one line per
    quantity that differs (transitions and episodes exactly; returns beyond the tables' 0.05 rounding), [] when it
    matches, None when no table used this recipe. ``made``: the made dataset's ``transitions``, ``episodes``,
    ``mean_return``, ``ref_min_score``, ``ref_max_score``."""
    ref = reference_dataset(r)
    if ref is None:
        return None
    name, held = ref
    out = []
    for key, want in held.items():
        got = made[key]
        if (got != want) if isinstance(want, int) else not abs(float(got) - want) <= 0.05:
            out.append(f"{key.replace('_', ' ')} {got:g} (the tables' {name}: {want:g})")
    return out


def _stored_recipe(info: dict) -> DatasetRecipe:
    """The recipe a ``make-dataset`` dataset's description (:func:`aepo_lite.rl.data.description_info`) holds."""
    return DatasetRecipe(**{**info["recipe"], "net_arch": tuple(info["recipe"]["net_arch"])})


def dataset_reference_differences(name: str) -> Optional[list[str]]:
    """:func:`reference_differences` of a local dataset, read from its stored recipe and data: [] when it is the
    dataset the project's tables were measured on, the quantities that differ when its recipe is one of theirs but
    its data are not, None when no table used its recipe (or ``make-dataset`` did not make it)."""
    import minari

    from aepo_lite.rl.data import description_info
    ds = minari.load_dataset(name)
    meta = ds.storage.metadata
    info = description_info(meta)
    if "recipe" not in info:
        return None
    return reference_differences(_stored_recipe(info), {
        "transitions": ds.total_steps, "episodes": ds.total_episodes,
        "mean_return": info.get("dataset_mean_episode_return", float("nan")),
        "ref_min_score": meta.get("ref_min_score"), "ref_max_score": meta.get("ref_max_score")})


# stable-baselines3 seeds numpy's legacy generator, which takes seeds below 2**32
SEED_HIGH = 2**32 - 1


def _check_recipe(r: DatasetRecipe) -> None:
    import gymnasium as gym
    from aepo_lite.rl.data import check_dataset_id, dataset_dir
    if r.quality not in QUALITIES:
        raise ValueError(f"quality: expected one of {QUALITIES}, got {r.quality!r}")
    check_dataset_id("name", r.name)  # Minari's grammar (and below: inside the Minari root)
    check_int("steps", r.steps, low=1)
    check_seed("seed", r.seed)
    check_int("seed", r.seed, low=0, high=SEED_HIGH)
    for k in ("train_steps", "eval_every", "eval_episodes", "learning_starts", "ref_episodes", "n_envs",
              "train_freq", "gradient_steps"):
        check_int(k, getattr(r, k), low=0 if k == "learning_starts" else 1)
    if r.eval_every > r.train_steps:  # no snapshot: found only after the reference episodes and the ladder
        raise ValueError(f"eval_every: {r.eval_every} is more than train_steps ({r.train_steps}), so the policy ladder "
                         "would have no snapshot; give a smaller --eval-every or more --train-steps")
    if not 0 < r.medium_fraction < 1:
        raise ValueError(f"medium_fraction: expected a value in (0, 1), got {r.medium_fraction}")
    if not (isinstance(r.collect_noise, (int, float)) and np.isfinite(r.collect_noise) and r.collect_noise >= 0):
        raise ValueError(f"collect_noise: expected a finite action-noise std >= 0, got {r.collect_noise!r}")
    dataset_dir(r.name, name="name")
    if not isinstance(r.env_id, str) or not r.env_id:
        raise ValueError(f"env: expected a Gymnasium environment id, got {r.env_id!r}")
    try:
        gym.spec(r.env_id)
    except Exception as e:  # gymnasium raises its own NameNotFound/VersionNotFound
        raise ValueError(f"env: unknown Gymnasium environment {r.env_id!r} ({e})") from None
    env = gym.make(r.env_id)
    try:
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"env: {r.env_id} has a {type(env.action_space).__name__} action space; "
                             "only continuous (Box) actions are supported")
    finally:
        env.close()


class _EpisodeRecorder:
    """Gymnasium wrapper keeping every finished training episode (for ``medium-replay``)."""

    def __new__(cls, env):
        import gymnasium as gym

        class Rec(gym.Wrapper):
            def __init__(self, env):
                super().__init__(env)
                self.episodes: list[dict] = []
                self.total_steps = 0
                self._cur = None

            def reset(self, **kw):
                obs, info = self.env.reset(**kw)
                self._cur = {"obs": [obs], "act": [], "rew": [], "term": [], "trunc": []}
                return obs, info

            def step(self, action):
                obs, r, term, trunc, info = self.env.step(action)
                c = self._cur
                c["obs"].append(obs), c["act"].append(np.asarray(action)), c["rew"].append(float(r))
                c["term"].append(bool(term)), c["trunc"].append(bool(trunc))
                self.total_steps += 1
                if term or trunc:
                    self.episodes.append({"end_step": self.total_steps, **{k: np.asarray(v) for k, v in c.items()}})
                return obs, r, term, trunc, info

        return Rec(env)


def _ladder_key(r: DatasetRecipe) -> str:
    arch = "x".join(str(h) for h in r.net_arch)
    return (f"{r.env_id}_seed{r.seed}_td3_{r.train_steps}steps_ls{r.learning_starts}_ev{r.eval_every}"
            f"_{arch}_tf{r.train_freq}g{r.gradient_steps}")


def train_policy_ladder(r: DatasetRecipe, cache: Optional[Path] = None, progress: bool = True) -> Path:
    """Train (or reuse) the TD3 policy ladder of ``r``; returns its directory holding
    ``ladder.json`` (step, eval return, snapshot path) and ``replay_episodes.npz``.

    The ladder trains on ``LADDER_THREADS`` (one) of torch's CPU threads, whatever the machine has: TD3's training
    follows every floating-point difference for tens of thousands of steps, and torch's CPU sums depend on the
    thread count. On two threads HalfCheetah's 100000-step ladder ended far from the one the committed dataset
    came from (its snapshot at step 90000 returned 1158 against 4214.5); on one it came out as committed
    (docs/results.md, "Remaking a dataset")."""
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        raise ValueError("quality: behaviour policies are trained with stable-baselines3; install the extra: "
                         "pip install 'aepo-lite[datasets]'  (or make a 'random' dataset)") from None
    out = Path(cache or policy_cache_dir()) / _ladder_key(r)
    if (out / "ladder.json").exists():
        return out
    from aepo_lite.device import torch_threads
    with torch_threads(LADDER_THREADS):
        _train_ladder(r, out, progress)
    return out


def _train_ladder(r: DatasetRecipe, out: Path, progress: bool) -> None:
    """:func:`train_policy_ladder`'s training, into ``out`` (through a ``.partial`` sibling, atomically)."""
    import gymnasium as gym
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise
    from tqdm.auto import tqdm

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.manual_seed(r.seed)
    env = _EpisodeRecorder(gym.make(r.env_id))
    d = env.action_space.shape[0]
    model = sb3.TD3("MlpPolicy", env, seed=r.seed, verbose=0, device="cpu", learning_starts=r.learning_starts,
                    train_freq=(r.train_freq, "step"), gradient_steps=r.gradient_steps, batch_size=256,
                    action_noise=NormalActionNoise(np.zeros(d), 0.1 * np.ones(d)),
                    policy_kwargs=dict(net_arch=list(r.net_arch)))
    ladder: list[dict] = []
    bar = tqdm(total=r.train_steps, desc=f"TD3 ladder {r.env_id}", disable=not progress)

    class Snap(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            if self.num_timesteps % r.eval_every == 0:
                path = tmp / f"td3_{self.num_timesteps}.zip"
                self.model.save(path)
                eps, _ = run_episodes(lambda: gym.make(r.env_id), _sb3_policy(self.model, 0.0, None),
                                      r.eval_episodes, seed=10_000 + r.seed * 1000, n_envs=r.eval_episodes)
                ret = float(np.mean([e.ret for e in eps]))
                ladder.append({"step": self.num_timesteps, "eval_return": ret, "path": path.name})
                bar.set_postfix(ret=f"{ret:.0f}")
            return True

    t0 = time.perf_counter()
    try:
        model.learn(total_timesteps=r.train_steps, callback=Snap())
        bar.close()
        eps = env.episodes
        np.savez_compressed(tmp / "replay_episodes.npz",
                            **{f"{k}_{i}": e[k] for i, e in enumerate(eps) for k in ("obs", "act", "rew", "term", "trunc")},
                            end_step=np.array([e["end_step"] for e in eps]))
        atomic_write_json(tmp / "ladder.json", {"recipe": asdict(r), "snapshots": ladder, "n_replay_episodes": len(eps),
                                                "train_seconds": time.perf_counter() - t0,
                                                "made_with": made_with()})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:  # interrupted or failed: no half ladder stays in the cache
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sb3_policy(model, noise: float, rng: Optional[np.random.Generator]) -> Callable[[np.ndarray], np.ndarray]:
    low, high = model.action_space.low, model.action_space.high

    def act(obs: np.ndarray) -> np.ndarray:
        a, _ = model.predict(obs.astype(np.float32), deterministic=True)
        a = np.asarray(a, dtype=np.float64).reshape(obs.shape[0], -1)
        if noise > 0:
            a = a + noise * rng.standard_normal(a.shape)
        return np.clip(a, low, high)

    return act


def _random_policy(action_space, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
    return lambda obs: rng.uniform(low, high, size=(obs.shape[0], low.shape[0]))


def _load_snapshot(ladder_dir: Path, snap: dict):
    from stable_baselines3 import TD3
    return TD3.load(ladder_dir / snap["path"], device="cpu")


def _replay_episodes(ladder_dir: Path, until_step: int, steps: int) -> list[Episode]:
    z = np.load(ladder_dir / "replay_episodes.npz")
    out, total = [], 0
    for i, end in enumerate(z["end_step"]):
        if end > until_step or total >= steps:
            break
        ep = Episode(seed=-1, ret=float(z[f"rew_{i}"].sum()), length=len(z[f"rew_{i}"]), terminated=bool(z[f"term_{i}"][-1]),
                     observations=z[f"obs_{i}"].astype(np.float64), actions=z[f"act_{i}"].astype(np.float64),
                     rewards=z[f"rew_{i}"].astype(np.float64), terminations=z[f"term_{i}"].astype(bool),
                     truncations=z[f"trunc_{i}"].astype(bool))
        keep = min(ep.length, steps - total)
        if keep < ep.length:  # cut at the budget: a timeout, not a termination
            ep = Episode(-1, float(ep.rewards[:keep].sum()), keep, False, ep.observations[:keep + 1], ep.actions[:keep],
                         ep.rewards[:keep], np.zeros(keep, bool), np.r_[np.zeros(keep - 1, bool), True])
        out.append(ep)
        total += keep
    return out


def _dataset_snapshot(name: str, which: str, policy_cache: Optional[Path]):
    """A ``make-dataset`` dataset's recipe, its ``which`` snapshot (an SB3 TD3 model) and its reference returns."""
    import minari
    if which not in ("medium", "expert"):
        raise ValueError(f"which: expected 'medium' or 'expert', got {which!r}")
    from aepo_lite.rl.data import description_info
    meta = minari.load_dataset(name).storage.metadata
    info = description_info(meta)
    if "recipe" not in info or f"{which}_snapshot_step" not in info:
        raise ValueError(f"name: {name} was not made by aepo-lite make-dataset with a {which} snapshot "
                         f"(its description has no recipe and {which}_snapshot_step)")
    recipe = _stored_recipe(info)
    if recipe.quality not in (which, "medium-expert"):
        raise ValueError(f"which: {name} is a {recipe.quality} dataset; its actions are not the {which} snapshot's")
    step = info[f"{which}_snapshot_step"]
    ladder_dir = train_policy_ladder(recipe, policy_cache, progress=False)
    snapshots = read_json(ladder_dir / "ladder.json")["snapshots"]
    _check_same_ladder(name, info.get("ladder"), snapshots, ladder_dir)
    model = _load_snapshot(ladder_dir, next(x for x in snapshots if x["step"] == step))
    return recipe, model, float(meta["ref_min_score"]), float(meta["ref_max_score"])


def _check_same_ladder(name: str, recorded, snapshots: list[dict], ladder_dir: Path) -> None:
    """Refuse a cached ladder other than the one that made dataset ``name``: its snapshots' evaluation returns must
    be those the dataset recorded (``recorded``, its description's ``ladder``; datasets made before it was recorded
    are not checked). A ladder trained again on another CPU, or one of another dataset's copy, has other snapshots
    under the same recipe, and a policy read from it would not be the one that made the data."""
    if not recorded:
        return
    mine = {int(x["step"]): float(x["eval_return"]) for x in snapshots}
    theirs = {int(x["step"]): float(x["eval_return"]) for x in recorded}
    differ = sorted(s for s in mine.keys() | theirs.keys()
                    if s not in mine or s not in theirs or not np.isclose(mine[s], theirs[s], rtol=1e-9, atol=1e-9))
    if differ:
        at = differ[0]
        raise ValueError(
            f"policy_cache: the ladder in {ladder_dir} is not the one that made {name} (at step {at} its snapshot "
            f"evaluates to {mine.get(at, 'nothing')}, the dataset recorded {theirs.get(at, 'nothing')}); point "
            "AEPO_POLICY_CACHE (or policy_cache) at the ladder made with the dataset: a ladder trained again, on "
            "another CPU or for another copy, is another policy")


def make_dataset(recipe: DatasetRecipe, *, overwrite: bool = False, progress: bool = True,
                 policy_cache: Optional[Path] = None):
    """Build the dataset ``recipe.name`` in the local Minari root and return the ``MinariDataset``.

    Refuses to overwrite an existing dataset unless ``overwrite``. Runs on ``LADDER_THREADS`` (one) torch thread,
    as its ladder does (:func:`train_policy_ladder`): the policies are small.
    """
    from aepo_lite.device import torch_threads
    with torch_threads(LADDER_THREADS):
        return _make_dataset(recipe, overwrite, progress, policy_cache)


def _make_dataset(recipe: DatasetRecipe, overwrite: bool, progress: bool, policy_cache: Optional[Path]):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    from aepo_lite.rl.data import dataset_dir
    _check_recipe(recipe)
    r = recipe
    folder = dataset_dir(r.name, name="name")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"name: the dataset {r.name!r} already exists locally ({folder}); pass --overwrite to "
                              "rebuild it")
    make_env = lambda: gym.make(r.env_id)  # noqa: E731
    probe = make_env()
    space = probe.action_space
    probe.close()
    t0 = time.perf_counter()
    rng = np.random.default_rng(r.seed)
    # reference returns first: random and (when a ladder is needed) expert, >= ref_episodes each
    rand_eps, _ = run_episodes(make_env, _random_policy(space, np.random.default_rng(r.seed + 1)), r.ref_episodes,
                               seed=1_000_000 + r.seed, n_envs=r.n_envs, progress=progress, desc="ref: random")
    ref_min = float(np.mean([e.ret for e in rand_eps]))
    info = {"recipe": asdict(r), "ref_min_policy": "uniform random actions",
            "ref_episodes": r.ref_episodes, "made_with": made_with()}
    ladder_dir = train_policy_ladder(r, policy_cache, progress)
    lad = read_json(ladder_dir / "ladder.json")
    snaps = lad["snapshots"]
    if not snaps:
        raise ValueError(f"train_steps: {r.train_steps} steps gave no snapshot (eval_every={r.eval_every})")
    expert = max(snaps, key=lambda s: s["eval_return"])
    target = ref_min + r.medium_fraction * (expert["eval_return"] - ref_min)
    medium = next(s for s in snaps if s["eval_return"] >= min(target, expert["eval_return"]))
    expert_model = _load_snapshot(ladder_dir, expert)
    exp_eps, _ = run_episodes(make_env, _sb3_policy(expert_model, 0.0, None), r.ref_episodes,
                              seed=2_000_000 + r.seed, n_envs=r.n_envs, progress=progress, desc="ref: expert")
    ref_max = float(np.mean([e.ret for e in exp_eps]))
    if ref_max <= ref_min:  # before collecting: the scores of this dataset would be undefined or inverted
        raise ValueError(f"train_steps: the best policy of the {r.train_steps}-step ladder returns {ref_max:.1f}, no "
                         f"better than random actions ({ref_min:.1f}), so it cannot serve as ref_max_score; give more "
                         "--train-steps (or --learning-starts fewer)")
    check_reference_scores(r.name, {"ref_min_score": ref_min, "ref_max_score": ref_max})
    info.update({"ref_max_policy": f"best TD3 snapshot of a {r.train_steps}-step budget (step {expert['step']}), "
                                   "deterministic; not an expert in D4RL's sense",
                 "ladder": snaps, "ladder_made_with": lad.get("made_with"),  # None: a ladder from before the record
                 "expert_snapshot_step": expert["step"], "medium_snapshot_step": medium["step"],
                 "medium_target_return": target})

    episodes = _collect(r, make_env, space, rng, ladder_dir, medium, expert_model)
    obs_space = gym.make(r.env_id).observation_space
    buffers = [EpisodeBuffer(id=i, observations=e.observations.astype(obs_space.dtype),
                             actions=e.actions.astype(space.dtype), rewards=e.rewards,
                             terminations=e.terminations, truncations=e.truncations, infos={})
               for i, e in enumerate(episodes)]
    info["dataset_mean_episode_return"] = float(np.mean([e.ret for e in episodes]))
    info["make_seconds"] = time.perf_counter() - t0
    with warnings.catch_warnings():  # minari asks for an author e-mail; there is none to give
        warnings.filterwarnings("ignore", message=".*author_email.*")
        return _create_in_place(folder, lambda: _create(minari, r, buffers, ref_min, ref_max, info))


def _collect(r: DatasetRecipe, make_env, space, rng, ladder_dir: Path, medium: dict, expert_model) -> list:
    """The recipe's episodes: its quality's policy (or the ladder's replay buffer) for ``r.steps`` transitions."""
    def collect(policy, n_steps, seed0, desc):
        eps, _ = run_episodes(make_env, policy, 10**9, seed=seed0, n_envs=r.n_envs, record=True,
                              max_transitions=n_steps, progress=False, desc=desc)
        return eps

    if r.quality == "random":
        return collect(_random_policy(space, rng), r.steps, 3_000_000 + r.seed, "random")
    if r.quality == "medium":
        return collect(_sb3_policy(_load_snapshot(ladder_dir, medium), r.collect_noise, rng), r.steps,
                       3_000_000 + r.seed, "medium")
    if r.quality == "expert":
        return collect(_sb3_policy(expert_model, r.collect_noise, rng), r.steps, 3_000_000 + r.seed, "expert")
    if r.quality == "medium-replay":
        return _replay_episodes(ladder_dir, medium["step"], r.steps)
    half = r.steps // 2  # medium-expert
    return (collect(_sb3_policy(_load_snapshot(ladder_dir, medium), r.collect_noise, rng), half,
                    3_000_000 + r.seed, "medium")
            + collect(_sb3_policy(expert_model, r.collect_noise, rng), r.steps - half, 4_000_000 + r.seed, "expert"))


def _create_in_place(folder: Path, create):
    """Run ``create()`` (which writes the dataset ``folder``) so that a failure leaves nothing behind.

    An existing dataset there is moved aside to a hidden sibling (Minari skips hidden folders) and
    restored if ``create`` fails or is interrupted; namespace folders that ``create`` made are removed."""
    from minari.storage.datasets_root_dir import get_dataset_path
    root = Path(os.path.abspath(get_dataset_path()))
    new_dirs = [d for d in [folder, *folder.parents] if root in d.parents and not d.exists()]
    backup = None
    if folder.exists():
        backup = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(folder, backup)
    try:
        ds = create()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for d in new_dirs:  # innermost first; only folders this make created
            shutil.rmtree(d, ignore_errors=True)
        if backup is not None:
            os.replace(backup, folder)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return ds


def _create(minari, r, buffers, ref_min, ref_max, info):
    return minari.create_dataset_from_buffers(
        r.name, buffers, env=r.env_id, eval_env=r.env_id, algorithm_name=f"aepo-lite make-dataset ({r.quality})",
        author="aepo-lite", code_permalink="aepo_lite/rl/datasets.py", ref_min_score=ref_min, ref_max_score=ref_max,
        num_episodes_average_score=r.ref_episodes, description=json.dumps(info, default=str))
