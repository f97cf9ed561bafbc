"""Minari datasets as offline-RL transitions.

A Minari episode stores T actions/rewards/flags and T+1 observations (the last row is the final
observation). Transition i of an episode is (o_i, a_i, r_i, o_{i+1}, done_i) with

    done_i = terminations_i        (bootstrap through truncations: a timeout is not an end state)

so the critic target r + gamma (1 - done) V(s') cuts the bootstrap only at true terminations.

Observations are kept once (every row, T+1 per episode) and transitions index into them, so the
behaviour model's support actions (QGPO) are computed once per observation row.

Conventions the critic needs (IQL's):
  - ``locomotion``: r <- r * 1000 / (max episode return - min episode return);
  - ``antmaze``:    r <- r - 1;
  - ``none``:       raw rewards (Adroit, Kitchen, anything else);
  - ``auto``:       antmaze for ids containing "antmaze", locomotion for MuJoCo locomotion
                    tasks (hopper, walker2d, halfcheetah, ant, humanoid, swimmer), else none.
States are normalised with the dataset's mean and std (std + 1e-3); actions are mapped from the
action box to [-1, 1]^d (docs/derivation.md section 1).

Loading checks the contents before any training: every episode has transitions, one observation
and action size, finite values; the locomotion scaling needs episode returns that differ (all
equal returns would divide by ~0); the reference scores are usable. A dataset id must follow
Minari's grammar ``NAMESPACE/NAME-vN`` (ASCII letters, digits, ``_``, ``-``), so it always names
a folder inside the Minari root; a damaged local copy is reported as damaged, not as a download.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["OfflineData", "load_minari", "from_episodes", "returns_to_go", "REWARD_SCALINGS",
           "LOCOMOTION_TASKS", "check_dataset_id", "dataset_dir", "check_return_span"]

# Minari's dataset id grammar (minari.dataset.minari_dataset.DATASET_ID_RE), with the namespace
# required and ASCII only: folders that every file system and the Hugging Face hub accept.
DATASET_ID_RE = re.compile(r"(?P<namespace>[-\w]+(?:/[-\w]+)*)/(?P<name>[-\w]+?)-v(?P<version>\d+)", re.ASCII)
MAX_ID_PART = 200  # characters per part of a dataset id: each part is a folder name
# The locomotion scaling divides by the spread of episode returns: one below this fraction of the
# returns' size (at least 1) is rounding noise, and would multiply the rewards by 1e6 or more.
MIN_RETURN_SPAN = 1e-3

REWARD_SCALINGS = ("auto", "locomotion", "antmaze", "none")
LOCOMOTION_TASKS = ("hopper", "walker2d", "halfcheetah", "ant", "humanoid", "swimmer", "reacher", "pusher",
                    "invertedpendulum", "inverteddoublependulum")


@dataclass
class OfflineData:
    """A dataset of transitions, as numpy arrays (float32 unless said otherwise).

    Shapes: N transitions, M = N + (number of episodes) observation rows, k state dim, d action dim.
    """

    dataset_id: str
    obs_rows: np.ndarray  # (M, k) every observation row, raw (flattened if the space is a Dict)
    idx: np.ndarray  # (N,) int64: row of s for each transition
    next_idx: np.ndarray  # (N,) int64: row of s' for each transition
    actions: np.ndarray  # (N, d) actions mapped to [-1, 1]^d
    rewards: np.ndarray  # (N,) raw rewards
    terminals: np.ndarray  # (N,) 1.0 where the episode terminated (no bootstrap), else 0.0
    timeouts: np.ndarray  # (N,) 1.0 where the episode was truncated (bootstrap kept)
    episode_returns: np.ndarray  # (E,) undiscounted returns of the dataset's episodes
    action_low: np.ndarray  # (d,) the environment's action box
    action_high: np.ndarray  # (d,)
    reward_scaling: str = "none"  # the convention applied by :meth:`scaled_rewards`
    metadata: dict = field(default_factory=dict)  # Minari metadata (ref scores, env specs, ...)

    @property
    def n(self) -> int:
        return int(self.idx.shape[0])

    @property
    def state_dim(self) -> int:
        return int(self.obs_rows.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def fingerprint(self) -> str:
        """A short content hash of what training reads (observations, transition indices, actions, rewards,
        terminations): two copies of a dataset id made apart (``make-dataset`` on another CPU, a dataset
        edited since) differ here even where their names and sizes agree. Stage checkpoints record it."""
        import hashlib
        h = hashlib.blake2b(digest_size=8)
        for a in (self.obs_rows, self.idx, self.next_idx, self.actions, self.rewards, self.terminals):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.data)  # the array's own buffer: no copy of a large dataset
        return h.hexdigest()

    def obs_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (k,), std (k,)) of the states s over transitions, std + 1e-3 (IQL)."""
        s = self.obs_rows[self.idx]
        return s.mean(0).astype(np.float32), (s.std(0) + 1e-3).astype(np.float32)

    def reward_factor(self) -> float:
        """What :meth:`scaled_rewards` multiplies the rewards by: 1000 / (max - min episode return) under the
        locomotion scaling, else 1 (antmaze's scaling shifts instead). A critic's Q divided by it is in raw reward
        units."""
        if self.reward_scaling == "locomotion":
            return 1000.0 / check_return_span(self.dataset_id, self.episode_returns)
        return 1.0

    def scaled_rewards(self) -> np.ndarray:
        """Rewards under :attr:`reward_scaling` (see the module docstring), (N,)."""
        if self.reward_scaling == "locomotion":
            return (self.rewards * self.reward_factor()).astype(np.float32)
        if self.reward_scaling == "antmaze":
            return (self.rewards - 1.0).astype(np.float32)
        return self.rewards.astype(np.float32)

    @property
    def n_episodes(self) -> int:
        return int(self.episode_returns.shape[0])

    def take_episodes(self, which) -> "OfflineData":
        """The dataset made of episodes ``which`` (indices into its episodes, in that order, each once): their
        observation rows, transitions and returns; the same id, action box, scaling convention and metadata (the
        reward factor of the locomotion scaling is the subset's own, from its returns)."""
        which = np.asarray(which)
        E = self.n_episodes
        if which.ndim != 1 or which.size == 0 or not np.issubdtype(which.dtype, np.integer):
            raise ValueError(f"which: expected a non-empty 1-d array of episode indices, got {which!r}")
        if which.min() < 0 or which.max() >= E or np.unique(which).size != which.size:
            raise ValueError(f"which: expected distinct episode indices in [0, {E}), got {which.size} indices in "
                             f"[{which.min()}, {which.max()}] ({which.size - np.unique(which).size} repeated)")
        starts = np.flatnonzero(np.r_[True, self.next_idx[:-1] != self.idx[1:]])  # each episode's first transition
        if starts.size != E:
            raise ValueError(f"data: {self.dataset_id!r} has {starts.size} runs of consecutive transitions but "
                             f"{E} episode returns (not stored episode by episode)")
        ends = np.r_[starts[1:], self.n]
        rows, idx, nxt, tr = [], [], [], []
        offset = 0
        for e in which:
            t = np.arange(starts[e], ends[e])
            first, last = self.idx[t[0]], self.next_idx[t[-1]]  # the episode's observation rows first..last
            rows.append(self.obs_rows[first:last + 1])
            idx.append(self.idx[t] - first + offset)
            nxt.append(self.next_idx[t] - first + offset)
            offset += last - first + 1
            tr.append(t)
        t = np.concatenate(tr)
        out = replace(self, obs_rows=np.concatenate(rows), idx=np.concatenate(idx), next_idx=np.concatenate(nxt),
                      actions=self.actions[t], rewards=self.rewards[t], terminals=self.terminals[t],
                      timeouts=self.timeouts[t], episode_returns=self.episode_returns[which],
                      metadata=dict(self.metadata))
        if out.reward_scaling == "locomotion":
            check_return_span(self.dataset_id, out.episode_returns)
        return out

    def to_action_box(self, a: np.ndarray) -> np.ndarray:
        """Map actions from [-1, 1]^d back to the environment's box."""
        return self.action_low + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Normalised states and scaled rewards on ``device``: ``obs`` (M, k), ``idx``, ``next_idx`` (N,),
        ``a`` (N, d), ``r`` (N,), ``done`` (N,)."""
        mean, std = self.obs_stats()
        return {"obs": torch.as_tensor((self.obs_rows - mean) / std, dtype=torch.float32, device=device),
                "idx": torch.as_tensor(self.idx, device=device),
                "next_idx": torch.as_tensor(self.next_idx, device=device),
                "a": torch.as_tensor(self.actions, dtype=torch.float32, device=device),
                "r": torch.as_tensor(self.scaled_rewards(), dtype=torch.float32, device=device),
                "done": torch.as_tensor(self.terminals, dtype=torch.float32, device=device)}


def returns_to_go(rewards, idx, next_idx, gamma: float) -> np.ndarray:
    """The discounted return of the rest of each transition's episode, G_i = r_i + gamma G_{i+1} (N,), float64:
    what the ``mc`` critic regresses on. Transitions are stored episode by episode (as :func:`from_episodes` and
    the Minari loader store them); an episode ends where the next transition does not start at this one's next
    observation (a termination or a timeout alike: at a timeout the return is cut there, not bootstrapped)."""
    r, idx, nxt = (np.asarray(x) for x in (rewards, idx, next_idx))
    if not (r.shape == idx.shape == nxt.shape and r.ndim == 1):
        raise ValueError(f"rewards, idx, next_idx: expected three (N,) arrays, got {r.shape}, {idx.shape}, {nxt.shape}")
    if not (np.isfinite(gamma) and 0 <= gamma <= 1):
        raise ValueError(f"gamma: expected a discount in [0, 1], got {gamma!r}")
    cont = np.zeros(r.shape, bool)
    cont[:-1] = nxt[:-1] == idx[1:]
    g, acc = np.empty(r.shape, np.float64), 0.0
    for i in range(r.size - 1, -1, -1):
        acc = float(r[i]) + (gamma * acc if cont[i] else 0.0)
        g[i] = acc
    return g


def check_return_span(dataset_id: str, returns: np.ndarray) -> float:
    """max - min of the episode returns, refused when ~0 (the locomotion scaling divides by it)."""
    r = np.asarray(returns, dtype=np.float64)
    span = float(r.max() - r.min()) if r.size else 0.0
    if span <= MIN_RETURN_SPAN * max(1.0, float(np.abs(r).max()) if r.size else 0.0):
        factor = "infinity" if span == 0 else f"{1000.0 / span:.3g}"
        raise ValueError(
            f"reward_scaling: the {r.size} episode(s) of {dataset_id!r} have (almost) the same return "
            f"({float(r.mean()) if r.size else float('nan'):.6g}, span {span:.3g}), so the locomotion scaling "
            f"r * 1000 / (max return - min return) would multiply the rewards by {factor}; use "
            "reward_scaling='none' (raw rewards) for this dataset")
    return span


def _resolve_scaling(dataset_id: str, scaling: str) -> str:
    if scaling not in REWARD_SCALINGS:
        raise ValueError(f"reward_scaling: expected one of {REWARD_SCALINGS}, got {scaling!r}")
    if scaling != "auto":
        return scaling
    low = dataset_id.lower()
    if "antmaze" in low:
        return "antmaze"
    if any(task in low.replace("-", "").replace("_", "") for task in LOCOMOTION_TASKS):
        return "locomotion"
    return "none"


def _flatten(space, x: np.ndarray) -> np.ndarray:
    """Observations of one episode (T+1 rows, or a dict of them) -> (T+1, k) float."""
    import gymnasium as gym
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([np.asarray(x[k], dtype=np.float64).reshape(len(x[k]), -1) for k in sorted(space.spaces)], 1)
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def flatten_observation(space, obs) -> np.ndarray:
    """One environment observation -> (k,) in the dataset's flattening (Dict keys in sorted order)."""
    import gymnasium as gym
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([np.asarray(obs[k], dtype=np.float64).ravel() for k in sorted(space.spaces)])
    return np.asarray(obs, dtype=np.float64).ravel()


def from_episodes(dataset_id: str, episodes: list[dict], action_low: np.ndarray, action_high: np.ndarray, *,
                  reward_scaling: str = "auto", metadata: Optional[dict] = None, obs_space=None) -> OfflineData:
    """Build :class:`OfflineData` from episodes given as dicts with ``observations`` (T+1, ...),
    ``actions`` (T, d), ``rewards``, ``terminations``, ``truncations`` (T,). Checks shapes and finiteness."""
    if not episodes:
        raise ValueError(f"dataset: {dataset_id!r} has no episodes (an empty dataset)")
    low, high = np.asarray(action_low, np.float64), np.asarray(action_high, np.float64)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high > low)):
        raise ValueError(f"action space: expected a bounded box with high > low, got low={low}, high={high}")
    rows, idx, nxt, acts, rews, terms, touts, rets = [], [], [], [], [], [], [], []
    offset, k = 0, None
    for e, ep in enumerate(episodes):
        where = f"dataset: episode {e} of {dataset_id!r}"
        try:
            obs = (_flatten(obs_space, ep["observations"]) if obs_space is not None
                   else np.asarray(ep["observations"], np.float64))
            r = np.asarray(ep["rewards"], np.float64).reshape(-1)
            a = np.asarray(ep["actions"], np.float64)
            term = np.asarray(ep["terminations"], bool).reshape(-1)
            trunc = np.asarray(ep["truncations"], bool).reshape(-1)
        except KeyError as err:
            raise ValueError(f"{where} has no {err} array") from None
        except (TypeError, ValueError) as err:  # ragged lists, strings, objects
            raise ValueError(f"{where} holds arrays that are not numeric or not rectangular ({err})") from None
        T = len(r)
        if T == 0 or a.size == 0:
            raise ValueError(f"{where} is empty (no transitions: {T} rewards, {len(a)} actions); remove it from the "
                             "dataset or make the dataset again")
        if obs.ndim != 2 or a.ndim not in (1, 2):
            raise ValueError(f"{where} has observations of shape {obs.shape} and actions of shape {a.shape}; expected "
                             "(T+1, k) and (T, d)")
        a = a.reshape(len(a), -1)
        if obs.shape[0] != T + 1 or a.shape[0] != T or term.shape[0] != T or trunc.shape[0] != T:
            raise ValueError(f"{where} has inconsistent lengths: {obs.shape[0]} observations, {a.shape[0]} actions, "
                             f"{T} rewards, {term.shape[0]} terminations, {trunc.shape[0]} truncations "
                             "(expected T+1, T, T, T, T)")
        if k is None:
            k = obs.shape[1]
        elif obs.shape[1] != k:
            raise ValueError(f"observation space: episode {e} of {dataset_id!r} has {obs.shape[1]}-dim observations, "
                             f"episode 0 has {k}-dim ones")
        if a.shape[1] != low.shape[0]:
            raise ValueError(f"action space: episode {e} of {dataset_id!r} has {a.shape[1]}-dim actions, "
                             f"the environment has {low.shape[0]}")
        for name, arr in (("observations", obs), ("actions", a), ("rewards", r)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"dataset: {dataset_id!r} episode {e} has {int((~np.isfinite(arr)).sum())} "
                                 f"NaN/inf values in its {name}")
        rows.append(obs)
        idx.append(offset + np.arange(T))
        nxt.append(offset + np.arange(1, T + 1))
        offset += T + 1
        acts.append(a), rews.append(r), terms.append(term), touts.append(trunc), rets.append(r.sum())
    obs_rows = np.concatenate(rows)
    scaling = _resolve_scaling(dataset_id, reward_scaling)
    if scaling == "locomotion":
        check_return_span(dataset_id, np.asarray(rets))
    actions = np.concatenate(acts)
    a_unit = np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1.0, 1.0)
    return OfflineData(dataset_id=dataset_id, obs_rows=obs_rows.astype(np.float32), idx=np.concatenate(idx),
                       next_idx=np.concatenate(nxt), actions=a_unit.astype(np.float32),
                       rewards=np.concatenate(rews).astype(np.float32),
                       terminals=np.concatenate(terms).astype(np.float32),
                       timeouts=np.concatenate(touts).astype(np.float32), episode_returns=np.asarray(rets),
                       action_low=low.astype(np.float32), action_high=high.astype(np.float32),
                       reward_scaling=scaling, metadata=dict(metadata or {}))


def check_dataset_id(name: str, dataset_id) -> str:
    """A Minari dataset id ``NAMESPACE/NAME-vN`` (ASCII letters, digits, ``_``, ``-``), else a ``ValueError``
    naming the argument ``name``. Such an id is always a path inside the Minari root."""
    if not isinstance(dataset_id, str) or not DATASET_ID_RE.fullmatch(dataset_id):
        raise ValueError(f"{name}: {dataset_id!r} is not a Minari dataset id: expected NAMESPACE/NAME-vN (e.g. "
                         "D4RL/door/human-v2 or local/hopper/medium-v0): ASCII letters, digits, '_' and '-', parts "
                         "separated by '/', ending in -v and a version number")
    longest = max(dataset_id.split("/"), key=len)
    if len(longest) > MAX_ID_PART:
        raise ValueError(f"{name}: the part {longest[:20]}... of the dataset id has {len(longest)} characters; a folder "
                         f"name of at most {MAX_ID_PART} is needed (most file systems allow 255)")
    return dataset_id


def dataset_dir(dataset_id: str, name: str = "dataset") -> Path:
    """The folder of ``dataset_id`` in the local Minari root (``MINARI_DATASETS_PATH``), checked to lie inside it."""
    from minari.storage.datasets_root_dir import get_dataset_path
    check_dataset_id(name, dataset_id)
    root = Path(os.path.abspath(get_dataset_path()))
    path = Path(os.path.normpath(root / dataset_id))
    if root not in path.parents:
        raise ValueError(f"{name}: {dataset_id!r} would be stored at {path}, outside the Minari root {root}")
    return path


def _how_to_make() -> str:
    from minari.storage.datasets_root_dir import get_dataset_path
    return ("make a local dataset instead, e.g. `aepo-lite make-dataset --env Hopper-v5 --quality medium --steps "
            f"200000 --name local/hopper/medium-v0` (datasets live under MINARI_DATASETS_PATH, now {get_dataset_path()})")


def _damaged(dataset_id: str, folder: Path, e: BaseException) -> ValueError:
    return ValueError(f"dataset: the local copy of {dataset_id!r} in {folder} cannot be read ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:240]}): it is damaged (an interrupted make or download, or an edit); "
                      f"delete the folder {folder} and make or download the dataset again")


def _missing_package(dataset_id: str, e: ImportError) -> ValueError:
    return ValueError(f"dataset: reading {dataset_id!r} needs a package that is not installed ({type(e).__name__}: "
                      f"{e}): Minari stores some datasets as arrow or parquet files, read with pyarrow (`pip install "
                      f"'minari[arrow]'`)")


def open_minari(dataset_id: str, download: bool = True):
    """``minari.load_dataset`` with a clear error: the local copy, else a download (online users).

    A malformed id fails before anything is read; a local copy that cannot be read is reported as
    damaged (with the folder to delete), never as a failed download."""
    import minari
    folder = dataset_dir(dataset_id)
    if folder.exists():
        if not (folder / "data").is_dir():
            raise ValueError(f"dataset: {folder} exists but holds no Minari dataset (no data/ folder: the remains of a "
                             f"failed make or download?); delete the folder {folder} and make or download it again")
        try:
            return minari.load_dataset(dataset_id)
        except MemoryError:
            raise
        except ImportError as e:  # a storage format whose package is missing, not a damaged copy
            raise _missing_package(dataset_id, e) from None
        except Exception as e:  # a truncated metadata.json (JSONDecodeError), an unreadable HDF5 file (OSError) ...
            raise _damaged(dataset_id, folder, e) from None
    how = _how_to_make()
    if not download:
        raise ValueError(f"dataset: {dataset_id!r} is not in the local Minari root; {how}")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except MemoryError:
        raise
    except Exception as e:  # offline, unknown id, missing huggingface_hub, incompatible version ...
        raise ValueError(f"dataset: {dataset_id!r} is not in the local Minari root and downloading it "
                         f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}). If you are offline or the id "
                         f"is unknown (see `minari list remote`): {how}") from None




def load_minari(dataset_id: str, *, reward_scaling: str = "auto", download: bool = True,
                check_env: bool = True) -> tuple[OfflineData, object]:
    """Load a Minari dataset as transitions. Returns (data, minari_dataset).

    Raises ``ValueError`` for a malformed, unknown or unreachable id, a damaged local copy, an empty
    dataset or episode, episodes of other sizes, NaN/inf values, unusable reference scores, returns
    too alike for the locomotion scaling, or observation/action spaces that differ from the
    dataset's evaluation environment.
    """
    import gymnasium as gym
    ds = open_minari(dataset_id, download=download)
    if ds.total_steps == 0 or ds.total_episodes == 0:
        raise ValueError(f"dataset: {dataset_id!r} has no transitions (an empty dataset)")
    obs_space, act_space = ds.observation_space, ds.action_space
    if not isinstance(act_space, gym.spaces.Box):
        raise ValueError(f"action space: {dataset_id!r} has a {type(act_space).__name__} action space; "
                         "only continuous (Box) actions are supported")
    if check_env:
        try:
            env = ds.recover_environment(eval_env=True)
        except Exception as e:
            raise ValueError(f"dataset: cannot make the evaluation environment of {dataset_id!r} "
                             f"({type(e).__name__}: {e})") from None
        try:
            e_obs, e_act = env.observation_space, env.action_space
            if gym.spaces.flatdim(e_obs) != gym.spaces.flatdim(obs_space) or type(e_obs) is not type(obs_space):
                raise ValueError(f"observation space: the dataset {dataset_id!r} has {obs_space}, its environment "
                                 f"{env.spec.id if env.spec else env} has {e_obs}")
            if (not isinstance(e_act, gym.spaces.Box) or e_act.shape != act_space.shape
                    or not np.allclose(e_act.low, act_space.low) or not np.allclose(e_act.high, act_space.high)):
                raise ValueError(f"action space: the dataset {dataset_id!r} has {act_space}, its environment "
                                 f"{env.spec.id if env.spec else env} has {e_act}")
        finally:
            env.close()
    meta = dict(ds.storage.metadata)
    from aepo_lite.rl.evaluation import check_reference_scores
    check_reference_scores(dataset_id, meta)  # before any training, not at the first evaluation
    try:
        episodes = [{"observations": ep.observations, "actions": ep.actions, "rewards": ep.rewards,
                     "terminations": ep.terminations, "truncations": ep.truncations} for ep in ds.iterate_episodes()]
    except MemoryError:
        raise
    except Exception as e:  # h5py: a truncated or garbled file (OSError), a missing group (KeyError) ...
        raise _damaged(dataset_id, dataset_dir(dataset_id), e) from None
    data = from_episodes(dataset_id, episodes, act_space.low, act_space.high, reward_scaling=reward_scaling,
                         metadata=meta, obs_space=obs_space)
    return data, ds




def description_info(metadata: dict) -> dict:
    """The JSON that ``make-dataset`` writes into the description (empty for other datasets)."""
    try:
        return json.loads(metadata.get("description") or "{}")
    except (TypeError, ValueError):
        return {}
