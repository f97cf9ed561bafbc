"""Exact values from the simulator, for the datasets ``aepo-lite make-dataset`` makes (the diagnostics of the
error budget's critic and support parts, docs/derivation.md 6b).

The policy that made a dataset (its TD3 snapshot, :mod:`aepo_lite.rl.datasets`) is known, and MuJoCo's physics can be
saved and restored, so what a critic only estimates can be measured here by running the simulator:

  - :func:`snapshot_noise_scores`: the data's own policy with action noise (does the return depend on the actions?);
  - :func:`rollout_returns`, :func:`state_from_observation`, :func:`exact_q_labels`: Monte-Carlo action values from a
    saved or rebuilt physics state;
  - :func:`snapshot_oracle_scores`: the support oracle, the best of N candidate actions (or trajectories) ranked by
    their exact return, each episode saved as it goes so a killed run resumes;
  - :func:`snapshot_action_spread`: how far a policy acts from the data's policy, in the data's noise stds;
  - :func:`probe_q_states`, :func:`q_error_rows`, :func:`snapshot_q_errors`: a critic's values against exact ones at
    the states a policy visits.

The functions that read a dataset's snapshot policy refuse, with its name, a dataset ``make-dataset`` did not make, or
one whose cached ladder is not the one that made it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from aepo_lite._checks import check_int, check_seed
from aepo_lite._io import atomic_write_json, read_json
from aepo_lite.rl.datasets import DatasetRecipe, _dataset_snapshot, _sb3_policy
from aepo_lite.rl.evaluation import run_episodes

__all__ = ["snapshot_noise_scores", "rollout_returns", "state_from_observation", "exact_q_labels", "CONTINUATION_SEED",
           "snapshot_oracle_scores", "snapshot_oracle_parts", "ORACLE_SEARCHES", "snapshot_action_spread", "QProbes",
           "probe_q_states", "q_error_rows", "snapshot_q_errors"]


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
    (a write a step made a 1000-step episode of N = 1 take 18 s); a step that searches for minutes is saved as it ends.
    Each write also records the seconds spent on the steps saved, summed over the processes that took them, so that
    :meth:`elapsed` of a resumed episode is its whole search time (a file written before this was recorded counts
    from its last resume)."""

    def __init__(self, path: Optional[Path] = None, every: float = 5.0):
        self.path, self.actions, self.every, self.written = (None if path is None else Path(path)), [], every, -math.inf
        self.before, self.since = 0.0, time.monotonic()

    def elapsed(self) -> float:
        """Seconds spent on this episode's steps: the saved ones' (earlier processes') plus this process's since it
        started or resumed the episode (its replay not counted). Wall-clock: a process stopped mid-step (SIGSTOP)
        counts the pause."""
        return self.before + time.monotonic() - self.since

    def resume(self, env, obs: np.ndarray, rng, bar=None) -> tuple:
        """(observation, return, steps, done, kept plan) of the episode after replaying the saved actions in ``env``
        (just reset, at ``obs``), ``rng`` set to the saved state; the episode's start when nothing is saved."""
        self.since = time.monotonic()
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
        self.actions, self.before, self.since = saved["actions"], float(saved.get("seconds", 0.0)), time.monotonic()
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
                                      "rng": rng.bit_generator.state, "kept": None if kept is None else kept.tolist(),
                                      "seconds": self.elapsed()})


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


def _search_episode(env, reset_seed: int, rng, choose: Callable, bar=None,
                    ckpt: Optional[_EpisodeCheckpoint] = None) -> tuple[float, int]:
    """One episode of a search policy, saved as it goes to ``ckpt`` and resumed from it: reset with ``reset_seed``,
    then at every step ``choose(obs, left, kept) -> (action, kept)`` (``left``: the steps left to the time limit;
    ``kept``: the search's plan carried to the next step, None at first and for a search that keeps none), the
    action taken and saved with the plan and ``rng``'s state. ``bar``: a progress bar advanced once a step (or
    None). (its return, its length)."""
    limit = env.spec.max_episode_steps or 10**9
    ckpt = ckpt or _EpisodeCheckpoint()
    obs, ret, t, done, kept = ckpt.resume(env, env.reset(seed=reset_seed)[0], rng, bar)
    while not done:
        action, kept = choose(obs, limit - t, kept)
        obs, r, terminated, truncated, _ = env.step(action)
        ret, t, done = ret + float(r), t + 1, terminated or truncated
        ckpt.save(action, obs, rng, kept, done)
        if bar is not None:
            bar.update(1)
    return ret, t


def _oracle_episode(env, scratch, mean_action, n: int, reset_seed: int, rng, noise: float, continuation_noise: float,
                    horizon: int, gamma: float, draws: int = 1, bar=None,
                    ckpt: Optional[_EpisodeCheckpoint] = None) -> tuple[float, int]:
    """One episode of :func:`snapshot_oracle_scores`' best-of-``n`` policy: (its return, its length). Each candidate
    is scored by the mean of ``draws`` rollouts, draw m's continuation noise the same for every candidate. ``bar``
    and ``ckpt`` as in :func:`_search_episode`."""
    low, high = env.action_space.low, env.action_space.high

    def best_of_n(obs, left, _):
        a0 = mean_action(obs[None])[0]
        first = np.clip(a0 + noise * rng.standard_normal((n, a0.shape[0])), low, high)
        if n > 1:
            steps = min(horizon, left)
            z = continuation_noise * rng.standard_normal((steps - 1, a0.shape[0])) if draws == 1 else \
                np.tile(continuation_noise * rng.standard_normal((draws, steps - 1, a0.shape[0])), (n, 1, 1))
            g = rollout_returns(_mujoco_state(env.unwrapped), scratch, np.repeat(first, draws, 0), mean_action, z,
                                gamma).reshape(n, draws).mean(1)  # row i * draws + m: candidate i, draw m
            first = first[[int(np.argmax(g))]]
        return first[0], None
    return _search_episode(env, reset_seed, rng, best_of_n, bar, ckpt)


def _sequence_episode(env, scratch, mean_action, n: int, reset_seed: int, rng, noise: float, horizon: int,
                      gamma: float, bar=None, ckpt: Optional[_EpisodeCheckpoint] = None) -> tuple[float, int]:
    """One episode of :func:`snapshot_oracle_scores`' sequence search: at every step n whole trajectories of the
    data's policy (the snapshot plus noise of std ``noise`` at each of ``horizon`` steps, each candidate its own
    draws) are rolled out from the current state, the best one's first action is taken, and the rest of its draws is
    candidate 0 at the next step (so with gamma 1 and a horizon to the time limit the episode returns at least the
    best return found at any step: the search can only improve on its plan). (its return, its length). ``bar`` and
    ``ckpt`` as in :func:`_search_episode`."""
    low, high = env.action_space.low, env.action_space.high

    def best_trajectory(obs, left, kept):
        a0 = mean_action(obs[None])[0]
        steps = min(horizon, left)
        z = noise * rng.standard_normal((n, steps, a0.shape[0]))
        if kept is not None:
            z[0, :len(kept)] = kept[:steps]
        g = rollout_returns(_mujoco_state(env.unwrapped), scratch, np.clip(a0 + z[:, 0], low, high), mean_action,
                            z[:, 1:], gamma)
        best = int(np.argmax(g))
        return np.clip(a0 + z[best, 0], low, high), z[best, 1:]
    return _search_episode(env, reset_seed, rng, best_trajectory, bar, ckpt)


ORACLE_SEARCHES = ("step", "sequence")


def _episode_bar(env, ep: int, progress: bool, position: Optional[int] = None):
    """A progress bar over episode ``ep``'s steps (an oracle episode of a large N runs for hours on a CPU core): the
    steps taken of the time limit, the time so far and a step's time, without an estimate of the time left, since an
    episode may end long before its limit at a fall (Hopper medium's after about 130 of 1000 steps)."""
    from tqdm.auto import tqdm
    return tqdm(total=env.spec.max_episode_steps, desc=f"episode {ep}: steps", unit="step", disable=not progress,
                leave=False, position=position,
                bar_format="{desc} {n_fmt} of at most {total_fmt} [{elapsed}, {rate_fmt}]")


def _play_oracle_episode(env, scratch, mean_action, row: dict, ep: int, seed: int, ckpt: _EpisodeCheckpoint,
                         progress: bool, position: Optional[int] = None) -> tuple[float, int]:
    """Episode ``ep`` of :func:`snapshot_oracle_scores`' row ``row`` (its search, N, noises, horizon, gamma and
    draws): reset with seed ``seed + ep``, candidates drawn from the generator seeded by (``seed``, N, ``ep``),
    resumed from and saved to ``ckpt``; its bar on terminal line ``position`` (None: tqdm's choice). (its return,
    its length)."""
    n, rng = row["candidates"], np.random.default_rng([seed, row["candidates"], ep])
    with _episode_bar(env, ep, progress, position) as bar:
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
                           first_episode: int = 0, resume_dir: Optional[Path] = None,
                           position: Optional[int] = None) -> list[dict]:
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
    CPU core). :func:`snapshot_oracle_parts` runs a row's episodes so, in processes side by side. ``position``: the
    terminal line of the episode bars (a process among several).

    One dict per N: ``search``, ``candidates``, ``horizon``, ``gamma``, ``noise``, ``data_noise`` (the recipe's
    ``collect_noise``: candidates with ``noise`` equal to it are the data's support), ``continuation_noise``, ``return_mean``,
    ``score_mean`` / ``score_std`` (normalised with the dataset's reference scores), ``length_mean``,
    ``episodes``, ``first_episode``, ``episode_scores`` (each episode's normalised score, in order), ``seconds``
    (the episodes' search time, earlier processes' included: a rerun replaying finished episodes reports theirs)."""
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
            row = {"search": search, "candidates": n, "horizon": horizon, "gamma": float(gamma), "noise": float(noise),
                   "data_noise": float(recipe.collect_noise),
                   "continuation_noise": float(noise if search == "sequence" else continuation_noise),
                   "continuation_draws": continuation_draws}
            rets, lens, secs = [], [], []
            for ep in tqdm(range(first_episode, first_episode + episodes), desc=f"oracle best of {n} ({search})",
                           disable=not progress or episodes == 1, leave=False):
                ckpt = _EpisodeCheckpoint(_checkpoint_path(resume_dir, {"dataset": name, "which": which, "seed": seed,
                                                                        "policy": policy, **row}, ep))
                ret, t = _play_oracle_episode(env, scratch, mean_action, row, ep, seed, ckpt, progress, position)
                rets.append(ret)
                lens.append(t)
                secs.append(ckpt.elapsed())
            score = (np.array(rets) - lo) / (hi - lo) * 100
            out.append({**row, "return_mean": float(np.mean(rets)), "score_mean": float(score.mean()),
                        "score_std": float(score.std()), "length_mean": float(np.mean(lens)), "episodes": episodes,
                        "first_episode": first_episode, "episode_scores": [float(v) for v in score],
                        "seconds": float(sum(secs))})
    finally:
        env.close()
        for s in scratch:
            s.close()
    return out


_WORKER_SLOT = 0  # a snapshot_oracle_parts worker's index: its bar's terminal line is 1 + this


def _parts_worker_init(slots, lock, threads: int) -> None:
    """A :func:`snapshot_oracle_parts` worker process: its slot (for its bar's line), tqdm's lock shared with the
    others (bars of several processes on one terminal) and its share of torch's CPU threads."""
    global _WORKER_SLOT
    import torch
    from tqdm.auto import tqdm
    with slots.get_lock():
        _WORKER_SLOT, slots.value = slots.value, slots.value + 1
    tqdm.set_lock(lock)
    torch.set_num_threads(threads)


def _one_part(name: str, n: int, ep: int, kw: dict, progress: bool) -> dict:
    """Episode ``ep`` of the oracle row of N = ``n``, alone: the part row :func:`snapshot_oracle_scores` writes."""
    (row,) = snapshot_oracle_scores(name, (n,), episodes=1, first_episode=ep, progress=progress,
                                    position=1 + _WORKER_SLOT, **kw)
    return row


def snapshot_oracle_parts(name: str, n: int, episodes, workers: int, on_part: Callable[[dict], None],
                          progress: bool = True, **kw) -> None:
    """The episodes ``episodes`` (indices) of :func:`snapshot_oracle_scores`' row of N = ``n`` (its other keyword
    arguments ``kw``, ``resume_dir`` among them), each measured alone as a part (``episodes=1, first_episode=i``)
    in ``workers`` processes side by side (spawned; torch's CPU threads shared out among them). ``on_part(row)`` is
    called here as each part lands, in the order they finish, so that the caller saves it at once; the parts join
    into the row one process would have written (:func:`aepo_lite.rl.diagnostics.join_oracle_parts`), since every
    episode draws from its own generator. Each worker's episode bar has its own terminal line, under a bar of the
    episodes done. Every process builds its own N x ``continuation_draws`` scratch environments (about 1.2 MB
    each for Hopper), so memory grows with ``workers``. After a worker's error no other part starts; it is raised
    here once the parts already running have landed (their ``on_part`` called). Each episode's steps are saved in
    ``resume_dir`` as it goes, so a rerun resumes them."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm
    check_int("workers", workers, low=1)
    episodes = [check_int("episodes", i, low=0) for i in episodes]
    if not episodes:
        return
    ctx = mp.get_context("spawn")  # a forked child would inherit torch's thread pools in whatever state they were
    workers = min(workers, len(episodes))
    threads = max(1, (os.cpu_count() or 1) // workers)
    lock = ctx.RLock()
    tqdm.set_lock(lock)  # this process's bar and the workers' write to one terminal under one lock
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_parts_worker_init,
                             initargs=(ctx.Value("i", 0), lock, threads)) as pool:
        futures = [pool.submit(_one_part, name, n, i, kw, progress) for i in episodes]
        failed = None
        for f in tqdm(as_completed(futures), total=len(futures), desc=f"oracle best of {n}: episodes",
                      disable=not progress, position=0):
            if f.cancelled():
                continue
            if f.exception() is not None:
                failed = failed or f.exception()
                for g in futures:  # the parts not started yet: not started at all
                    g.cancel()
                continue
            on_part(f.result())
        if failed is not None:
            raise failed


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
