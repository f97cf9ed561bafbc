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

import hashlib
import json
import math
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
           "dataset_reference_differences", "make_dataset", "train_policy_ladder", "policy_cache_dir", "made_with",
           "snapshot_noise_scores", "snapshot_oracle_scores", "rollout_returns", "snapshot_q_errors", "QProbes",
           "probe_q_states", "q_error_rows", "state_from_observation", "exact_q_labels"]

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


def snapshot_noise_scores(name: str, noises=(0.0, 0.1, 0.2), episodes: int = 30, seed: int = 100_000,
                          which: str = "medium", policy_cache: Optional[Path] = None) -> list[dict]:
    """How a ``make-dataset`` dataset's own policy scores with Gaussian action noise of each std in ``noises``
    (clipped to the box): does the return depend on the actions at the data's noise scale? ``which``: the
    recipe's ``medium`` or ``expert`` snapshot (read from the dataset's description; its ladder from the policy
    cache, trained as ``make-dataset`` would if absent). One dict per noise: ``noise``, ``return_mean``,
    ``score_mean`` / ``score_std`` (normalised with the dataset's reference scores), ``episodes``."""
    import gymnasium as gym
    check_int("episodes", episodes, low=1)
    if any(not np.isfinite(x) or x < 0 for x in noises):
        raise ValueError(f"noises: expected finite stds >= 0, got {list(noises)}")
    recipe, model, lo, hi = _dataset_snapshot(name, which, policy_cache)
    out = []
    for noise in noises:
        eps, _ = run_episodes(lambda: gym.make(recipe.env_id), _sb3_policy(model, float(noise),
                              np.random.default_rng(seed)), episodes, seed=seed, n_envs=min(10, episodes))
        ret = np.array([e.ret for e in eps])
        score = (ret - lo) / (hi - lo) * 100
        out.append({"noise": float(noise), "return_mean": float(ret.mean()), "score_mean": float(score.mean()),
                    "score_std": float(score.std()), "episodes": episodes})
    return out


def _mujoco_state(env) -> dict:
    """The physics state a MuJoCo Gymnasium environment's step depends on (``rollout_returns`` restores it)."""
    d = env.data
    return {"qpos": d.qpos.copy(), "qvel": d.qvel.copy(), "act": d.act.copy(), "time": float(d.time),
            "qacc_warmstart": d.qacc_warmstart.copy()}


def _restore_mujoco_state(env, state: dict) -> None:
    import mujoco
    d = env.data
    d.qpos[:], d.qvel[:], d.act[:] = state["qpos"], state["qvel"], state["act"]
    d.time = state["time"]
    d.qacc_warmstart[:] = state["qacc_warmstart"]
    mujoco.mj_forward(env.model, d)


def rollout_returns(state, scratch: list, first_actions: np.ndarray, policy: Callable[[np.ndarray], np.ndarray],
                    continuation_noise: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo returns of taking each row of ``first_actions`` from one MuJoCo ``state`` and then following
    ``policy``: sum_k gamma^k r_k over ``1 + len(continuation_noise)`` steps, or up to a termination.

    ``state``: one physics state (:func:`_mujoco_state`) for every candidate, or a list of them, one per candidate
    (many states' rollouts stepped together, the policy called once a step for all of them).
    ``scratch``: one unwrapped MuJoCo environment per candidate (their own physics, restored to its state).
    ``policy(obs) -> actions`` is the deterministic part; ``continuation_noise`` (steps - 1, act_dim) is added
    to it at each later step, the same draws for every candidate (common random numbers: the candidates'
    returns differ by their first action, not by luck of the continuation), or (n, steps - 1, act_dim): each
    candidate's own draws (a whole trajectory per candidate). Actions are clipped to the box."""
    n = len(first_actions)
    if len(scratch) < n:
        raise ValueError(f"scratch: expected at least {n} environments (one per candidate), got {len(scratch)}")
    continuation_noise = np.asarray(continuation_noise, dtype=float)
    if continuation_noise.ndim == 3:
        if len(continuation_noise) != n:
            raise ValueError(f"continuation_noise: expected one row of draws per candidate ({n}), got "
                             f"{len(continuation_noise)}")
        continuation_noise = np.moveaxis(continuation_noise, 0, 1)  # (steps - 1, n, act_dim): indexed by step below
    states = state if isinstance(state, (list, tuple)) else [state] * n
    if len(states) != n:
        raise ValueError(f"state: expected one physics state per candidate ({n}), got {len(states)}")
    low, high = scratch[0].action_space.low, scratch[0].action_space.high
    for env, st in zip(scratch[:n], states):
        _restore_mujoco_state(env, st)
    returns, alive, disc = np.zeros(n), np.ones(n, bool), 1.0
    actions = np.clip(first_actions, low, high)
    obs = None
    for k in range(1 + len(continuation_noise)):
        for i in np.flatnonzero(alive):
            o, r, terminated, _, _ = scratch[i].step(actions[i])
            if obs is None:
                obs = np.zeros((n, len(o)))
            obs[i] = o
            returns[i] += disc * r
            alive[i] = not terminated
        disc *= gamma
        if k == len(continuation_noise) or not alive.any():
            break
        actions = np.clip(policy(obs) + continuation_noise[k], low, high)
    return returns


def state_from_observation(env, obs: np.ndarray) -> dict:
    """The physics state (:func:`_mujoco_state`'s form) of a locomotion observation that holds every position but
    the forward one and every velocity (Hopper, Walker2d, HalfCheetah): the forward position set to 0 (their
    rewards and dynamics do not depend on it), the solver's warm start zero. InvertedDoublePendulum's observation
    (cart position, the two angles' sines and cosines, the three velocities, a constraint force) is read as its
    positions (angles by atan2) and velocities. Observations of another layout are refused. Hopper, Walker2d and
    InvertedDoublePendulum clip the velocities they report (at 10), so a state rebuilt from a clipped one is not the
    state that was observed."""
    m = env.unwrapped.model
    obs = np.asarray(obs, dtype=float)
    d = env.unwrapped.data
    if env.spec is not None and env.spec.id.startswith("InvertedDoublePendulum"):
        if obs.shape != (1 + 2 * (m.nq - 1) + m.nv + 1,):
            raise ValueError(f"obs: expected {1 + 2 * (m.nq - 1) + m.nv + 1} values (cart position, sines, cosines, "
                             f"velocities, a constraint force) for {env.spec.id}, got shape {obs.shape}")
        k = m.nq - 1
        qpos = np.r_[obs[0], np.arctan2(obs[1:1 + k], obs[1 + k:1 + 2 * k])]
        return {"qpos": qpos, "qvel": obs[1 + 2 * k:1 + 2 * k + m.nv].copy(), "act": np.zeros_like(d.act),
                "time": 0.0, "qacc_warmstart": np.zeros(m.nv)}
    if obs.shape != (m.nq - 1 + m.nv,):
        raise ValueError(f"obs: expected {m.nq - 1 + m.nv} values (positions but the first, then velocities) for "
                         f"{env.spec.id if env.spec else 'this environment'}, got shape {obs.shape}")
    return {"qpos": np.r_[0.0, obs[:m.nq - 1]], "qvel": obs[m.nq - 1:].copy(), "act": np.zeros_like(d.act),
            "time": 0.0, "qacc_warmstart": np.zeros(m.nv)}


CONTINUATION_SEED = 20261204  # exact_q_labels' noisy continuations: draw m is default_rng([CONTINUATION_SEED, m])


def exact_q_labels(name: str, observations: np.ndarray, actions: np.ndarray, horizon: int = 300, gamma: float = 0.99,
                   which: str = "medium", batch: int = 256, policy_cache: Optional[Path] = None,
                   progress: bool = False, continuation_noise: float = 0.0, draws: int = 1,
                   first_draw: int = 0) -> np.ndarray:
    """The exact action values of :func:`probe_q_states` (the action, then the deterministic ``which`` snapshot for
    ``horizon - 1`` steps or to a termination, discounted by ``gamma``; raw reward units) for arbitrary
    (observation, action) pairs of a ``make-dataset`` dataset, such as its own transitions: the physics rebuilt
    from each observation (:func:`state_from_observation`), ``batch`` rollouts stepped together. Actions in the
    environment's units. A target for a critic that needs no bootstrapping and carries no noise of the data's.

    ``continuation_noise`` > 0: the snapshot plus N(0, continuation_noise^2) at every later step (the data's policy
    when it is the recipe's ``collect_noise``), the mean over ``draws`` noise sequences, draw m (counted from
    ``first_draw``) the same sequence for every pair (common random numbers: pairs differ by their state and action,
    not by the luck of their draws; disjoint ``first_draw`` ranges give independent estimates). A Monte-Carlo
    estimate of the data policy's own Q, the critic's target in expectation."""
    from tqdm.auto import tqdm
    check_int("horizon", horizon, low=1)
    check_int("batch", batch, low=1)
    check_int("draws", draws, low=1)
    check_int("first_draw", first_draw, low=0)
    if not (np.isfinite(gamma) and 0 < gamma <= 1):
        raise ValueError(f"gamma: expected a discount in (0, 1], got {gamma!r}")
    if not (np.isfinite(continuation_noise) and continuation_noise >= 0):
        raise ValueError(f"continuation_noise: expected a finite action-noise std >= 0, got {continuation_noise!r}")
    if continuation_noise == 0 and (draws, first_draw) != (1, 0):
        raise ValueError(f"draws/first_draw: the deterministic continuation (continuation_noise 0) has one value a "
                         f"pair; got draws {draws} and first_draw {first_draw}")
    observations, actions = np.asarray(observations, dtype=float), np.asarray(actions, dtype=float)
    if observations.ndim != 2 or actions.ndim != 2 or len(observations) != len(actions):
        raise ValueError(f"observations, actions: expected (n, k) and (n, d) arrays of one length, got "
                         f"{observations.shape} and {actions.shape}")
    recipe, model, _, _ = _dataset_snapshot(name, which, policy_cache)
    env, scratch = _mujoco_envs(name, recipe.env_id, min(batch, max(len(observations), 1)), 0, "the exact values")
    mean_action, d = _sb3_policy(model, 0.0, None), actions.shape[1]
    noises = [continuation_noise * np.random.default_rng([CONTINUATION_SEED, m]).standard_normal((horizon - 1, d))
              for m in range(first_draw, first_draw + draws)]
    out = np.empty(len(observations))
    try:
        for i in tqdm(range(0, len(observations), batch), desc="exact action values", disable=not progress,
                      leave=False):
            j = slice(i, i + batch)
            states = [state_from_observation(env, o) for o in observations[j]]
            out[j] = np.mean([rollout_returns(states, scratch, actions[j], mean_action, z, gamma) for z in noises], 0)
    finally:
        for e in (env, *scratch):
            e.close()
    return out


def _mujoco_envs(name: str, env_id: str, n: int, seed: int, what: str):
    """An environment of ``env_id`` to act in and ``n`` unwrapped scratch copies (reset with seeds ``seed + i``) for
    :func:`rollout_returns`; a clear error when it is not a MuJoCo environment (``what`` names the user)."""
    import gymnasium as gym
    env = gym.make(env_id)
    if not hasattr(env.unwrapped, "set_state"):
        env.close()
        raise ValueError(f"name: {name}'s environment {env_id} is not a MuJoCo one; {what} restores MuJoCo physics "
                         "states")
    scratch = [gym.make(env_id).unwrapped for _ in range(n)]
    for i, s in enumerate(scratch):
        s.reset(seed=seed + i)
    return env, scratch


class _EpisodeCheckpoint:
    """One oracle episode's progress, written atomically as it goes so that a killed run resumes at the step it last
    saved: the actions taken, the candidates' generator state and the sequence search's kept plan. On resume the
    actions are replayed from the episode's reset, which must reach the observation saved with them again (the check
    that the physics is the one that made the file). ``path`` None: nothing is saved or resumed. ``every``: seconds
    at least between two writes (and at the episode's end), so that cheap episodes do not spend their time writing
    (a write a step made a 1000-step episode of N = 1 take 18 s); a step that searches for minutes is saved as it ends."""

    def __init__(self, path: Optional[Path] = None, every: float = 5.0):
        self.path, self.actions, self.every, self.written = (None if path is None else Path(path)), [], every, -math.inf

    def resume(self, env, obs: np.ndarray, rng, bar=None) -> tuple:
        """(observation, return, steps, done, kept plan) of the episode after replaying the saved actions in ``env``
        (just reset, at ``obs``), ``rng`` set to the saved state; the episode's start when nothing is saved."""
        if self.path is None or not self.path.is_file():
            return obs, 0.0, 0, False, None
        saved = read_json(self.path)
        ret, done = 0.0, False
        for a in saved["actions"]:
            obs, r, terminated, truncated, _ = env.step(np.asarray(a))
            ret, done = ret + float(r), terminated or truncated
        if not np.array_equal(obs, np.asarray(saved["obs"])):
            raise ValueError(f"resume_dir: replaying the {len(saved['actions'])} actions saved in {self.path} from the "
                             "episode's reset does not reach the observation saved with them (made by another MuJoCo "
                             "version or machine?); delete the file to run the episode afresh")
        rng.bit_generator.state = saved["rng"]
        self.actions = saved["actions"]
        if bar is not None:
            bar.update(len(self.actions))
            getattr(bar, "refresh", lambda: None)()  # shown at once (tqdm skips an update within 0.1 s of the last)
        kept = saved["kept"]
        return obs, ret, len(self.actions), done, (None if kept is None else np.asarray(kept, dtype=float))

    def save(self, action: np.ndarray, obs: np.ndarray, rng, kept: Optional[np.ndarray] = None,
             done: bool = False) -> None:
        """Record one step taken (``action``, reaching ``obs``) with the generator's state after it; written when
        ``every`` seconds have passed since the last write, or the episode is ``done``."""
        if self.path is None:
            return
        self.actions.append(np.asarray(action, dtype=float).tolist())
        if not done and time.monotonic() - self.written < self.every:
            return
        self.written = time.monotonic()
        atomic_write_json(self.path, {"actions": self.actions, "obs": np.asarray(obs, dtype=float).tolist(),
                                      "rng": rng.bit_generator.state, "kept": None if kept is None else kept.tolist()})


def _policy_digest(model) -> str:
    """A digest of an SB3 model's policy weights: which snapshot acted (a dataset remade under its name, or on
    another CPU, has other weights)."""
    h = hashlib.sha256()
    for k, v in sorted(model.policy.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoint_path(resume_dir: Optional[Path], settings: dict, ep: int) -> Optional[Path]:
    """The file of episode ``ep`` of an oracle row of ``settings`` in ``resume_dir`` (None: no checkpoints), named by
    a digest of the settings (the snapshot's weights among them) so that rows of other settings never share it."""
    if resume_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(resume_dir) / f"{settings['search']}-n{settings['candidates']}-{digest}-ep{ep}.json"


def _oracle_episode(env, scratch, mean_action, n: int, reset_seed: int, rng, noise: float, continuation_noise: float,
                    horizon: int, gamma: float, draws: int = 1, bar=None,
                    ckpt: Optional[_EpisodeCheckpoint] = None) -> tuple[float, int]:
    """One episode of :func:`snapshot_oracle_scores`' best-of-``n`` policy: (its return, its length). Each candidate
    is scored by the mean of ``draws`` rollouts, draw m's continuation noise the same for every candidate. ``bar``:
    a progress bar advanced once a step (or None); ``ckpt``: where the episode is saved as it goes and resumed
    from."""
    low, high = env.action_space.low, env.action_space.high
    limit = env.spec.max_episode_steps or 10**9
    ckpt = ckpt or _EpisodeCheckpoint()
    obs, ret, t, done, _ = ckpt.resume(env, env.reset(seed=reset_seed)[0], rng, bar)
    while not done:
        a0 = mean_action(obs[None])[0]
        first = np.clip(a0 + noise * rng.standard_normal((n, a0.shape[0])), low, high)
        if n > 1:
            steps = min(horizon, limit - t)
            z = continuation_noise * rng.standard_normal((steps - 1, a0.shape[0])) if draws == 1 else \
                np.tile(continuation_noise * rng.standard_normal((draws, steps - 1, a0.shape[0])), (n, 1, 1))
            g = rollout_returns(_mujoco_state(env.unwrapped), scratch, np.repeat(first, draws, 0), mean_action, z,
                                gamma).reshape(n, draws).mean(1)  # row i * draws + m: candidate i, draw m
            first = first[[int(np.argmax(g))]]
        obs, r, terminated, truncated, _ = env.step(first[0])
        ret, t, done = ret + float(r), t + 1, terminated or truncated
        ckpt.save(first[0], obs, rng, done=done)
        if bar is not None:
            bar.update(1)
    return ret, t


def _sequence_episode(env, scratch, mean_action, n: int, reset_seed: int, rng, noise: float, horizon: int,
                      gamma: float, bar=None, ckpt: Optional[_EpisodeCheckpoint] = None) -> tuple[float, int]:
    """One episode of :func:`snapshot_oracle_scores`' sequence search: at every step n whole trajectories of the
    data's policy (the snapshot plus noise of std ``noise`` at each of ``horizon`` steps, each candidate its own
    draws) are rolled out from the current state, the best one's first action is taken, and the rest of its draws is
    candidate 0 at the next step (so with gamma 1 and a horizon to the time limit the episode returns at least the
    best return found at any step: the search can only improve on its plan). (its return, its length). ``bar`` and
    ``ckpt`` as in :func:`_oracle_episode`."""
    low, high = env.action_space.low, env.action_space.high
    limit = env.spec.max_episode_steps or 10**9
    ckpt = ckpt or _EpisodeCheckpoint()
    obs, ret, t, done, kept = ckpt.resume(env, env.reset(seed=reset_seed)[0], rng, bar)
    while not done:
        a0 = mean_action(obs[None])[0]
        steps = min(horizon, limit - t)
        z = noise * rng.standard_normal((n, steps, a0.shape[0]))
        if kept is not None:
            z[0, :len(kept)] = kept[:steps]
        g = rollout_returns(_mujoco_state(env.unwrapped), scratch, np.clip(a0 + z[:, 0], low, high), mean_action,
                            z[:, 1:], gamma)
        best = int(np.argmax(g))
        kept, action = z[best, 1:], np.clip(a0 + z[best, 0], low, high)
        obs, r, terminated, truncated, _ = env.step(action)
        ret, t, done = ret + float(r), t + 1, terminated or truncated
        ckpt.save(action, obs, rng, kept, done)
        if bar is not None:
            bar.update(1)
    return ret, t


ORACLE_SEARCHES = ("step", "sequence")


def _episode_bar(env, ep: int, progress: bool):
    """A progress bar over episode ``ep``'s steps (an oracle episode of a large N runs for hours on a CPU core): the
    steps taken of the time limit, the time so far and a step's time, without an estimate of the time left, since an
    episode may end long before its limit at a fall (Hopper medium's after about 130 of 1000 steps)."""
    from tqdm.auto import tqdm
    return tqdm(total=env.spec.max_episode_steps, desc=f"episode {ep}: steps", unit="step", disable=not progress,
                leave=False, bar_format="{desc} {n_fmt} of at most {total_fmt} [{elapsed}, {rate_fmt}]")


def _play_oracle_episode(env, scratch, mean_action, row: dict, ep: int, seed: int, ckpt: _EpisodeCheckpoint,
                         progress: bool) -> tuple[float, int]:
    """Episode ``ep`` of :func:`snapshot_oracle_scores`' row ``row`` (its search, N, noises, horizon, gamma and
    draws): reset with seed ``seed + ep``, candidates drawn from the generator seeded by (``seed``, N, ``ep``),
    resumed from and saved to ``ckpt``. (its return, its length)."""
    n, rng = row["candidates"], np.random.default_rng([seed, row["candidates"], ep])
    with _episode_bar(env, ep, progress) as bar:
        if row["search"] == "sequence":
            return _sequence_episode(env, scratch, mean_action, n, seed + ep, rng, row["noise"], row["horizon"],
                                     row["gamma"], bar, ckpt)
        return _oracle_episode(env, scratch, mean_action, n, seed + ep, rng, row["noise"], row["continuation_noise"],
                               row["horizon"], row["gamma"], row["continuation_draws"], bar, ckpt)


def _check_continuation(search: str, continuation_noise: float, continuation_draws: int) -> None:
    """:func:`snapshot_oracle_scores`' search and continuation arguments, each error naming its argument."""
    if not (np.isfinite(continuation_noise) and continuation_noise >= 0):
        raise ValueError(f"continuation_noise: expected a finite std >= 0, got {continuation_noise!r}")
    if search not in ORACLE_SEARCHES:
        raise ValueError(f"search: expected one of {ORACLE_SEARCHES}, got {search!r}")
    check_int("continuation_draws", continuation_draws, low=1)
    if continuation_draws > 1 and (continuation_noise == 0 or search != "step"):
        raise ValueError(f"continuation_draws: several draws average noisy continuations of the step search; got "
                         f"{continuation_draws} with continuation_noise {continuation_noise!r} and search {search!r}")
    if search == "sequence" and continuation_noise != 0:
        raise ValueError("continuation_noise: the sequence search draws every step's noise with `noise` (each "
                         f"candidate its own); leave continuation_noise at 0, got {continuation_noise!r}")


def _check_oracle_counts(candidates, horizon, episodes, first_episode, seed, gamma) -> list[int]:
    """:func:`snapshot_oracle_scores`' counts, seed and discount checked; the candidate counts as a list."""
    cands = [check_int("candidates", c, low=1) for c in candidates]
    if not cands:
        raise ValueError("candidates: expected at least one count")
    check_int("horizon", horizon, low=1)
    check_int("episodes", episodes, low=1)
    check_int("first_episode", first_episode, low=0)
    check_seed("seed", seed)
    if not (np.isfinite(gamma) and 0 < gamma <= 1):
        raise ValueError(f"gamma: expected a discount in (0, 1], got {gamma!r}")
    return cands


def snapshot_oracle_scores(name: str, candidates=(1, 4, 16), horizon: int = 1000, episodes: int = 5,
                           gamma: float = 1.0, seed: int = 100_000, which: str = "medium", noise: Optional[float] = None,
                           continuation_noise: float = 0.0, policy_cache: Optional[Path] = None,
                           progress: bool = False, search: str = "step", continuation_draws: int = 1,
                           first_episode: int = 0, resume_dir: Optional[Path] = None) -> list[dict]:
    """What the best of N of a dataset's own actions is worth when chosen by the *true* return (an oracle):
    the upper end of what one step of in-support policy improvement can gain on a ``make-dataset`` dataset.

    At every step of an episode, N candidate actions are drawn from the data's policy (the ``which`` snapshot's
    action plus N(0, ``noise``^2), ``noise`` the recipe's ``collect_noise`` by default: the behaviour's support),
    each is scored by a rollout from the current physics state (the candidate, then the snapshot's policy for
    ``horizon - 1`` steps with action noise of std ``continuation_noise``, discounted by ``gamma``, the same
    continuation noise for every candidate; see :func:`rollout_returns`), and the best is taken. N = 1 is the
    data's policy itself. By default (``continuation_noise=0``, ``gamma=1``, a horizon past the time limit) the
    continuation is the deterministic snapshot, so each score is that policy's exact Q(s, a), its return to the
    episode's end: the best is one policy-improvement step over that policy, restricted to the N support actions.
    With the data's noise in the continuation a rollout is one draw of Q of the data's policy; on Hopper medium one
    draw ranked the candidates no better than taking the first (docs/results.md). ``continuation_draws`` M > 1
    scores each candidate by the mean of M such rollouts (draw m's noise shared by every candidate: common random
    numbers), an estimate of the data policy's own Q: then the row is the policy-improvement step over the data's
    policy that an in-support method with a perfect critic of that policy takes at N candidates (M x the
    rollouts). A critic that ranked the support as well as these rollouts, at the same N, would score this. MuJoCo
    environments only (their state is restored for each rollout).

    ``search="sequence"`` searches over whole trajectories within the support instead of first actions: at every
    step N trajectories of the data's own policy (noise of std ``noise`` at every step, each candidate its own
    draws; ``continuation_noise`` must stay 0 and the row records ``noise`` there) are rolled out, the best one's
    first action is taken and the rest of its draws is kept as a candidate for the next step (a receding-horizon
    search, several steps of improvement; with gamma 1 and a horizon past the time limit each episode returns at
    least the best trajectory found along it). Every action taken is one the data's policy could draw at its state.

    Episode i (``first_episode <= i < first_episode + episodes``) resets with seed ``seed + i`` and draws its
    candidates from its own generator, seeded by (``seed``, N, i), so episodes can be split across processes
    (``first_episode``) and their rows joined (:func:`aepo_lite.rl.diagnostics.join_oracle_parts`) into the row one
    process would have written. ``resume_dir``: a folder where each episode is saved as it goes (one file per episode,
    named by the row's settings; at most every 5 s, so every step of a slow search), so that a killed run resumes
    and a rerun replays finished episodes instead of searching them again (an episode at N = 256 runs for hours on a
    CPU core).

    One dict per N: ``search``, ``candidates``, ``horizon``, ``gamma``, ``noise``, ``data_noise`` (the recipe's
    ``collect_noise``: candidates with ``noise`` equal to it are the data's support), ``continuation_noise``, ``return_mean``,
    ``score_mean`` / ``score_std`` (normalised with the dataset's reference scores), ``length_mean``,
    ``episodes``, ``first_episode``, ``episode_scores`` (each episode's normalised score, in order), ``seconds``."""
    from tqdm.auto import tqdm
    cands = _check_oracle_counts(candidates, horizon, episodes, first_episode, seed, gamma)
    recipe, model, lo, hi = _dataset_snapshot(name, which, policy_cache)
    noise = recipe.collect_noise if noise is None else noise
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise: expected a finite std >= 0, got {noise!r}")
    _check_continuation(search, continuation_noise, continuation_draws)
    env, scratch = _mujoco_envs(name, recipe.env_id, max(cands) * continuation_draws, seed, "the oracle")
    mean_action, policy, out = _sb3_policy(model, 0.0, None), _policy_digest(model), []
    try:
        for n in cands:
            t0 = time.perf_counter()
            row = {"search": search, "candidates": n, "horizon": horizon, "gamma": float(gamma), "noise": float(noise),
                   "data_noise": float(recipe.collect_noise),
                   "continuation_noise": float(noise if search == "sequence" else continuation_noise),
                   "continuation_draws": continuation_draws}
            rets, lens = [], []
            for ep in tqdm(range(first_episode, first_episode + episodes), desc=f"oracle best of {n} ({search})",
                           disable=not progress, leave=False):
                ckpt = _EpisodeCheckpoint(_checkpoint_path(resume_dir, {"dataset": name, "which": which, "seed": seed,
                                                                        "policy": policy, **row}, ep))
                ret, t = _play_oracle_episode(env, scratch, mean_action, row, ep, seed, ckpt, progress)
                rets.append(ret)
                lens.append(t)
            score = (np.array(rets) - lo) / (hi - lo) * 100
            out.append({**row, "return_mean": float(np.mean(rets)), "score_mean": float(score.mean()),
                        "score_std": float(score.std()), "length_mean": float(np.mean(lens)), "episodes": episodes,
                        "first_episode": first_episode, "episode_scores": [float(v) for v in score],
                        "seconds": time.perf_counter() - t0})
    finally:
        env.close()
        for s in scratch:
            s.close()
    return out


def _support_width(name: str, recipe: DatasetRecipe) -> float:
    """The data's action-noise std (the recipe's ``collect_noise``), the unit the support measures use; refused
    when the data was collected without noise."""
    noise = float(recipe.collect_noise)
    if not noise > 0:
        raise ValueError(f"name: {name} was collected without action noise (collect_noise {noise}): no spread to "
                         "measure against")
    return noise


def _spread_stats(z: np.ndarray) -> dict:
    """z (steps, action dims) in units of the data's noise std -> its RMS and the share of steps with some
    action dimension beyond 3 stds (under the data's own noise, unclipped: 1 - 0.9973^d, 0.8% for d = 3)."""
    return {"steps": len(z), "z_rms": float(np.sqrt(np.mean(z ** 2))),
            "beyond3": float(np.mean(np.any(np.abs(z) > 3, axis=1)))}


def _data_spread(name: str, mean_action, noise: float, lo: float, hi: float) -> dict:
    """:func:`snapshot_action_spread`'s row of the dataset's own transitions."""
    import minari
    obs, act, rets = [], [], []
    for ep in minari.load_dataset(name).iterate_episodes():
        obs.append(ep.observations[:-1])
        act.append(ep.actions)
        rets.append(float(np.sum(ep.rewards)))
    z = (np.concatenate(act) - mean_action(np.concatenate(obs))) / noise
    score = (np.array(rets) - lo) / (hi - lo) * 100
    return {"label": "data", "episodes": len(rets), **_spread_stats(z), "score_mean": float(score.mean()),
            "score_std": float(score.std()), "noise": noise}


def snapshot_action_spread(name: str, policies: dict, episodes: int = 10, seed: int = 100_000,
                           which: str = "medium", policy_cache: Optional[Path] = None,
                           with_data: bool = True) -> list[dict]:
    """How far from the data's own actions each policy acts on a ``make-dataset`` dataset, where the policy that
    made the data is known: at every step of a policy's episodes, its action's offset from the ``which``
    snapshot's mean action at that state, in units of the data's action-noise std (the recipe's
    ``collect_noise``), z = (a - mu(s)) / noise per action dimension. The data's actions are mu(s) plus that
    noise (clipped to the box), so a policy acting within the data's support has an RMS z of about 1 and almost
    no step beyond 3 stds; a guided policy that leaves the support shows it here.

    ``policies``: {label: (observations (n, k) -> actions (n, d))}, rolled out for ``episodes`` episodes with
    reset seeds ``seed + i`` (the evaluation's). With ``with_data`` the first row (label ``data``) is the dataset's
    own transitions (every one of them: leave it out when it is already measured). One dict per row: ``label``, ``episodes``, ``steps``, ``z_rms``, ``beyond3`` (the share of
    steps with some dimension beyond 3 stds), ``score_mean`` / ``score_std`` (normalised returns), ``noise``."""
    import gymnasium as gym
    check_int("episodes", episodes, low=1)
    check_seed("seed", seed)
    recipe, model, lo, hi = _dataset_snapshot(name, which, policy_cache)
    noise = _support_width(name, recipe)
    mean_action = _sb3_policy(model, 0.0, None)
    out = [_data_spread(name, mean_action, noise, lo, hi)] if with_data else []
    for label, policy in policies.items():
        eps, _ = run_episodes(lambda: gym.make(recipe.env_id), policy, episodes, seed=seed, n_envs=min(10, episodes),
                              record=True)
        z = np.concatenate([(e.actions - mean_action(e.observations[:-1])) / noise for e in eps])
        score = (np.array([e.ret for e in eps]) - lo) / (hi - lo) * 100
        out.append({"label": label, "episodes": episodes, **_spread_stats(z), "score_mean": float(score.mean()),
                    "score_std": float(score.std()), "noise": noise})
    return out


def _q_probe_episode(env, value, policy, mean_action, reset_seed: int, rng, noise: float, spreads,
                     per_spread: int, probe_every: int, horizon: int) -> list[tuple]:
    """One episode of :func:`probe_q_states`: the policy acts; at every ``probe_every``-th step that leaves a full
    ``horizon`` before the time limit, the (observation, candidate actions, their exact Q by ``value(state, actions)``)."""
    low, high = env.action_space.low, env.action_space.high
    limit = env.spec.max_episode_steps or 10**9
    obs, _ = env.reset(seed=reset_seed)
    out, t, done = [], 0, False
    while not done:
        a = np.clip(policy(obs[None])[0], low, high)
        if t % probe_every == 0 and t + horizon <= limit:
            mu = np.clip(mean_action(obs[None])[0], low, high)
            wide = [mu + c * noise * rng.standard_normal((per_spread, len(mu))) for c in spreads]
            cands = np.clip(np.concatenate([mu[None], a[None], *wide]), low, high)
            out.append((np.array(obs, np.float64), cands, value(_mujoco_state(env.unwrapped), cands)))
        obs, _, terminated, truncated, _ = env.step(a)
        t, done = t + 1, terminated or truncated
    return out


def _q_error_row(group: str, idx: np.ndarray, probes: "QProbes", q_hat: np.ndarray) -> dict:
    """:func:`q_error_rows`' row of one candidate group (``idx``: its columns of each probe; column 0 is mu)."""
    z = probes.actions[:, idx] - probes.actions[:, :1]  # (probes, group, d)
    true = (probes.q_true[:, idx] - probes.q_true[:, :1]) * probes.points  # advantages over mu(s), in points
    hat = (q_hat[:, idx] - q_hat[:, :1]) * probes.points
    near = -np.sum((z / probes.noise) ** 2, -1)  # (probes, group): higher nearer mu(s)

    def corr_of(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.size > 1 else float("nan")
    corr = corr_of(hat, true)
    n = len(true)
    pick = np.argmax(np.concatenate([np.zeros((n, 1)), hat], 1), 1)  # the critic's choice, mu included
    picked = np.concatenate([np.zeros((n, 1)), true], 1)[np.arange(n), pick]
    return {"group": group, "probes": n, "actions": int(true.size),
            "z_rms": float(np.sqrt(np.mean((z / probes.noise) ** 2))), "true_adv": float(true.mean()),
            "critic_adv": float(hat.mean()), "err_rms": float(np.sqrt(np.mean((hat - true) ** 2))),
            "corr": corr, "sign_agree": float(np.mean(np.sign(hat) == np.sign(true))),
            "critic_gain": float(picked.mean()), "oracle_gain": float(np.maximum(true.max(1), 0).mean()),
            "near_corr": corr_of(hat, near), "true_near_corr": corr_of(true, near)}


def _check_q_error_args(episodes, probe_every, per_spread, horizon, seed, spreads, gamma, continuation_noise,
                        rollouts) -> list[float]:
    """:func:`snapshot_q_errors`' arguments checked before any work; returns the spreads as floats."""
    for k, v in (("episodes", episodes), ("probe_every", probe_every), ("per_spread", per_spread),
                 ("horizon", horizon), ("rollouts", rollouts)):
        check_int(k, v, low=1)
    check_seed("seed", seed)
    spreads = [float(c) for c in spreads]
    if not spreads or any(not (np.isfinite(c) and c > 0) for c in spreads):
        raise ValueError(f"spreads: expected one or more finite multiples of the data's noise > 0, got {spreads}")
    if not (np.isfinite(gamma) and 0 < gamma <= 1):
        raise ValueError(f"gamma: expected a discount in (0, 1], got {gamma!r}")
    if not (np.isfinite(continuation_noise) and continuation_noise >= 0):
        raise ValueError(f"continuation_noise: expected a finite std >= 0, got {continuation_noise!r}")
    if continuation_noise == 0 and rollouts != 1:
        raise ValueError(f"rollouts: {rollouts} rollouts of a noise-free continuation are one and the same; give "
                         "continuation_noise > 0 or rollouts = 1")
    return spreads


@dataclass
class QProbes:
    """States a policy visits and candidate actions with their exact values (:func:`probe_q_states`), which any
    critic can then be scored on (:func:`q_error_rows`) without running the simulator again.

    ``obs`` (P, k) the probed observations; ``actions`` (P, C, d) their candidates, column 0 the data policy's mean
    action mu(s), column 1 the policy's own, then ``per_spread`` per spread; ``q_true`` (P, C) their exact values;
    ``groups`` the named column sets (``policy``, ``spread c``); ``noise`` the data's action-noise std; ``points``
    the score points per unit of return (100 / (ref_max - ref_min)); ``meta`` the probing settings."""

    obs: np.ndarray
    actions: np.ndarray
    q_true: np.ndarray
    groups: list
    noise: float
    points: float
    meta: dict

    def save(self, path) -> None:
        """One ``.npz`` (written atomically): the arrays, and the rest as JSON."""
        from aepo_lite._io import atomic_save_npz
        info = {"groups": [[g, idx.tolist()] for g, idx in self.groups], "noise": self.noise, "points": self.points,
                "meta": self.meta}
        atomic_save_npz(path, obs=self.obs, actions=self.actions, q_true=self.q_true, info=np.array(json.dumps(info)))

    @classmethod
    def load(cls, path) -> "QProbes":
        with np.load(path) as f:
            info = json.loads(str(f["info"]))
            return cls(f["obs"], f["actions"], f["q_true"], [(g, np.array(i)) for g, i in info["groups"]],
                       info["noise"], info["points"], info["meta"])


def probe_q_states(name: str, policy: Callable[[np.ndarray], np.ndarray], episodes: int = 3, probe_every: int = 20,
                   spreads=(1.0, 3.0), per_spread: int = 4, horizon: int = 300, gamma: float = 0.99,
                   continuation_noise: float = 0.0, rollouts: int = 1, seed: int = 100_000, which: str = "medium",
                   policy_cache: Optional[Path] = None, progress: bool = False) -> QProbes:
    """The states and candidates of :func:`snapshot_q_errors` with their exact values (arguments as there), for
    :func:`q_error_rows` to score critics on."""
    from tqdm.auto import tqdm
    spreads = _check_q_error_args(episodes, probe_every, per_spread, horizon, seed, spreads, gamma,
                                  continuation_noise, rollouts)
    recipe, model, lo, hi = _dataset_snapshot(name, which, policy_cache)
    noise = _support_width(name, recipe)
    import gymnasium as gym
    limit = gym.spec(recipe.env_id).max_episode_steps
    if (limit or 10**9) < horizon:
        raise ValueError(f"horizon: {horizon} is longer than {recipe.env_id}'s episodes ({limit})")
    env, scratch = _mujoco_envs(name, recipe.env_id, 2 + per_spread * len(spreads), seed, "the exact values")
    mean_action, d = _sb3_policy(model, 0.0, None), env.action_space.shape[0]
    cont_rng = np.random.default_rng([seed, 1])  # its own stream: the candidates do not depend on the reference

    def value(state, cands):
        return np.mean([rollout_returns(state, scratch, cands, mean_action,
                                        continuation_noise * cont_rng.standard_normal((horizon - 1, d)), gamma)
                        for _ in range(rollouts)], 0)
    t0, probes = time.perf_counter(), []
    try:
        for ep in tqdm(range(episodes), desc="exact action values", disable=not progress, leave=False):
            probes += _q_probe_episode(env, value, policy, mean_action, seed + ep, np.random.default_rng([seed, ep]),
                                       noise, spreads, per_spread, probe_every, horizon)
    finally:
        for e in (env, *scratch):
            e.close()
    if not probes:
        raise ValueError(f"episodes: the policy's {episodes} episode(s) gave no state to probe (each ended before "
                         f"a probe step with {horizon} steps left)")
    groups = [("policy", np.array([1]))] + [(f"spread {c:g}", 2 + per_spread * i + np.arange(per_spread))
                                            for i, c in enumerate(spreads)]
    meta = {"horizon": horizon, "gamma": float(gamma), "continuation_noise": float(continuation_noise),
            "rollouts": rollouts, "episodes": episodes, "seconds": time.perf_counter() - t0}
    return QProbes(*(np.stack([p[i] for p in probes]) for i in range(3)), groups, noise, 100.0 / (hi - lo), meta)


def q_error_rows(probes: QProbes, q_fn: Callable) -> list[dict]:
    """A critic ``q_fn(observations (m, k), actions (m, d)) -> (m,)`` scored on ``probes``: one dict per group, as
    :func:`snapshot_q_errors` returns."""
    P, C, d = probes.actions.shape
    q_hat = np.asarray(q_fn(np.repeat(probes.obs, C, 0), probes.actions.reshape(P * C, d)), np.float64)
    if q_hat.size != P * C or not np.all(np.isfinite(q_hat)):
        raise ValueError(f"q_fn: expected {P * C} finite values, got shape {q_hat.shape}"
                         f"{'' if q_hat.size != P * C else ' with non-finite values'}")
    extra = {"noise": probes.noise, **probes.meta}
    return [{**_q_error_row(g, idx, probes, q_hat.reshape(P, C)), **extra} for g, idx in probes.groups]


def snapshot_q_errors(name: str, q_fn: Callable, policy: Callable[[np.ndarray], np.ndarray], episodes: int = 3,
                      probe_every: int = 20, spreads=(1.0, 3.0), per_spread: int = 4, horizon: int = 300,
                      gamma: float = 0.99, continuation_noise: float = 0.0, rollouts: int = 1, seed: int = 100_000,
                      which: str = "medium", policy_cache: Optional[Path] = None, progress: bool = False) -> list[dict]:
    """A critic's action values against the exact ones, on and off the data's support, at the states a policy
    visits, on a ``make-dataset`` dataset whose data policy is known (MuJoCo environments only).

    ``policy`` (observations (n, k) -> actions (n, d)) acts for ``episodes`` episodes (reset seeds ``seed + i``, the
    evaluation's). At every ``probe_every``-th step with a full ``horizon`` before the time limit, the candidates are
    the data policy's mean action mu(s) (the ``which`` snapshot), the policy's own action, and for each c in
    ``spreads`` ``per_spread`` draws mu(s) + c * std * N(0, I) (std: the data's action noise, so c = 1 is the data's
    support and c = 3 mostly beyond it), all clipped to the box. Each candidate's exact value is the discounted
    (``gamma``) return of taking it and then following the snapshot for ``horizon - 1`` steps (or to a termination;
    :func:`rollout_returns`): the deterministic snapshot by default; with ``continuation_noise`` the snapshot plus
    that action noise (the data's policy at its own std), averaged over ``rollouts`` draws shared by the candidates,
    so the reference is the data policy's Q, which an in-sample critic is trained toward. Its critic value is
    ``q_fn(observations (m, k), actions (m, d)) -> (m,)``. Both are compared as advantages over mu(s) at the same
    state, so a critic's level cancels and what remains is how it ranks the actions. Advantages are in points: the
    discounted return difference x 100 / (ref_max - ref_min), the dataset's score scale. The states and
    candidates do not depend on the reference, so two references measure the same actions.

    One dict per group (``policy``, then ``spread c``): ``probes``, ``actions``, ``z_rms`` (the group's offset
    from mu in data-noise stds), ``true_adv`` / ``critic_adv`` (mean advantage over mu, exact and by the critic),
    ``err_rms`` (RMS of their difference), ``corr`` (their correlation over the group's actions), ``sign_agree`` (how
    often the critic says better / worse than mu as the exact value does), ``critic_gain`` (the exact advantage of
    the critic's pick among mu and the group, per state: what acting on its ranking gains) and ``oracle_gain``
    (the same for the exact pick), ``near_corr`` / ``true_near_corr`` (the correlation of the critic's / the exact
    advantages with nearness to mu, -||a - mu||^2 / noise^2: how much each favours actions close to the data
    policy's mean), plus ``noise``, ``horizon``, ``gamma``, ``continuation_noise``, ``rollouts``, ``episodes``,
    ``seconds`` (of the probing).

    :func:`probe_q_states`, then :func:`q_error_rows`: record the probes once to score several critics."""
    probes = probe_q_states(name, policy, episodes=episodes, probe_every=probe_every, spreads=spreads,
                            per_spread=per_spread, horizon=horizon, gamma=gamma,
                            continuation_noise=continuation_noise, rollouts=rollouts, seed=seed, which=which,
                            policy_cache=policy_cache, progress=progress)
    return q_error_rows(probes, q_fn)


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
