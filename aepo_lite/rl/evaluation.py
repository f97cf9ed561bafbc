"""Gymnasium evaluation: run a batched policy on several environments at once, with
deterministic per-episode seeds, and turn returns into D4RL-style normalised scores.

Episode ``i`` of an evaluation always resets with seed ``seed + i``, whatever the number of
parallel environments, so two evaluations with the same seed see the same start states.

Normalised score (x100, as D4RL tables print it):

    score = 100 * (return - ref_min) / (ref_max - ref_min)

with (ref_min, ref_max) from the dataset's metadata when it has them, D4RL's published
reference returns only for datasets that are ports of D4RL data, and otherwise ``None`` (with
a warning): never a silent substitute. Metadata that holds one of the two, a non-number, equal
values or ref_max < ref_min is an error when the dataset is loaded (before any training).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

__all__ = ["Episode", "run_episodes", "reference_scores", "check_reference_scores", "normalized_score",
           "summarize_returns", "D4RL_REF_SCORES"]

# (observation batch (n, obs_dim) float64) -> actions (n, act_dim)
BatchPolicy = Callable[[np.ndarray], np.ndarray]

# D4RL's published reference returns (d4rl/infos.py: REF_MIN_SCORE / REF_MAX_SCORE), for the
# Minari datasets that are ports of D4RL data. Minari stores the same numbers in their metadata;
# this table is only a fallback for an old copy without them.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "D4RL/pen": (96.262799, 3076.8331017826877),
    "D4RL/hammer": (-274.856578, 12794.134825156867),
    "D4RL/door": (-56.512833, 2880.5693087298737),
    "D4RL/relocate": (-6.425911, 4233.877797728884),
    "D4RL/kitchen": (0.0, 4.0),
    "D4RL/antmaze": (0.0, 1.0),
}


@dataclass
class Episode:
    """One finished episode. ``observations`` has T+1 rows (the last is the final observation)."""

    seed: int
    ret: float
    length: int
    terminated: bool
    observations: Optional[np.ndarray] = None  # (T+1, obs_dim) when recorded
    actions: Optional[np.ndarray] = None  # (T, act_dim)
    rewards: Optional[np.ndarray] = None  # (T,)
    terminations: Optional[np.ndarray] = None  # (T,) bool
    truncations: Optional[np.ndarray] = None  # (T,) bool
    extra: dict = field(default_factory=dict)


def run_episodes(make_env: Callable[[], "object"], policy: BatchPolicy, n_episodes: int, *, seed: int = 0,
                 n_envs: int = 8, record: bool = False, max_transitions: Optional[int] = None,
                 progress: bool = False, desc: str = "episodes") -> tuple[list[Episode], dict]:
    """Roll ``policy`` out for ``n_episodes`` episodes on up to ``n_envs`` environments at once.

    Args:
        make_env: builds one Gymnasium environment (called ``min(n_envs, n_episodes)`` times).
        policy: (n, obs_dim) observations of the running environments -> (n, act_dim) actions;
            called once per step on all of them together (a diffusion policy samples in one batch).
        n_episodes: how many episodes (episode i resets with seed ``seed + i``).
        record: keep observations/actions/rewards/flags (for making datasets).
        max_transitions: stop once this many transitions are recorded; the episode that crosses
            the budget is cut there and marked truncated (D4RL's timeouts), later ones dropped.
    Returns:
        (episodes in index order, timing dict with ``actions``, ``policy_seconds``, ``seconds``).
    """
    if not isinstance(n_episodes, int) or n_episodes < 1:
        raise ValueError(f"n_episodes: expected a positive integer, got {n_episodes!r}")
    if not isinstance(n_envs, int) or n_envs < 1:
        raise ValueError(f"n_envs: expected a positive integer, got {n_envs!r}")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=n_episodes, desc=desc, disable=not progress, leave=False)
    ro = _Rollout([make_env() for _ in range(min(n_envs, n_episodes))], n_episodes, seed, record, bar)
    try:
        for k in range(len(ro.envs)):
            ro.start(k)
        while any(s is not None for s in ro.slots) and not ro.budget_hit:
            ro.step_all(policy, max_transitions)
    finally:
        bar.close()
        for e in ro.envs:
            e.close()
    eps = [ro.finished[i] for i in sorted(ro.finished)]
    return eps, {"actions": ro.n_actions, "policy_seconds": ro.t_policy, "seconds": time.perf_counter() - t0}


class _Rollout:
    """The state of :func:`run_episodes`: one slot per environment, each holding its running episode."""

    def __init__(self, envs: list, n_episodes: int, seed: int, record: bool, bar):
        self.envs, self.n_episodes, self.seed, self.record, self.bar = envs, n_episodes, seed, record, bar
        self.slots: list[Optional[dict]] = [None] * len(envs)
        self.next_ep, self.finished = 0, {}
        self.total, self.n_actions, self.t_policy, self.budget_hit = 0, 0, 0.0, False

    def start(self, k: int) -> None:
        if self.next_ep >= self.n_episodes:
            self.slots[k] = None
            return
        obs, _ = self.envs[k].reset(seed=self.seed + self.next_ep)
        self.slots[k] = {"i": self.next_ep, "obs": [np.asarray(obs, dtype=np.float64)], "act": [], "rew": [],
                         "term": [], "trunc": []}
        self.next_ep += 1

    def finish(self, k: int) -> None:
        sl = self.slots[k]
        rew = np.asarray(sl["rew"], dtype=np.float64)
        ep = Episode(seed=self.seed + sl["i"], ret=float(rew.sum()), length=len(rew), terminated=bool(sl["term"][-1]))
        if self.record:
            ep.observations = np.stack(sl["obs"])
            ep.actions = np.stack(sl["act"])
            ep.rewards, ep.terminations = rew, np.asarray(sl["term"], bool)
            ep.truncations = np.asarray(sl["trunc"], bool)
        self.finished[sl["i"]] = ep
        self.bar.update(1)

    def step_all(self, policy: BatchPolicy, max_transitions: Optional[int]) -> None:
        """One policy call for every running environment, then one step of each."""
        live = [k for k in range(len(self.envs)) if self.slots[k] is not None]
        obs = np.stack([self.slots[k]["obs"][-1] for k in live])
        tp = time.perf_counter()
        act = np.asarray(policy(obs), dtype=np.float64)
        self.t_policy += time.perf_counter() - tp
        self.n_actions += len(live)
        if act.shape[0] != len(live):
            raise ValueError(f"policy: returned {act.shape[0]} actions for {len(live)} observations")
        for j, k in enumerate(live):
            if self._step(k, act[j], max_transitions):
                return

    def _step(self, k: int, action: np.ndarray, max_transitions: Optional[int]) -> bool:
        """Step environment k; True when the transition budget ended the rollout."""
        o, r, term, trunc, _ = self.envs[k].step(action)
        sl = self.slots[k]
        sl["act"].append(action)
        sl["rew"].append(float(r))
        if self.record:
            sl["obs"].append(np.asarray(o, dtype=np.float64))
        else:
            sl["obs"] = [np.asarray(o, dtype=np.float64)]
        self.total += 1
        cut = max_transitions is not None and self.total >= max_transitions
        sl["term"].append(bool(term))
        sl["trunc"].append(bool(trunc) or (cut and not term))
        if not (term or trunc or cut):
            return False
        self.finish(k)
        if cut:  # the other running episodes end here too, as timeouts
            for k2, other in enumerate(self.slots):
                if k2 != k and other is not None and other["rew"]:
                    other["trunc"][-1] = not other["term"][-1]
                    self.finish(k2)
            self.budget_hit = True
            return True
        self.start(k)
        return False


def check_reference_scores(dataset_id: str, metadata: dict) -> tuple[Optional[float], Optional[float]]:
    """The metadata's (ref_min_score, ref_max_score), checked: both or neither, finite numbers,
    ref_max > ref_min. Raises a ``ValueError`` naming the dataset otherwise."""
    lo, hi = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if lo is None and hi is None:
        return None, None
    fix = ("fix the dataset's metadata (ref_min_score = the return of a random policy, ref_max_score = an "
           "expert's), or make the dataset again")
    if lo is None or hi is None:
        have, miss = ("ref_min_score", "ref_max_score") if hi is None else ("ref_max_score", "ref_min_score")
        raise ValueError(f"dataset: {dataset_id!r} has {have} but no {miss} in its metadata; normalised scores "
                         f"need both: {fix}")
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"dataset: {dataset_id!r} has reference scores that are not numbers (ref_min_score={lo!r}, "
                         f"ref_max_score={hi!r}): {fix}") from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError(f"dataset: {dataset_id!r} has non-finite reference scores (ref_min_score={lo_f}, "
                         f"ref_max_score={hi_f}): {fix}")
    if hi_f <= lo_f:
        what = "equals" if hi_f == lo_f else "is below"
        raise ValueError(f"dataset: {dataset_id!r} has ref_max_score={hi_f:g}, which {what} ref_min_score={lo_f:g}: "
                         f"normalised scores would be {'undefined' if hi_f == lo_f else 'inverted'}; {fix}")
    return lo_f, hi_f


def reference_scores(dataset_id: str, metadata: dict) -> tuple[Optional[float], Optional[float], str]:
    """(ref_min, ref_max, source) for a dataset: its metadata (checked by :func:`check_reference_scores`),
    else D4RL's table for D4RL ports, else (None, None, reason) with a warning."""
    lo, hi = check_reference_scores(dataset_id, metadata)
    if lo is not None:
        return lo, hi, "dataset metadata"
    for prefix, (lo, hi) in D4RL_REF_SCORES.items():
        if dataset_id.startswith(prefix + "/"):
            return lo, hi, "D4RL published reference returns"
    warnings.warn(f"{dataset_id}: no ref_min_score/ref_max_score in the metadata and not a D4RL port: "
                  "normalised scores are reported as None", stacklevel=2)
    return None, None, "none"


def normalized_score(ret, ref_min: Optional[float], ref_max: Optional[float]):
    """100 (ret - ref_min) / (ref_max - ref_min); ``None`` if either reference is missing."""
    if ref_min is None or ref_max is None:
        return None
    if not math.isfinite(ref_max - ref_min) or ref_max == ref_min:
        raise ValueError(f"ref_max: expected ref_max != ref_min, got ref_min={ref_min}, ref_max={ref_max}")
    return 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def summarize_returns(returns, ref_min: Optional[float], ref_max: Optional[float]) -> dict:
    """``return_mean``, ``return_std``, ``normalized_score_mean`` (or None), ``normalized_score_std``, ``episodes``."""
    r = np.asarray(returns, dtype=np.float64)
    ns = normalized_score(r, ref_min, ref_max)
    return {"return_mean": float(r.mean()), "return_std": float(r.std()),
            "normalized_score_mean": None if ns is None else float(ns.mean()),
            "normalized_score_std": None if ns is None else float(ns.std()),
            "episodes": int(r.size)}
