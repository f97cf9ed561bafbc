"""Minari loading (bootstrapping, scaling, bad inputs), normalised scores, local dataset making."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

minari = pytest.importorskip("minari")
gym = pytest.importorskip("gymnasium")

from aepo_lite.rl.data import from_episodes, load_minari  # noqa: E402
from aepo_lite.rl.evaluation import normalized_score, reference_scores, run_episodes, summarize_returns  # noqa: E402
from conftest import load_script




@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("AEPO_POLICY_CACHE", str(tmp_path / "policies"))
    return tmp_path


def _episodes(rng, lengths=(5, 7, 4), terminated=(True, False, True), obs_dim=11, act_dim=3):
    eps = []
    for T, term in zip(lengths, terminated):
        eps.append({"observations": rng.normal(size=(T + 1, obs_dim)).astype(np.float32),
                    "actions": rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                    "rewards": rng.normal(1.0, 0.5, size=T),
                    "terminations": np.r_[np.zeros(T - 1, bool), term],
                    "truncations": np.r_[np.zeros(T - 1, bool), not term]})
    return eps


def _write(name, eps, **kw):
    from minari.data_collector import EpisodeBuffer
    bufs = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                          terminations=e["terminations"], truncations=e["truncations"], infos={})
            for i, e in enumerate(eps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(name, bufs, env=kw.pop("env", "Hopper-v5"), author="t",
                                                  author_email="t@t", **kw)


def test_loader_bootstraps_on_terminations_only(minari_root):
    rng = np.random.default_rng(0)
    eps = _episodes(rng)
    _write("t/hopper/raw-v0", eps, ref_min_score=0.0, ref_max_score=10.0)
    data, ds = load_minari("t/hopper/raw-v0")
    assert data.n == 16 and data.obs_rows.shape == (16 + 3, 11)
    off = 0
    for e in eps:
        T = len(e["rewards"])
        rows = data.idx[data.idx >= off][:T]
        np.testing.assert_allclose(data.obs_rows[rows], e["observations"][:T], rtol=1e-6)
        np.testing.assert_allclose(data.obs_rows[rows + 1], e["observations"][1:], rtol=1e-6)
        off += T + 1
    # done = terminations, never truncations: episode 2 ends truncated, so its last transition bootstraps
    ends = np.cumsum([5, 7, 4]) - 1
    np.testing.assert_array_equal(data.terminals[ends], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(data.timeouts[ends], [0.0, 1.0, 0.0])
    assert data.terminals.sum() == 2 and data.timeouts.sum() == 1
    # next state of the last transition of each episode is that episode's final observation row
    np.testing.assert_allclose(data.obs_rows[data.next_idx[ends[1]]], eps[1]["observations"][-1], rtol=1e-6)
    # IQL locomotion scaling: r * 1000 / (max return - min return)
    rets = np.array([e["rewards"].sum() for e in eps])
    assert data.reward_scaling == "locomotion"
    np.testing.assert_allclose(data.scaled_rewards(), np.concatenate([e["rewards"] for e in eps]) * 1000 / np.ptp(rets),
                               rtol=1e-5)
    assert data.metadata["ref_max_score"] == 10.0
    env = ds.recover_environment(eval_env=True)
    assert env.spec.id == "Hopper-v5"


def test_reward_conventions_and_action_box():
    rng = np.random.default_rng(1)
    eps = _episodes(rng, lengths=(3,), terminated=(False,), act_dim=2)
    eps[0]["actions"] = np.array([[0.0, 2.0], [1.0, 3.0], [0.5, 2.5]])
    d = from_episodes("D4RL/antmaze/umaze-v1", eps, [0.0, 2.0], [1.0, 3.0])
    assert d.reward_scaling == "antmaze"
    np.testing.assert_allclose(d.scaled_rewards(), eps[0]["rewards"] - 1.0, rtol=1e-6)
    np.testing.assert_allclose(d.actions, [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(d.to_action_box(d.actions), eps[0]["actions"], atol=1e-6)
    assert from_episodes("D4RL/door/human-v2", eps, [0, 2], [1, 3]).reward_scaling == "none"
    with pytest.raises(ValueError, match="reward_scaling"):
        from_episodes("x", eps, [0, 2], [1, 3], reward_scaling="bogus")


def test_take_episodes_is_the_dataset_of_those_episodes():
    """take_episodes(which) against from_episodes on the same episodes in that order: every array equal, the
    locomotion factor the subset's own; bad indices named."""
    rng = np.random.default_rng(3)
    eps = _episodes(rng, lengths=(5, 7, 4, 6), terminated=(True, False, True, False))
    eps[2]["rewards"] = eps[2]["rewards"] + 3.0  # returns spread differently in the subset
    full = from_episodes("local/hopper/medium-v0", eps, -np.ones(3), np.ones(3))
    for which in ([2, 0], [0, 1, 2, 3], [1, 3, 2]):
        sub = full.take_episodes(np.array(which))
        ref = from_episodes("local/hopper/medium-v0", [eps[i] for i in which], -np.ones(3), np.ones(3))
        for f in ("obs_rows", "idx", "next_idx", "actions", "rewards", "terminals", "timeouts", "episode_returns"):
            np.testing.assert_array_equal(getattr(sub, f), getattr(ref, f), err_msg=f"{which} {f}")
        assert sub.n_episodes == len(which) and sub.reward_scaling == "locomotion"
        assert sub.reward_factor() == pytest.approx(ref.reward_factor())
    for bad, match in [(np.array([], int), "non-empty"), ([0, 0], "repeated"), ([4], r"\[0, 4\)"),
                       ([-1], r"\[0, 4\)"), ([0.0], "indices")]:
        with pytest.raises(ValueError, match=match):
            full.take_episodes(bad)
    with pytest.raises(ValueError, match="same return"):  # one episode: no spread for the locomotion scaling
        full.take_episodes(np.array([1]))


def test_bad_data_is_named():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="empty dataset"):
        from_episodes("x/y/z-v0", [], [-1], [1])
    eps = _episodes(rng)
    eps[1]["observations"][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"episode 1 .*NaN/inf .*observations"):
        from_episodes("x/y/z-v0", eps, -np.ones(3), np.ones(3))
    eps = _episodes(rng)
    eps[2]["rewards"][0] = np.inf
    with pytest.raises(ValueError, match="rewards"):
        from_episodes("x/y/z-v0", eps, -np.ones(3), np.ones(3))
    eps = _episodes(rng)
    eps[0]["actions"] = eps[0]["actions"][:-1]
    with pytest.raises(ValueError, match="inconsistent lengths"):
        from_episodes("x/y/z-v0", eps, -np.ones(3), np.ones(3))


def test_unknown_dataset_fails_fast_with_how_to(minari_root, monkeypatch):
    """The download path is installed and tried: a dataset not on disk goes to Minari's remote (offline here,
    and made so with huggingface_hub's own switch so that no retries wait on the network), and its failure is
    reported with the cause and how to make a local dataset. Before the `hf` extra, every download failed on a
    missing huggingface_hub, online too."""
    import huggingface_hub.constants as hub  # the rl extra's; an ImportError here is the bug this test guards
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # conftest sets the variable; this holds if it was overridden
    with pytest.raises(ValueError, match="make-dataset") as e:
        load_minari("nobody/nothing/none-v0")
    assert "downloading it failed" in str(e.value) and "not installed" not in str(e.value), e.value
    with pytest.raises(ValueError, match="not in the local Minari root"):
        load_minari("nobody/nothing/none-v0", download=False)


def test_space_mismatch_with_environment(minari_root):
    rng = np.random.default_rng(3)
    eps = _episodes(rng, obs_dim=5)
    _write("t/hopper/wrong-v0", eps, observation_space=gym.spaces.Box(-np.inf, np.inf, (5,), np.float32))
    with pytest.raises(ValueError, match="observation space"):
        load_minari("t/hopper/wrong-v0")
    eps = _episodes(rng, act_dim=2)
    _write("t/hopper/wrongact-v0", eps, action_space=gym.spaces.Box(-1, 1, (2,), np.float32))
    with pytest.raises(ValueError, match="action space"):
        load_minari("t/hopper/wrongact-v0")


def test_nan_in_stored_dataset(minari_root):
    eps = _episodes(np.random.default_rng(4))
    eps[0]["actions"][1, 0] = np.nan
    _write("t/hopper/nan-v0", eps)
    with pytest.raises(ValueError, match="NaN/inf values in its actions"):
        load_minari("t/hopper/nan-v0")


def test_normalized_score_arithmetic():
    assert normalized_score(55.0, 10.0, 100.0) == pytest.approx(50.0)
    np.testing.assert_allclose(normalized_score([10.0, 100.0, 145.0], 10.0, 100.0), [0.0, 100.0, 150.0])
    assert normalized_score(3.0, None, 100.0) is None
    with pytest.raises(ValueError, match="ref_max"):
        normalized_score(1.0, 5.0, 5.0)
    s = summarize_returns([20.0, 40.0], 0.0, 200.0)
    assert s == {"return_mean": 30.0, "return_std": 10.0, "normalized_score_mean": 15.0, "normalized_score_std": 5.0,
                 "episodes": 2}
    assert summarize_returns([1.0], None, None)["normalized_score_mean"] is None
    # metadata first; D4RL's published returns only for D4RL ports; else None with a warning
    assert reference_scores("mujoco/hopper/medium-v0", {"ref_min_score": -1, "ref_max_score": 9}) == (-1.0, 9.0, "dataset metadata")
    lo, hi, src = reference_scores("D4RL/door/human-v2", {})
    assert (lo, hi) == pytest.approx((-56.512833, 2880.5693087298737)) and "D4RL" in src
    with pytest.warns(UserWarning, match="None"):
        assert reference_scores("mujoco/hopper/medium-v0", {})[:2] == (None, None)


def test_run_episodes_seeds_do_not_depend_on_parallelism():
    make = lambda: gym.make("Hopper-v5")  # noqa: E731
    zero = lambda obs: np.zeros((obs.shape[0], 3))  # noqa: E731
    a, _ = run_episodes(make, zero, 4, seed=7, n_envs=1)
    b, t = run_episodes(make, zero, 4, seed=7, n_envs=3)
    assert [e.seed for e in b] == [7, 8, 9, 10]
    np.testing.assert_allclose([e.ret for e in a], [e.ret for e in b])
    assert len({round(e.ret, 6) for e in a}) > 1  # different seeds, different starts
    assert t["actions"] == sum(e.length for e in b)
    rec, _ = run_episodes(make, zero, 10**6, seed=0, n_envs=3, record=True, max_transitions=100)
    assert sum(e.length for e in rec) == 100
    assert all(e.observations.shape == (e.length + 1, 11) for e in rec)
    assert rec[-1].truncations[-1] or rec[-1].terminations[-1]


def test_make_dataset_tiny_repeatable(minari_root, capsys, monkeypatch, tmp_path):
    pytest.importorskip("stable_baselines3")
    from aepo_lite.rl.datasets import DatasetRecipe, make_dataset
    from aepo_lite.rl.data import description_info
    kw = dict(train_steps=200, eval_every=100, learning_starts=100, eval_episodes=2, ref_episodes=4, n_envs=4)
    ds = make_dataset(DatasetRecipe("Hopper-v5", "medium", 250, "t/hopper/medium-v0", **kw), progress=False)
    assert ds.total_steps == 250
    meta = ds.storage.metadata
    info = description_info(meta)
    assert info["ref_episodes"] == 4 and len(info["ladder"]) == 2
    # what made the ladder and the data is recorded: the versions installed here
    import importlib.metadata as md
    for key in ("made_with", "ladder_made_with"):
        assert info[key]["versions"]["mujoco"] == md.version("mujoco")
        assert info[key]["versions"]["stable-baselines3"] == md.version("stable-baselines3")
        assert info[key]["versions"]["torch"] == md.version("torch") and info[key]["cpu"]
    # ref_min_score is the mean return of the seeded random policy: recompute it independently
    rng = np.random.default_rng(1)
    eps, _ = run_episodes(lambda: gym.make("Hopper-v5"), lambda o: rng.uniform(-1, 1, (o.shape[0], 3)), 4,
                          seed=1_000_000, n_envs=4)
    assert meta["ref_min_score"] == pytest.approx(np.mean([e.ret for e in eps]))
    # ref_max_score is the mean return of the best ladder snapshot, deterministic, on its own seeds
    from aepo_lite.rl.datasets import _load_snapshot, _sb3_policy, train_policy_ladder
    lad = train_policy_ladder(DatasetRecipe("Hopper-v5", "medium", 250, "t/hopper/medium-v0", **kw), progress=False)
    best = max(info["ladder"], key=lambda s: s["eval_return"])
    eps, _ = run_episodes(lambda: gym.make("Hopper-v5"), _sb3_policy(_load_snapshot(lad, best), 0.0, None), 4,
                          seed=2_000_000, n_envs=4)
    assert meta["ref_max_score"] == pytest.approx(np.mean([e.ret for e in eps]))
    data, _ = load_minari("t/hopper/medium-v0")
    assert data.n == 250 and abs(info["dataset_mean_episode_return"] - data.episode_returns.mean()) < 1e-6
    # same recipe, same data (the policy ladder is cached, the collection seeded)
    ds2 = make_dataset(DatasetRecipe("Hopper-v5", "medium", 250, "t/hopper/medium2-v0", **kw), progress=False)
    e1, e2 = next(iter(ds.iterate_episodes())), next(iter(ds2.iterate_episodes()))
    np.testing.assert_array_equal(e1.actions, e2.actions)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_dataset(DatasetRecipe("Hopper-v5", "medium", 250, "t/hopper/medium-v0", **kw), progress=False)
    r = make_dataset(DatasetRecipe("Hopper-v5", "random", 120, "t/hopper/random-v0", **kw), progress=False)
    assert r.total_steps == 120 and r.storage.metadata["ref_max_score"] == meta["ref_max_score"]
    # the dataset's own policy with action noise: at noise 0 the medium snapshot's deterministic return, recomputed
    from aepo_lite.rl.oracle import snapshot_noise_scores
    med = next(s for s in info["ladder"] if s["step"] == info["medium_snapshot_step"])
    eps, _ = run_episodes(lambda: gym.make("Hopper-v5"), _sb3_policy(_load_snapshot(lad, med), 0.0, None), 3,
                          seed=100_000, n_envs=3)
    at0, at1 = snapshot_noise_scores("t/hopper/medium-v0", (0.0, 1.0), episodes=3)
    lo, hi = meta["ref_min_score"], meta["ref_max_score"]
    assert at0["return_mean"] == pytest.approx(np.mean([e.ret for e in eps]))
    assert at0["score_mean"] == pytest.approx((at0["return_mean"] - lo) / (hi - lo) * 100)
    assert at1["noise"] == 1.0 and at1["return_mean"] != at0["return_mean"]
    with pytest.raises(ValueError, match="random dataset; its actions are not the medium snapshot's"):
        snapshot_noise_scores("t/hopper/random-v0")
    with pytest.raises(ValueError, match="noises"):
        snapshot_noise_scores("t/hopper/medium-v0", (-0.1,))
    # a cached ladder other than the one that made the data (here: one snapshot evaluating otherwise) is refused,
    # naming the setting, instead of lending the data's name to another policy; the same ladder copied passes
    import json
    import shutil
    copy = tmp_path / "other_cache" / lad.name
    shutil.copytree(lad, copy)
    assert snapshot_noise_scores("t/hopper/medium-v0", (0.0,), episodes=3, policy_cache=copy.parent)[0] == at0
    other = json.loads((copy / "ladder.json").read_text())
    other["snapshots"][-1]["eval_return"] += 1.0
    (copy / "ladder.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=f"policy_cache: the ladder in {copy} is not the one that made "
                                         "t/hopper/medium-v0 .at step 200 "):
        snapshot_noise_scores("t/hopper/medium-v0", (0.0,), episodes=3, policy_cache=copy.parent)
    # the oracle best-of-N: without noise every candidate is the snapshot's action, so any N replays the
    # deterministic policy's episodes (same reset seeds as snapshot_noise_scores')
    from aepo_lite.rl.oracle import snapshot_oracle_scores
    o1, o4 = snapshot_oracle_scores("t/hopper/medium-v0", (1, 4), horizon=5, episodes=3, noise=0.0)
    assert o1["return_mean"] == pytest.approx(at0["return_mean"]) and o4["return_mean"] == pytest.approx(at0["return_mean"])
    assert o4["candidates"] == 4 and o4["score_mean"] == pytest.approx(at0["score_mean"])
    (d1,) = snapshot_oracle_scores("t/hopper/medium-v0", (1,), episodes=2)  # the data's own noise (0.1)
    # episodes split across calls (--first-episode) draw as one call does, so joined they are its row
    from aepo_lite.rl.diagnostics import join_oracle_parts
    (w2,) = snapshot_oracle_scores("t/hopper/medium-v0", (2,), horizon=4, episodes=2)
    parts = [dict(snapshot_oracle_scores("t/hopper/medium-v0", (2,), horizon=4, episodes=1, first_episode=i)[0],
                  dataset="t/hopper/medium-v0", snapshot="medium") for i in (0, 1)]
    assert [p["episode_scores"] for p in parts] == [w2["episode_scores"][:1], w2["episode_scores"][1:]]
    # saved as it goes to resume_dir, one file an episode named by the row's settings: the same row, and a rerun
    # replays both episodes without searching (another noise is another file); the row's seconds are the episodes'
    # search time (a fake clock: 10 s a search), which the rerun reports too
    import types

    import aepo_lite.rl.oracle as om
    steps, clock, search = tmp_path / "oracle_steps", [0.0], om.rollout_returns

    def timed(*args):
        clock[0] += 10.0
        return search(*args)
    with monkeypatch.context() as m:
        m.setattr(om, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
        m.setattr(om, "rollout_returns", timed)
        (first,) = snapshot_oracle_scores("t/hopper/medium-v0", (2,), horizon=4, episodes=2, resume_dir=steps)
        assert first["episode_scores"] == w2["episode_scores"] and first["seconds"] == 10.0 * 2 * w2["length_mean"]
        m.setattr(om, "rollout_returns", None)  # a search would call it
        (again,) = snapshot_oracle_scores("t/hopper/medium-v0", (2,), horizon=4, episodes=2, resume_dir=steps)
        assert again["episode_scores"] == w2["episode_scores"] and again["seconds"] == first["seconds"]
    assert sorted(f.name[-8:] for f in steps.iterdir()) == ["ep0.json", "ep1.json"]
    snapshot_oracle_scores("t/hopper/medium-v0", (2,), horizon=4, episodes=1, noise=0.2, resume_dir=steps)
    assert len(list(steps.iterdir())) == 3
    assert parts[1]["first_episode"] == 1 and parts[1]["episode_scores"] != parts[0]["episode_scores"]
    (j,) = join_oracle_parts([{**q, "episode_scores": " ".join(map(repr, q["episode_scores"]))} for q in parts])
    for k in ("score_mean", "score_std", "return_mean", "length_mean"):
        assert j[k] == pytest.approx(w2[k])
    # the sequence search: without noise every trajectory is the deterministic policy's, so it replays it too; with
    # the data's noise the episode returns at least what the best trajectory found at any step promised (the prefix
    # taken plus that trajectory's return: the search keeps its plan, so it can only improve on it)
    (q3,) = snapshot_oracle_scores("t/hopper/medium-v0", (3,), episodes=3, noise=0.0, search="sequence")
    assert q3["search"] == "sequence" and q3["return_mean"] == pytest.approx(at0["return_mean"])
    import aepo_lite.rl.oracle as dsm
    promised, taken, real = [], [], dsm.rollout_returns

    def recording(*args, **kw):
        g = real(*args, **kw)
        promised.append(sum(taken) + g.max())
        return g

    env, scratch = dsm._mujoco_envs("t/hopper/medium-v0", "Hopper-v5", 4, 0, "test")
    step = env.step

    def taking(a):
        out = step(a)
        taken.append(out[1])
        return out
    env.step = taking
    mu_med = _sb3_policy(_load_snapshot(lad, med), 0.0, None)
    with monkeypatch.context() as m:
        m.setattr(dsm, "rollout_returns", recording)
        for ep in range(3):
            promised.clear(), taken.clear()
            bar = _StepCounter()
            ret, t = dsm._sequence_episode(env, scratch, mu_med, 4, 100_000 + ep, np.random.default_rng(ep), 0.1,
                                           1000, 1.0, bar)
            assert t == len(taken) == len(promised) == bar.n and ret == pytest.approx(sum(taken))
            assert ret >= max(promised) - 1e-6 and ret == pytest.approx(promised[-1])
    # the step search scoring each candidate by the mean of M rollouts: draw m's continuation noise the same for
    # every candidate and another for each draw, the action taken the candidate of the largest mean
    env2, scratch6 = dsm._mujoco_envs("t/hopper/medium-v0", "Hopper-v5", 6, 0, "test")
    calls, acted, step2 = [], [], env2.step

    def scored(state, scr, first, policy, z, gamma):
        g = real(state, scr, first, policy, z, gamma)
        calls.append((first.copy(), np.array(z), g))
        return g

    def acting(a):
        acted.append(np.array(a))
        return step2(a)
    env2.step = acting
    with monkeypatch.context() as m:
        m.setattr(dsm, "rollout_returns", scored)
        bar = _StepCounter()
        ret, t = dsm._oracle_episode(env2, scratch6, mu_med, 3, 100_000, np.random.default_rng(0), 0.1, 0.1, 6, 1.0,
                                     draws=2, bar=bar)
    assert len(calls) == len(acted) == t == bar.n > 0  # the progress bar advances once a step taken
    for (first, z, g), a in zip(calls, acted):
        assert first.shape == (6, 3) and np.array_equal(first[0::2], first[1::2])
        assert np.array_equal(z[0::2], np.tile(z[0], (3, 1, 1))) and np.array_equal(z[1::2], np.tile(z[1], (3, 1, 1)))
        assert not np.array_equal(z[0], z[1])
        np.testing.assert_array_equal(a, first[2 * int(np.argmax(g.reshape(3, 2).mean(1)))])
    # a killed episode resumes at the step it reached (both searches): stopped after 3 steps and started again with
    # its checkpoint, it returns exactly what an uninterrupted episode returns, searching only the steps left; a
    # finished episode replays without a search; a file whose actions do not replay to its observation is refused
    ck = tmp_path / "steps" / "ep.json"
    plays = [lambda bar, c: dsm._oracle_episode(env2, scratch6, mu_med, 3, 100_000, np.random.default_rng(0), 0.1,
                                                0.1, 6, 1.0, draws=2, bar=bar, ckpt=c),
             lambda bar, c: dsm._sequence_episode(env2, scratch6, mu_med, 3, 100_001, np.random.default_rng(1), 0.1, 6,
                                                  1.0, bar, c)]
    wholes = []
    for play in plays:
        ck.unlink(missing_ok=True)
        whole = play(None, None)
        wholes.append(whole)
        assert whole[1] > 4 and not ck.exists()
        with pytest.raises(KeyboardInterrupt):
            play(_Interrupt(3), dsm._EpisodeCheckpoint(ck, every=0))  # written after every step
        assert len(json.loads(ck.read_text())["actions"]) == 3
        for left in (whole[1] - 3, 0):
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(dsm, "rollout_returns", scored)
                bar = _StepCounter()
                assert play(bar, dsm._EpisodeCheckpoint(ck)) == whole
            assert len(calls) == left and bar.n == whole[1]
        saved = json.loads(ck.read_text())
        saved["obs"][0] += 1e-9
        ck.write_text(json.dumps(saved))
        with pytest.raises(ValueError, match="resume_dir: replaying the .* actions saved in .* does not reach"):
            play(None, dsm._EpisodeCheckpoint(ck))
    # each write records the seconds its saved steps took over every process that took them (a fake clock: 10 s a
    # search): a resumed episode's elapsed() is its whole search time, a replay adds none, and a file written
    # before seconds were recorded counts from its resume (the fake clock and timed search of the row's check above)
    clock[0] = 0.0
    ck.unlink()
    with monkeypatch.context() as m:
        m.setattr(dsm, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
        m.setattr(dsm, "rollout_returns", timed)
        with pytest.raises(KeyboardInterrupt):
            plays[0](_Interrupt(3), dsm._EpisodeCheckpoint(ck, every=0))
        assert json.loads(ck.read_text())["seconds"] == 30.0
        for _ in range(2):
            c = dsm._EpisodeCheckpoint(ck)
            assert plays[0](None, c) == wholes[0] and c.elapsed() == 10.0 * wholes[0][1]
            assert json.loads(ck.read_text())["seconds"] == 10.0 * wholes[0][1]
        saved = json.loads(ck.read_text())
        del saved["seconds"]
        ck.write_text(json.dumps(saved))
        c = dsm._EpisodeCheckpoint(ck)
        assert plays[0](None, c) == wholes[0] and c.elapsed() == 0.0
    # by default written at most every 5 s (and at the end): fast steps stopped after 3 have the first one saved
    ck.unlink()
    with pytest.raises(KeyboardInterrupt):
        plays[0](_Interrupt(3), dsm._EpisodeCheckpoint(ck))
    assert len(json.loads(ck.read_text())["actions"]) == 1 and plays[0](None, dsm._EpisodeCheckpoint(ck)) == wholes[0]
    assert len(json.loads(ck.read_text())["actions"]) == wholes[0][1]  # the end is written
    with pytest.raises(ValueError, match="continuation_draws"):
        snapshot_oracle_scores("t/hopper/medium-v0", (2,), episodes=1, continuation_draws=2)  # no continuation noise
    # exact values of arbitrary (observation, action) pairs, the physics rebuilt from the observation, against an
    # environment that reached each state by playing the episode from its reset and then took the action and the
    # snapshot's actions itself (horizon 20, gamma 0.9)
    from aepo_lite.rl.oracle import exact_q_labels
    rng3 = np.random.default_rng(4)
    prefix, probe_at = np.clip(mu_med(np.zeros((1, 11)))[0] + 0.3 * rng3.standard_normal((30, 3)), -1, 1), (0, 7, 19)
    cands = rng3.uniform(-1, 1, (len(probe_at), 3))
    obs_at, want = [], []
    for k, a0 in zip(probe_at, cands):
        o, g = _replayed_return("Hopper-v5", 21, prefix[:k], a0, lambda o: mu_med(o[None])[0], 20, 0.9)
        obs_at.append(o)
        want.append(g)
    got = exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands, horizon=20, gamma=0.9, batch=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the data's own policy after the action: the snapshot plus draw m's noise sequence at each later step (the same
    # sequence for every pair), the mean over the draws; draws counted from first_draw
    from aepo_lite.rl.oracle import CONTINUATION_SEED
    seqs = [0.2 * np.random.default_rng([CONTINUATION_SEED, m]).standard_normal((19, 3)) for m in range(3)]

    def noisy(z):  # the reference asks for an action after its last step too (never taken): a zero row for it
        k, z = iter(range(20)), np.vstack([z, np.zeros((1, 3))])
        return lambda o: np.clip(mu_med(o[None])[0] + z[next(k)], -1, 1)
    per_draw = np.array([[_replayed_return("Hopper-v5", 21, prefix[:k], a0, noisy(z), 20, 0.9)[1]
                          for k, a0 in zip(probe_at, cands)] for z in seqs])
    kw = dict(horizon=20, gamma=0.9, batch=2, continuation_noise=0.2)
    np.testing.assert_allclose(exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands, draws=2, **kw),
                               per_draw[:2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands, first_draw=2, **kw),
                               per_draw[2], rtol=1e-6)
    assert np.abs(per_draw[0] - want).max() > 1e-3  # the noise does change the values
    for kw, match in [(dict(continuation_noise=-0.1), "continuation_noise"), (dict(draws=2), "draws/first_draw"),
                      (dict(continuation_noise=0.1, draws=0), "draws")]:
        with pytest.raises(ValueError, match=match):
            exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands, **kw)
    for kw, match in [(dict(horizon=0), "horizon"), (dict(gamma=0.0), "gamma"), (dict(batch=0), "batch")]:
        with pytest.raises(ValueError, match=match):
            exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands, **kw)
    with pytest.raises(ValueError, match="observations, actions"):
        exact_q_labels("t/hopper/medium-v0", np.array(obs_at), cands[:2])
    with pytest.raises(ValueError, match="obs: expected 11"):
        exact_q_labels("t/hopper/medium-v0", np.array(obs_at)[:, :10], cands)
    assert d1["noise"] == 0.1 and d1["return_mean"] != pytest.approx(at0["return_mean"])
    for kw, match in [(dict(candidates=(0,)), "candidates"), (dict(horizon=0), "horizon"), (dict(gamma=1.5), "gamma"),
                      (dict(noise=-1.0), "noise"), (dict(candidates=()), "candidates"),
                      (dict(continuation_noise=float("nan")), "continuation_noise"), (dict(search="beam"), "search"),
                      (dict(search="sequence", continuation_noise=0.1), "continuation_noise"),
                      (dict(first_episode=-1), "first_episode")]:
        with pytest.raises(ValueError, match=match):
            snapshot_oracle_scores("t/hopper/medium-v0", **kw)
    with pytest.raises(ValueError, match="random dataset"):
        snapshot_oracle_scores("t/hopper/random-v0")
    # its script writes a CSV + table and, rerun, skips the rows it has
    so = load_script("support_oracle")
    out = minari_root / "oracle.csv"
    args = ["--datasets", "t/hopper/medium-v0", "--candidates", "1", "2", "--horizon", "3", "--episodes", "1",
            "--out", str(out)]
    assert so.main(args) == 0
    first = out.read_text()
    assert len(first.strip().splitlines()) == 3 and "| t/hopper/medium-v0 | medium | step | 0.1 (0.1) | 2 | 3 |" in \
        out.with_suffix(".md").read_text()
    assert so.main(args) == 0 and out.read_text() == first
    assert len(list((minari_root / ".oracle.steps").iterdir())) == 2  # each row's episode saved beside --out
    assert "skip t/hopper/medium-v0 step N=2" in capsys.readouterr().out
    # the sequence search is another row (continuation noise: the candidates' own, the data's 0.1), skipped on a rerun
    assert so.main(args[:-2] + ["--search", "sequence", "--out", str(out)]) == 0
    assert "| t/hopper/medium-v0 | medium | sequence | 0.1 (0.1) | 2 | 3 | 1 | 0.1 |" in out.with_suffix(".md").read_text()
    assert so.main(args[:-2] + ["--search", "sequence", "--out", str(out)]) == 0
    assert "skip t/hopper/medium-v0 sequence N=2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        so.main(args[:-2] + ["--search", "sequence", "--continuation-noise", "0.1", "--out", str(out)])
    assert "--continuation-noise" in capsys.readouterr().err
    # a row split across processes by episode, each part its own CSV, then added and joined: the row of one run
    one = ["--datasets", "t/hopper/medium-v0", "--candidates", "2", "--horizon", "3"]
    whole, joined = minari_root / "whole.csv", minari_root / "joined.csv"
    parts = [minari_root / f"part{i}.csv" for i in (0, 1)]
    assert so.main(one + ["--episodes", "2", "--out", str(whole)]) == 0
    for i, part in enumerate(parts):
        assert so.main(one + ["--episodes", "1", "--first-episode", str(i), "--out", str(part)]) == 0
    assert "| 1 (from 1) |" in parts[1].with_suffix(".md").read_text()
    assert so.main(["--add", str(parts[1]), "--out", str(joined)]) == 0  # one part alone stays a part
    assert [r["first_episode"] for r in so.existing_rows(joined)] == ["1"]
    assert so.main(["--add", *map(str, parts), "--out", str(joined)]) == 0
    # --workers 2: the row's two episodes measured in two processes, each a part added to --out as it lands and
    # joined there
    par = minari_root / "par.csv"
    assert so.main(one + ["--episodes", "2", "--workers", "2", "--out", str(par)]) == 0
    (w,), (j,), (p2,) = so.existing_rows(whole), so.existing_rows(joined), so.existing_rows(par)
    for got in (j, p2):  # each the row of one process
        assert (got["episodes"], got["first_episode"]) == ("2", "0") and got["episode_scores"] == w["episode_scores"]
        for k in ("score_mean", "score_std", "return_mean", "length_mean"):
            assert float(got[k]) == pytest.approx(float(w[k]))
    capsys.readouterr()
    assert so.main(one + ["--episodes", "1", "--first-episode", "1", "--out", str(joined)]) == 0
    assert so.main(one + ["--episodes", "2", "--workers", "2", "--out", str(par)]) == 0  # a rerun measures nothing
    said = capsys.readouterr().out
    assert "skip t/hopper/medium-v0 step N=2 horizon=3 episodes 1-1" in said
    assert "skip t/hopper/medium-v0 step N=2 horizon=3 episodes 0-1" in said
    half = minari_root / "half.csv"  # episode 0 already there: the workers measure episode 1 alone, then join
    half.write_text(parts[0].read_text())
    assert so.main(one + ["--episodes", "2", "--workers", "2", "--out", str(half)]) == 0
    assert [f.name[-8:] for f in (minari_root / ".half.steps").iterdir()] == ["ep1.json"]
    assert [r["episode_scores"] for r in so.existing_rows(half)] == [w["episode_scores"]]
    from aepo_lite.rl.oracle import snapshot_oracle_parts
    with pytest.raises(ValueError, match="workers"):
        snapshot_oracle_parts("t/hopper/medium-v0", 2, [0], 0, print)
    for bad, match in [(one + ["--first-episode", "-1"], "--first-episode"), (one + ["--workers", "0"], "--workers"),
                       (["--add", str(minari_root / "no.csv")], "--add"), ([], "--datasets")]:
        with pytest.raises(SystemExit):
            so.main(bad + ["--out", str(joined)])
        assert match in capsys.readouterr().err
    # how far a policy acts from the data's actions, in the data's noise std: the snapshot itself at z = 0 (and
    # its noise-free score, the same reset seeds); the snapshot plus unclipped noise of twice the data's std at RMS z
    # 2, with 1 - P(|N(0, 1)| < 1.5)^3 of its steps beyond 3 stds; the data's own actions (the snapshot plus the
    # data's noise, clipped to the box, which only shortens an offset) at RMS z <= 1 up to sampling error
    import math
    from aepo_lite.rl.oracle import snapshot_action_spread
    mu = _sb3_policy(_load_snapshot(lad, med), 0.0, None)
    rng = np.random.default_rng(5)
    data_row, exact, wide = snapshot_action_spread(
        "t/hopper/medium-v0", {"snapshot": mu, "wide": lambda o: mu(o) + 0.2 * rng.standard_normal((o.shape[0], 3))},
        episodes=3)
    assert (data_row["label"], data_row["steps"], data_row["noise"]) == ("data", 250, 0.1)
    assert data_row["score_mean"] == pytest.approx((data.episode_returns.mean() - lo) / (hi - lo) * 100)
    assert data_row["z_rms"] <= 1 + 4 * math.sqrt(2 / 750) and data_row["beyond3"] <= 0.03
    assert (exact["label"], exact["episodes"], exact["beyond3"]) == ("snapshot", 3, 0.0)
    assert exact["z_rms"] < 1e-5  # float32 rounding of the snapshot's net, batched differently
    assert [r["label"] for r in snapshot_action_spread("t/hopper/medium-v0", {"snapshot": mu}, episodes=1,
                                                       with_data=False)] == ["snapshot"]
    assert exact["score_mean"] == pytest.approx(at0["score_mean"])
    n, p_beyond = wide["steps"], 1 - math.erf(1.5 / math.sqrt(2)) ** 3
    assert wide["z_rms"] == pytest.approx(2.0, rel=4 * math.sqrt(2 / (3 * n)) / 2)
    assert abs(wide["beyond3"] - p_beyond) < 4 * math.sqrt(p_beyond * (1 - p_beyond) / n)
    with pytest.raises(ValueError, match="episodes"):
        snapshot_action_spread("t/hopper/medium-v0", {"snapshot": mu}, episodes=0)
    with pytest.raises(ValueError, match="random dataset"):
        snapshot_action_spread("t/hopper/random-v0", {"snapshot": mu})


class _StepCounter:
    """Stands in for a tqdm bar: counts its updates."""
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k


class _Interrupt(_StepCounter):
    """A progress bar that stops its run (as Ctrl-C does) once ``at`` steps are counted."""

    def __init__(self, at: int):
        self.at = at

    def update(self, k: int = 1) -> None:
        super().update(k)
        if self.n >= self.at:
            raise KeyboardInterrupt


def _replayed_return(env_id: str, seed: int, prefix, first, policy, steps: int, gamma: float):
    """A reference by plain play: a fresh ``env_id`` reset with ``seed`` plays ``prefix``, then ``first`` and
    ``policy(obs)`` for at most ``steps`` steps in all, or to a termination. Returns (the observation before
    ``first``, the discounted return from it)."""
    ref = gym.make(env_id)
    o, _ = ref.reset(seed=seed)
    for a in prefix:
        o, *_ = ref.step(a)
    start, g, disc, a = o, 0.0, 1.0, first
    for _ in range(steps):
        o, r, term, _, _ = ref.step(a)
        g, disc = g + disc * r, disc * gamma
        if term:
            break
        a = policy(o)
    return start, g


def test_reference_datasets_are_the_tables_datasets_and_the_docs_commands_make_them():
    """REFERENCE_DATASETS against what the tables hold (the dataset rows of the committed sweep CSVs: the same mean
    return, transitions, and a normalised score the references reproduce to their rounding) and against the
    make-dataset commands of docs/results.md (parsed by the CLI: each names the dataset its recipe remakes)."""
    import csv
    import re
    from aepo_lite.cli import build_parser
    from aepo_lite.cli.rl import dataset_recipe
    from aepo_lite.rl.datasets import REFERENCE_DATASETS, DatasetRecipe, reference_dataset, reference_differences
    root = Path(__file__).resolve().parents[1]
    rows = {r["dataset"]: r for f in ("rl_6c_big.csv", "rl_6c_heldout_big.csv")
            for r in csv.DictReader(open(root / "figures" / f)) if r["method"] == "dataset"}
    assert set(rows) == set(REFERENCE_DATASETS)
    for name, (args, held) in REFERENCE_DATASETS.items():
        row = rows[name]
        assert held["mean_return"] == float(row["return_mean"]) and held["transitions"] == int(row["transitions"])
        score = (held["mean_return"] - held["ref_min_score"]) / (held["ref_max_score"] - held["ref_min_score"]) * 100
        assert abs(score - float(row["normalized_score"])) < 0.1 * 100 / (held["ref_max_score"] - held["ref_min_score"]) + 1e-9
        assert reference_dataset(DatasetRecipe(name="mine/any/name-v0", **args)) == (name, held)
        assert reference_dataset(DatasetRecipe(name=name, **dict(args, seed=1))) is None
        assert reference_differences(DatasetRecipe(name=name, **args), dict(held)) == []
    text = (root / "docs" / "results.md").read_text().replace("\\\n", " ")
    found = {}
    cmds = re.findall(r"`(?:aepo-lite )?make-dataset (--env[^`]*)`", text)  # inline, across line breaks
    cmds += re.findall(r"^aepo-lite make-dataset (--env.*)$", text, flags=re.M)  # code blocks
    assert len(cmds) >= len(REFERENCE_DATASETS)
    for cmd in cmds:
        a = build_parser().parse_args(["make-dataset", *cmd.split("#")[0].split()])
        ref = reference_dataset(dataset_recipe(a))
        if a.name in REFERENCE_DATASETS:
            assert ref is not None and ref[0] == a.name, cmd
            found[a.name] = True
    assert set(found) == set(REFERENCE_DATASETS)
    # the Hopper medium set remade on another CPU (session 70: an Intel Xeon) differs in its episodes, mean return
    # and expert reference, not in its transitions or random reference
    hop = DatasetRecipe(name="local/hopper/medium-v0", **REFERENCE_DATASETS["local/hopper/medium-v0"][0])
    diff = reference_differences(hop, dict(transitions=200000, episodes=1722, mean_return=288.2, ref_min_score=19.1,
                                           ref_max_score=520.4))
    assert [d.split(" (")[0] for d in diff] == ["episodes 1722", "mean return 288.2", "ref max score 520.4"]
    assert reference_differences(DatasetRecipe("Hopper-v5", "medium", 100, "t/h/m-v0"), {}) is None


def test_make_dataset_says_whether_it_remade_a_tables_dataset(minari_root, capsys, monkeypatch):
    """make-dataset's last lines: nothing for a recipe no table used; 'the same as' or, on stderr, what differs
    for one that remakes a table's dataset (here a tiny recipe entered as one, with what it makes or less)."""
    pytest.importorskip("stable_baselines3")
    import aepo_lite.rl.datasets as D
    from aepo_lite.cli import main
    from aepo_lite.rl.data import description_info
    args = ["make-dataset", "--env", "Hopper-v5", "--quality", "random", "--steps", "120", "--name", "t/hopper/random-v0",
            "--train-steps", "200", "--eval-every", "100", "--learning-starts", "100", "--ref-episodes", "4"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "t/hopper/random-v0: " in out.out and "docs/results.md" not in out.out + out.err
    ds = minari.load_dataset("t/hopper/random-v0")
    meta = ds.storage.metadata
    held = dict(transitions=ds.total_steps, episodes=ds.total_episodes,
                mean_return=description_info(meta)["dataset_mean_episode_return"],
                ref_min_score=meta["ref_min_score"], ref_max_score=meta["ref_max_score"])
    recipe = dict(env_id="Hopper-v5", quality="random", steps=120, train_steps=200, eval_every=100,
                  learning_starts=100, ref_episodes=4)
    monkeypatch.setitem(D.REFERENCE_DATASETS, "local/tiny/random-v0", (recipe, held))
    assert main(args + ["--overwrite"]) == 0
    out = capsys.readouterr()
    assert "the same as the dataset docs/results.md's tables were measured on" in out.out and "NOT" not in out.err
    monkeypatch.setitem(D.REFERENCE_DATASETS, "local/tiny/random-v0",
                        (recipe, dict(held, episodes=held["episodes"] + 1, mean_return=held["mean_return"] + 0.06)))
    assert main(args + ["--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "NOT the dataset docs/results.md's tables were measured on" in err and "not comparable" in err
    assert f"episodes {held['episodes']:g} (the tables' local/tiny/random-v0: {held['episodes'] + 1:g})" in err
    assert "mean return" in err and "ref min score" not in err and "transitions" not in err
    assert [d.split(" ")[0] for d in D.dataset_reference_differences("t/hopper/random-v0")] == ["episodes", "mean"]
    _write("t/hopper/raw-v0", _episodes(np.random.default_rng(0)))  # not made by make-dataset: no recipe to compare
    assert D.dataset_reference_differences("t/hopper/raw-v0") is None


def test_policy_ladder_trains_on_one_torch_thread_and_restores_the_count(minari_root, monkeypatch):
    """A ladder's TD3 training, and the dataset made from it, run on LADDER_THREADS (one) torch threads whatever
    the caller set (a ladder's floating point would otherwise follow the machine's core count), record it, and give
    the caller its count back, also when the training fails."""
    sb3 = pytest.importorskip("stable_baselines3")
    import torch
    from aepo_lite.rl.datasets import LADDER_THREADS, DatasetRecipe, train_policy_ladder
    seen, learn = [], sb3.TD3.learn

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return learn(self, *a, **k)

    monkeypatch.setattr(sb3.TD3, "learn", spy)
    before = torch.get_num_threads()
    kw = dict(train_steps=120, eval_every=60, learning_starts=60, eval_episodes=1, ref_episodes=2, n_envs=1)
    try:
        torch.set_num_threads(2)
        lad = train_policy_ladder(DatasetRecipe("Hopper-v5", "medium", 100, "t/hopper/medium-v0", **kw),
                                  progress=False)
        assert LADDER_THREADS == 1 and seen == [1] and torch.get_num_threads() == 2
        assert json.loads((lad / "ladder.json").read_text())["made_with"]["torch_threads"] == 1
        # the dataset made from it (reference returns and collection) runs on one thread too, and says so
        import aepo_lite.rl.datasets as D
        from aepo_lite.rl.data import description_info
        episodes = D.run_episodes

        def spy_episodes(*a, **k):
            seen.append(torch.get_num_threads())
            return episodes(*a, **k)

        monkeypatch.setattr(D, "run_episodes", spy_episodes)
        ds = D.make_dataset(DatasetRecipe("Hopper-v5", "medium", 100, "t/hopper/medium-v0", **kw), progress=False)
        assert len(seen) > 2 and set(seen) == {1} and torch.get_num_threads() == 2
        info = description_info(ds.storage.metadata)
        assert info["made_with"]["torch_threads"] == info["ladder_made_with"]["torch_threads"] == 1

        def fail(self, *a, **k):
            assert torch.get_num_threads() == 1
            raise RuntimeError("stopped")

        monkeypatch.setattr(sb3.TD3, "learn", fail)
        with pytest.raises(RuntimeError, match="stopped"):
            train_policy_ladder(DatasetRecipe("Hopper-v5", "medium", 100, "t/hopper/medium-v0",
                                              **{**kw, "train_steps": 180}), progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rollout_returns_match_a_replay_of_the_same_actions():
    """The oracle's Monte-Carlo returns from a restored physics state equal those of an environment that
    reached the same state by replaying the episode from its reset, then took the same actions."""
    from aepo_lite.rl.oracle import _mujoco_state, rollout_returns
    policy = lambda obs: np.tanh(obs[:, :3])  # noqa: E731  any deterministic policy
    rng = np.random.default_rng(0)
    prefix = rng.uniform(-1, 1, (25, 3))
    env = gym.make("Hopper-v5")
    env.reset(seed=3)
    for a in prefix:
        env.step(a)
    first = rng.uniform(-1, 1, (3, 3))
    cont = 0.3 * rng.standard_normal((12, 3))
    scratch = [gym.make("Hopper-v5").unwrapped for _ in range(4)]
    for s in scratch:
        s.reset(seed=99)  # a different state: rollout_returns must restore the whole physics state
    got = rollout_returns(_mujoco_state(env.unwrapped), scratch, first, policy, cont, gamma=0.9)
    want = []
    for a0 in first:
        ref = gym.make("Hopper-v5")
        obs, _ = ref.reset(seed=3)
        for a in prefix:
            ref.step(a)
        g, disc, a = 0.0, 1.0, a0
        for k in range(1 + len(cont)):
            obs, r, term, _, _ = ref.step(a)
            g, disc = g + disc * r, disc * 0.9
            if term or k == len(cont):
                break
            a = np.clip(policy(obs[None])[0] + cont[k], -1, 1)
        want.append(g)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert len(set(np.round(got, 6))) == 3  # the first actions matter
    # each candidate with its own continuation draws: the same as that candidate's rollout with those draws shared
    own = 0.3 * rng.standard_normal((3, 12, 3))
    each = [rollout_returns(_mujoco_state(env.unwrapped), scratch, first[[i]], policy, own[i], gamma=0.9)[0]
            for i in range(3)]
    np.testing.assert_allclose(rollout_returns(_mujoco_state(env.unwrapped), scratch, first, policy, own, gamma=0.9),
                               each, rtol=1e-12)
    # one state per candidate: the same as each state's own call (here candidate 1 from the reset state instead)
    other = gym.make("Hopper-v5")
    other.reset(seed=3)
    states = [_mujoco_state(env.unwrapped), _mujoco_state(other.unwrapped), _mujoco_state(env.unwrapped)]
    one_by_one = [rollout_returns(st, scratch, first[[i]], policy, cont, gamma=0.9)[0] for i, st in enumerate(states)]
    np.testing.assert_allclose(rollout_returns(states, scratch, first, policy, cont, gamma=0.9), one_by_one, rtol=1e-12)
    assert one_by_one[1] != pytest.approx(got[1]) and one_by_one[0] == pytest.approx(got[0])
    with pytest.raises(ValueError, match="state"):
        rollout_returns(states[:2], scratch, first, policy, cont, gamma=0.9)
    assert not np.allclose(each, got)
    with pytest.raises(ValueError, match="continuation_noise"):
        rollout_returns(_mujoco_state(env.unwrapped), scratch, first, policy, own[:2], gamma=0.9)
    with pytest.raises(ValueError, match="scratch"):
        rollout_returns(_mujoco_state(env.unwrapped), scratch[:2], first, policy, cont, gamma=0.9)


@pytest.mark.parametrize("bad,match", [(dict(quality="great"), "quality"), (dict(name="hopper-v0"), "name"),
                                       (dict(env_id="NoSuchEnv-v9"), "env"), (dict(steps=0), "steps"),
                                       (dict(collect_noise=-0.1), "collect_noise"),
                                       (dict(collect_noise=float("nan")), "collect_noise")])
def test_make_dataset_bad_arguments(minari_root, bad, match):
    from aepo_lite.rl.datasets import DatasetRecipe, make_dataset
    kw = dict(env_id="Hopper-v5", quality="random", steps=10, name="t/hopper/random-v0")
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        make_dataset(DatasetRecipe(**kw), progress=False)


def _exact_q(horizon: int, gamma: float, mean_action):
    """An independent exact Q for Hopper: the physics rebuilt from the observation alone (qpos without x, qvel:
    the reward and the dynamics do not depend on x), then the candidate and the deterministic snapshot."""
    from aepo_lite.rl.oracle import rollout_returns
    env = gym.make("Hopper-v5").unwrapped
    env.reset(seed=0)
    nq = env.model.nq

    def one(o, acts):
        state = {"qpos": np.r_[0.0, o[:nq - 1]], "qvel": o[nq - 1:], "act": env.data.act.copy(),
                 "time": 0.0, "qacc_warmstart": np.zeros(env.model.nv)}
        scratch = [gym.make("Hopper-v5").unwrapped for _ in range(len(acts))]
        for s in scratch:
            s.reset(seed=1)
        return rollout_returns(state, scratch, acts, mean_action, np.zeros((horizon - 1, 3)), gamma)

    def q(obs, acts):  # any batch: each distinct observation's actions rolled out from its rebuilt physics
        out = np.empty(len(acts))
        _, first, which = np.unique(obs, axis=0, return_index=True, return_inverse=True)
        for i, j in enumerate(first):
            rows = np.flatnonzero(which.ravel() == i)
            out[rows] = one(obs[j], acts[rows])
        return out
    return q


def test_critic_against_exact_q_on_and_off_the_support(minari_root):
    """snapshot_q_errors against an exact Q computed independently (the physics rebuilt from the observation):
    no error, every sign and pick right; the same values negated: correlation -1, every sign wrong, no gain; the
    snapshot's own action as the policy: advantage exactly 0 at offset 0; the spread groups at about c stds."""
    pytest.importorskip("stable_baselines3")
    from aepo_lite.rl.datasets import DatasetRecipe, _load_snapshot, _sb3_policy, make_dataset, train_policy_ladder
    from aepo_lite.rl.oracle import snapshot_q_errors
    from aepo_lite.rl.data import description_info
    kw = dict(train_steps=200, eval_every=100, learning_starts=100, eval_episodes=2, ref_episodes=4, n_envs=4)
    recipe = DatasetRecipe("Hopper-v5", "medium", 250, "t/hopper/medium-v0", **kw)
    meta = make_dataset(recipe, progress=False).storage.metadata
    make_dataset(DatasetRecipe("Hopper-v5", "random", 120, "t/hopper/random-v0", **kw), progress=False)
    info = description_info(meta)
    med = next(s for s in info["ladder"] if s["step"] == info["medium_snapshot_step"])
    mu = _sb3_policy(_load_snapshot(train_policy_ladder(recipe, progress=False), med), 0.0, None)
    rng = np.random.default_rng(3)
    noisy = lambda o: mu(o) + 0.2 * rng.standard_normal((o.shape[0], 3))  # noqa: E731
    exact = _exact_q(4, 0.9, mu)
    args = dict(episodes=2, probe_every=7, spreads=(1.0, 3.0), per_spread=3, horizon=4, gamma=0.9)
    pol, s1, s3 = snapshot_q_errors("t/hopper/medium-v0", exact, noisy, **args)
    assert [r["group"] for r in (pol, s1, s3)] == ["policy", "spread 1", "spread 3"]
    for r in (pol, s1, s3):
        assert r["err_rms"] < 1e-6 * max(1.0, abs(r["true_adv"])) + 1e-6 and r["sign_agree"] == 1.0
        assert r["critic_gain"] == pytest.approx(r["oracle_gain"], abs=1e-6) and r["oracle_gain"] >= 0
    assert s1["corr"] > 0.999 and s3["actions"] == 3 * s3["probes"] and pol["actions"] == pol["probes"]
    assert s1["z_rms"] == pytest.approx(1.0, rel=0.35) and s3["z_rms"] == pytest.approx(3.0, rel=0.35)
    assert s3["z_rms"] > 2 * s1["z_rms"]
    rng = np.random.default_rng(3)  # the same policy draws, so the same states and candidates
    neg = snapshot_q_errors("t/hopper/medium-v0", lambda o, a: -exact(o, a), noisy, **args)
    for r, n in zip((pol, s1, s3), neg):
        assert n["probes"] == r["probes"] and n["true_adv"] == pytest.approx(r["true_adv"])
        assert n["sign_agree"] == 0.0 and n["critic_gain"] <= 0 <= r["critic_gain"]
    assert neg[1]["corr"] < -0.999
    # recorded once, scored many times: the same rows as snapshot_q_errors, also after a save and load
    from aepo_lite.rl.oracle import QProbes, probe_q_states, q_error_rows
    rng = np.random.default_rng(3)
    probes = probe_q_states("t/hopper/medium-v0", noisy, **args)
    probes.save(minari_root / "probes.npz")
    for got in (q_error_rows(probes, exact), q_error_rows(QProbes.load(minari_root / "probes.npz"), exact)):
        for r, n in zip((pol, s1, s3), got):
            assert {k: v for k, v in n.items() if k != "seconds"} == {k: v for k, v in r.items() if k != "seconds"}
    assert [r["corr"] for r in q_error_rows(probes, lambda o, a: -exact(o, a))] == [r["corr"] for r in neg]
    for bad_q in (lambda o, a: exact(o, a)[:-1], lambda o, a: exact(o, a) * np.nan):
        with pytest.raises(ValueError, match="q_fn"):
            q_error_rows(probes, bad_q)
    (own, *_) = snapshot_q_errors("t/hopper/medium-v0", exact, mu, **args)
    # mu's own advantage is zero up to float rounding: exactly 0 on the AMD EPYC this was written on, -2.8e-8 on
    # an Intel Xeon, whose kernels round differently
    assert own["z_rms"] == 0.0 and own["true_adv"] == pytest.approx(0.0, abs=1e-6)
    # against the data policy's Q (noisy continuations): the same states and candidates; as the noise goes to 0
    # the values go to the deterministic ones, and with the data's noise they differ
    for cont, rollouts in [(1e-9, 2), (0.1, 3)]:
        rng = np.random.default_rng(3)
        got = snapshot_q_errors("t/hopper/medium-v0", exact, noisy, continuation_noise=cont, rollouts=rollouts, **args)
        for r, n in zip((pol, s1, s3), got):
            assert (n["probes"], n["z_rms"], n["critic_adv"]) == (r["probes"], r["z_rms"], r["critic_adv"])
            assert (n["continuation_noise"], n["rollouts"]) == (cont, rollouts)
            if cont < 1e-6:
                assert n["true_adv"] == pytest.approx(r["true_adv"], abs=1e-5)
        if cont > 1e-6:
            assert any(abs(n["true_adv"] - r["true_adv"]) > 1e-6 for r, n in zip((pol, s1, s3), got))
    for bad, match in [(dict(episodes=0), "episodes"), (dict(probe_every=0), "probe_every"),
                       (dict(per_spread=0), "per_spread"), (dict(spreads=(-1.0,)), "spreads"), (dict(spreads=()), "spreads"),
                       (dict(gamma=0.0), "gamma"), (dict(horizon=5000), "horizon"), (dict(rollouts=2), "rollouts"),
                       (dict(continuation_noise=-0.1), "continuation_noise"), (dict(rollouts=0), "rollouts")]:
        with pytest.raises(ValueError, match=match):
            snapshot_q_errors("t/hopper/medium-v0", exact, mu, **bad)
    with pytest.raises(ValueError, match="random dataset"):
        snapshot_q_errors("t/hopper/random-v0", exact, mu)
    # its script on a run trained on that dataset: a CSV row per group, rerun skips, a run without critic refused
    from aepo_lite.rl.agent import make_config, train
    for m in ("aepo", "bc"):
        train(make_config("t/hopper/medium-v0", m, "smoke", seed=0), minari_root / m, progress=False)
    ce = load_script("critic_errors")
    out = minari_root / "critic.csv"
    args = ["--runs", str(minari_root / "aepo"), "--scales", "0", "--episodes", "1", "--probe-every", "5",
            "--horizon", "3", "--out", str(out)]
    assert ce.main(args) == 0
    first = out.read_text()
    assert [line.split(",")[6] for line in first.strip().splitlines()] == ["group", "policy", "spread 1", "spread 3"]
    assert ce.main(args) == 0 and out.read_text() == first
    assert "| t/hopper/medium-v0 | aepo" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no critic"):
        ce.main(["--runs", str(minari_root / "bc"), "--out", str(minari_root / "bc.csv")])
    # the critic in raw reward units, as the exact values are: its Q over the factor its rewards were scaled by,
    # 1000 / (max - min episode return) under the locomotion scaling
    import torch
    from aepo_lite.rl.agent import load_run
    agent, cfg, data = load_run(minari_root / "aepo")
    assert data.reward_scaling == "locomotion"  # the config's "auto" on a locomotion task
    span = data.episode_returns.max() - data.episode_returns.min()
    assert data.reward_factor() == pytest.approx(1000 / span)
    np.testing.assert_allclose(data.scaled_rewards(), data.rewards * 1000 / span, rtol=1e-6)
    obs, acts = data.obs_rows[data.idx[:5]], data.to_action_box(data.actions[:5])
    with torch.no_grad():
        scaled = agent.critic.q_fn(agent.normalize(obs), torch.as_tensor(data.actions[:5])).double().numpy()
    from aepo_lite.rl.diagnostics import raw_q_fn
    np.testing.assert_allclose(raw_q_fn(agent, data)(obs, acts) * 1000 / span, scaled, rtol=1e-5)
    # the budget script: the run's critic settings trained again by its critic stage reproduce its critic at the
    # run's step count (60, smoke); a variant; a rerun skips; bad input named
    cb = load_script("critic_budget")
    out, work = minari_root / "budget.csv", minari_root / "budget"
    args = ["--run", str(minari_root / "aepo"), "--scales", "0", "--episodes", "1", "--probe-every", "5", "--horizon",
            "3", "--steps", "30", "60", "--variants", "run", "hidden=16,expectile=0.5", "kind=mc", "--work", str(work),
            "--out", str(out)]
    assert cfg.critic.steps == 60 and cb.main(args) == 0
    import csv
    rows = list(csv.DictReader(open(out)))
    assert [(r["variant"], r["steps"], r["group"]) for r in rows] == [
        (v, s, g) for v in ("run", "hidden=16,expectile=0.5", "kind=mc") for s in ("30", "60")
        for g in ("policy", "spread 1", "spread 3")]
    (probe_file,) = work.glob("probes-*.npz")
    own = q_error_rows(QProbes.load(probe_file), raw_q_fn(agent, data))
    for r, o in zip(rows[3:6], own):
        assert float(r["corr"]) == pytest.approx(o["corr"], abs=1e-9)
        assert float(r["critic_adv"]) == pytest.approx(o["critic_adv"], abs=1e-9)
    assert rows[3]["critic_adv"] != rows[0]["critic_adv"] and rows[9]["critic_adv"] != rows[3]["critic_adv"]
    first = out.read_text()
    assert cb.main(args) == 0 and out.read_text() == first
    assert "| t/hopper/medium-v0 | iql | hidden=16,expectile=0.5 | 0 | 30 | 0 |" in out.with_suffix(".md").read_text()
    assert "| t/hopper/medium-v0 | mc | kind=mc | 0 | 60 | 0 |" in out.with_suffix(".md").read_text()
    out.write_text("".join(first.splitlines(keepends=True)[:1] + first.splitlines(keepends=True)[4:]))
    with pytest.raises(SystemExit, match="delete"):  # the 30-step rows lost, the checkpoint past them
        cb.main(args)
    with pytest.raises(SystemExit, match="critic.kind"):
        cb.main(args + ["--variants", "kind=sarsa"])
    for bad in (["--variants", "steps=5"], ["--variants", "width=5"], ["--variants", "layer_norm=yes"],
                ["--steps", "60", "30"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            cb.main(args + bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="no critic"):
        cb.main(["--run", str(minari_root / "bc"), "--out", str(out)])
    # the seeds script: member 0 is the run's own critic, members 1.. trained with the stage's seed + m; a row per
    # number averaged and group; rerun unchanged; bad input named
    cs = load_script("critic_seeds")
    out = minari_root / "seeds.csv"
    args = ["--run", str(minari_root / "aepo"), "--scales", "0", "--episodes", "1", "--probe-every", "5", "--horizon",
            "3", "--members", "3", "--work", str(work), "--out", str(out)]
    assert cs.main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["members"], r["group"]) for r in rows] == [(n, g) for n in ("1", "2", "3")
                                                          for g in ("policy", "spread 1", "spread 3")]
    for r, o in zip(rows[:3], own):  # the mean of one critic, member 0: the run's critic as it is
        for k in ("corr", "sign_agree", "critic_gain", "oracle_gain"):
            assert float(r[k]) == pytest.approx(o[k], abs=1e-9)
    assert len(list(work.glob("seedq-*.npz"))) == 3 and float(rows[3]["corr"]) != float(rows[0]["corr"])
    assert all(-1 <= float(r["agree"]) < 1 for r in rows)  # trained apart, the members differ
    first = out.read_text()
    assert cs.main(args) == 0 and out.read_text() == first
    assert "| t/hopper/medium-v0 | iql | 60 | 0 | 3 |" in out.with_suffix(".md").read_text()
    for bad in (["--members", "1"], ["--steps", "0"], ["--out", str(minari_root / "seeds.txt")]):
        with pytest.raises(SystemExit) as e:
            cs.main(args + bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="no critic"):
        cs.main(["--run", str(minari_root / "bc"), "--out", str(out)])
    # the data script: the run's critic stage on nested episode subsets; all episodes reproduce the run's critic;
    # a larger dataset of the same recipe is accepted, another recipe's refused; bad input named
    cd = load_script("critic_data")
    E = data.n_episodes
    out = minari_root / "data.csv"
    args = ["--run", str(minari_root / "aepo"), "--scales", "0", "--episodes", "1", "--probe-every", "5", "--horizon",
            "3", "--steps", "60", "--work", str(work), "--out", str(out)]
    assert cd.main(args + ["--train-episodes", "3", str(E)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["train_episodes"], r["group"]) for r in rows] == [(n, g) for n in ("3", str(E))
                                                                 for g in ("policy", "spread 1", "spread 3")]
    assert int(rows[0]["transitions"]) < int(rows[3]["transitions"]) == data.n
    for r, o in zip(rows[3:], own):  # every episode: the run's data, the run's critic
        for k in ("corr", "sign_agree", "critic_adv", "critic_gain"):
            assert float(r[k]) == pytest.approx(o[k], abs=1e-9)
    assert rows[0]["critic_adv"] != rows[3]["critic_adv"]
    first = out.read_text()
    assert cd.main(args + ["--train-episodes", "3", str(E)]) == 0 and out.read_text() == first
    assert f"| t/hopper/medium-v0 | 3 | {rows[0]['transitions']} | iql | 60 | 0 |" in out.with_suffix(".md").read_text()
    make_dataset(replace(recipe, steps=400, name="t/hopper-big/medium-v0"), progress=False)
    big = ["--dataset", "t/hopper-big/medium-v0", "--train-episodes", str(E + 2)]
    assert cd.main(args + big) == 0
    (last,) = [r for r in csv.DictReader(open(out)) if r["train_dataset"] == "t/hopper-big/medium-v0"][-1:]
    assert int(last["train_episodes"]) == E + 2 and int(last["transitions"]) > data.n
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "mc"]) == 0  # another kind, the same probes
    mc = [r for r in csv.DictReader(open(out)) if r["critic"] == "mc"]
    assert [(r["train_episodes"], r["variant"]) for r in mc] == [("3", "t/hopper/medium-v0:3:mc")] * 3
    assert [r["critic_adv"] for r in mc] != [r["critic_adv"] for r in rows[:3]]
    # exact targets: the mc critic regressed on the exact values of its transitions (computed once per episode and
    # kept in --work), its rows named critic "exact"; a rerun skips them
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "exact"]) == 0
    ex = [r for r in csv.DictReader(open(out)) if r["critic"] == "exact"]
    assert [(r["train_episodes"], r["variant"]) for r in ex] == [("3", "t/hopper/medium-v0:3:exact")] * 3
    assert [r["critic_adv"] for r in ex] != [r["critic_adv"] for r in mc]
    from aepo_lite.rl.oracle import exact_q_labels
    chosen = np.sort(np.random.default_rng(cd.ORDER_SEED).permutation(E)[:3])
    sub = data.take_episodes(chosen)
    (cache,) = work.glob("exact-labels-*.npz")
    with np.load(cache) as f:
        assert sorted(f.files) == sorted(f"e{e}" for e in chosen)
        kept = np.concatenate([f[f"e{e}"] for e in chosen])
    np.testing.assert_allclose(kept, exact_q_labels("t/hopper/medium-v0", sub.obs_rows[sub.idx], sub.actions,
                                                    horizon=3, gamma=0.99))
    before = out.read_text()
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "exact"]) == 0 and out.read_text() == before
    # and with two more actions at each state (the data's action plus 1 and 3 noise stds of noise), their exact
    # values computed as for any pair: rows of critic "exact+2", another critic than the one-action one
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "exact", "--extra-actions", "2"]) == 0
    ex2 = [r for r in csv.DictReader(open(out)) if r["critic"] == "exact+2"]
    assert [r["variant"] for r in ex2] == ["t/hopper/medium-v0:3:exact+2"] * 3
    assert [r["critic_adv"] for r in ex2] != [r["critic_adv"] for r in ex]
    (cache,) = work.glob("exact-extra-*.npz")
    with np.load(cache) as f:
        acts = np.concatenate([f[f"a{e}"] for e in chosen])
        vals = np.concatenate([f[f"q{e}"] for e in chosen])
    assert acts.shape == (sub.n, 2, 3) and vals.shape == (sub.n, 2) and np.abs(acts).max() <= 1
    off = np.abs(acts - sub.actions[:, None]).mean(axis=(0, 2))  # 1 and 3 stds of 0.1 (clipping only shortens)
    assert off[0] < off[1] and off[0] == pytest.approx(0.1 * np.sqrt(2 / np.pi), rel=0.3)
    np.testing.assert_allclose(vals.reshape(-1), exact_q_labels("t/hopper/medium-v0", np.repeat(
        sub.obs_rows[sub.idx], 2, 0), acts.reshape(-1, 3), horizon=3, gamma=0.99))
    # with extra actions, <out>_fit.csv: the critic's ordering of its training states' actions and of held-out
    # episodes' (the next of the order, their extra actions cached alike), one row per split; a rerun keeps them
    fit = list(csv.DictReader(open(minari_root / "data_fit.csv")))
    assert [(r["variant"], r["split"], r["states"], r["actions"]) for r in fit] == [
        ("t/hopper/medium-v0:3:exact+2", "train", str(sub.n), "3"),
        ("t/hopper/medium-v0:3:exact+2", "held-out", fit[1]["states"], "3")]
    assert int(fit[1]["states"]) > 0 and all(0 <= float(r["sign_agree"]) <= 1 for r in fit)
    with np.load(cache) as f:  # the held-out episodes' extra actions joined the same cache
        assert len(f.files) == 2 * (3 + min(5, E - 3))
    # the within-state loss: its rows are critic "exact+2-within10", trained from the same initial networks to
    # another critic; bad values named
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "exact", "--extra-actions", "2",
                           "--within-weight", "10"]) == 0
    w10 = [r for r in csv.DictReader(open(out)) if r["critic"] == "exact+2-within10"]
    assert [r["variant"] for r in w10] == ["t/hopper/medium-v0:3:exact+2-within10"] * 3
    assert [r["critic_adv"] for r in w10] != [r["critic_adv"] for r in ex2]
    assert [r["split"] for r in csv.DictReader(open(minari_root / "data_fit.csv"))] == ["train", "held-out"] * 2
    assert "| exact+2-within10 | 60 | held-out |" in (minari_root / "data_fit.md").read_text()
    # other critic settings than the run's: named in the critic column and the variant, a critic of another size
    assert cd.main(args + ["--train-episodes", "3", "--critic-kind", "exact", "--extra-actions", "2",
                           "--critic-set", "hidden=16,depth=1"]) == 0
    small = [r for r in csv.DictReader(open(out)) if r["critic"] == "exact+2[hidden=16,depth=1]"]
    assert [r["variant"] for r in small] == ["t/hopper/medium-v0:3:exact+2[hidden=16,depth=1]"] * 3
    assert [r["critic_adv"] for r in small] != [r["critic_adv"] for r in ex2]
    # the exact values' planes by state (scripts/exact_gradients.py), from the same caches: a row, skipped on a rerun
    eg = load_script("exact_gradients")
    grads = ["--dataset", "t/hopper/medium-v0", "--train-episodes", "3", "--horizon", "3", "--work", str(work),
             "--out", str(minari_root / "grads.csv")]
    assert eg.main(grads) == 0
    (g,) = list(csv.DictReader(open(minari_root / "grads.csv")))
    assert (int(g["states"]), int(g["actions"])) == (sub.n, 5) and 0 <= float(g["linear_r2"]) <= 1
    assert 0 <= float(g["sensitivity"]) < 1e-3  # a 1e-6 change of the action barely moves a 3-step value
    first = (minari_root / "grads.csv").read_text()
    assert eg.main(grads) == 0 and (minari_root / "grads.csv").read_text() == first
    # one spread alone: its own extra actions (another cache key: the default's file is unchanged) and row
    caches = {p: p.read_bytes() for p in work.glob("exact-extra-*.npz")}
    assert eg.main(grads + ["--extra-scales", "3"]) == 0
    rows3 = list(csv.DictReader(open(minari_root / "grads.csv")))
    assert [r["scales"] for r in rows3] == ["1 3", "3"] and rows3[1]["linear_r2"] != rows3[0]["linear_r2"]
    assert all(p.read_bytes() == b for p, b in caches.items())
    (other,) = set(work.glob("exact-extra-*.npz")) - set(caches)
    with np.load(other) as f:
        a3 = np.concatenate([f[f"a{e}"] for e in chosen])
    off = np.abs(a3 - sub.actions[:, None]).mean(axis=(0, 2))  # every extra action 3 stds of 0.1 away
    assert off == pytest.approx(np.full(4, 0.3 * np.sqrt(2 / np.pi)), rel=0.35)
    # the data's own policy after the action (--continuation-draws 4: two halves of two draws, each half its own
    # caches): a row of its own with the halves' agreement; the deterministic row and caches stay as they were
    before = {p: p.read_bytes() for p in work.glob("exact-*.npz")}
    assert eg.main(grads + ["--continuation-draws", "4"]) == 0
    rows4 = list(csv.DictReader(open(minari_root / "grads.csv")))
    assert [(r["scales"], r["draws"]) for r in rows4] == [("1 3", "0"), ("3", "0"), ("1 3", "4")]
    assert rows4[:2] == rows3[:2]
    assert -1 <= float(rows4[2]["cos_halves"]) <= 1 and rows4[2]["linear_r2"] != rows4[0]["linear_r2"]
    assert all(0 <= float(rows4[2][k]) <= 1 for k in ("pairs_halves", "pairs_det")) and np.isnan(float(rows4[0]["cos_det"]))
    assert all(p.read_bytes() == b for p, b in before.items())
    assert len(set(work.glob("exact-*.npz")) - set(before)) == 4  # labels and extra actions, two halves each
    halves = []
    for path in sorted(set(work.glob("exact-labels-*.npz")) - set(before)):
        with np.load(path) as f:
            halves.append(np.concatenate([f[f"e{e}"] for e in chosen]))
    kw = dict(horizon=3, gamma=0.99, continuation_noise=0.1)
    np.testing.assert_allclose(sum(halves) / 2, exact_q_labels("t/hopper/medium-v0", sub.obs_rows[sub.idx],
                                                               sub.actions, draws=4, **kw))
    for bad in (["--extra-actions", "3"], ["--train-episodes", "0"], ["--out", str(minari_root / "grads.txt")],
                ["--extra-scales", "0"], ["--continuation-draws", "3"], ["--continuation-draws", "-2"]):
        with pytest.raises(SystemExit) as e:
            eg.main(grads + bad)
        assert e.value.code == 2
    for bad in (["--extra-actions", "2"], ["--critic-kind", "exact", "--extra-actions", "-1"],
                ["--critic-kind", "exact", "--within-weight", "1"],
                ["--critic-kind", "exact", "--extra-actions", "2", "--within-weight", "-1"],
                ["--critic-kind", "exact", "--extra-actions", "2", "--fit-episodes", "-1"],
                ["--critic-set", "kind=iql"], ["--critic-set", "width=3"], ["--critic-set", "hidden=wide"],
                ["--critic-set", "gamma=2"]):
        with pytest.raises(SystemExit) as e:
            cd.main(args + ["--train-episodes", "3"] + bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="quality"):  # collected by another policy
        cd.main(args + ["--dataset", "t/hopper/random-v0", "--train-episodes", "3"])
    make_dataset(replace(recipe, collect_noise=0.3, name="t/hopper-wide/medium-v0"), progress=False)
    wide = ["--dataset", "t/hopper-wide/medium-v0", "--train-episodes", "3"]
    with pytest.raises(SystemExit, match="collect_noise"):  # another spread around the same snapshot: asked for
        cd.main(args + wide)
    assert cd.main(args + wide + ["--other-noise"]) == 0
    assert [r["train_dataset"] for r in csv.DictReader(open(out))][-1] == "t/hopper-wide/medium-v0"
    for bad in (["--train-episodes", "1"], ["--train-episodes", "5", "3"], ["--train-episodes", str(E + 1)],
                ["--train-episodes", "3", "--steps", "0"], ["--out", str(minari_root / "data.txt")]):
        with pytest.raises(SystemExit) as e:
            cd.main(args + bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="no critic"):
        cd.main(["--run", str(minari_root / "bc"), "--train-episodes", "3", "--out", str(out)])
    # the spread script on the same runs, through the same per-run CSV loop: the data's row once, then a row per run
    ss = load_script("support_spread")
    out = minari_root / "spread.csv"
    args = ["--runs", str(minari_root / "aepo"), str(minari_root / "bc"), "--scales", "0", "--episodes", "1",
            "--out", str(out)]
    assert ss.main(args) == 0
    first = out.read_text()
    labels = [line.split(",")[2] for line in first.strip().splitlines()]
    assert labels[:2] == ["label", "data"] and labels[2].startswith("aepo(") and labels[3:] == ["bc"]
    assert ss.main(args) == 0 and out.read_text() == first
    with pytest.raises(SystemExit):
        ss.main(["--runs", str(minari_root / "bc"), "--out", str(minari_root / "spread.txt")])


def test_critic_seed_rows_against_closed_forms():
    """critic_seed_rows: identical critics agree exactly and their mean scores as each; critics equal to the exact
    values correlate 1 with them and pick the best; two critics with opposite errors average to the exact values;
    fewer than two critics or a wrong size named."""
    from aepo_lite.rl.oracle import QProbes, q_error_rows
    from aepo_lite.rl.diagnostics import critic_seed_rows, member_counts
    rng = np.random.default_rng(0)
    P, C = 40, 7
    q_true = rng.normal(size=(P, C))
    probes = QProbes(obs=rng.normal(size=(P, 3)), actions=rng.normal(size=(P, C, 2)), q_true=q_true,
                     groups=[("policy", np.array([1])), ("spread 1", np.arange(2, C))], noise=0.1, points=2.0,
                     meta={})
    noisy = q_true + rng.normal(size=(P, C))
    same = critic_seed_rows(probes, [noisy.ravel()] * 4)
    assert [r["members"] for r in same] == [n for n in member_counts(4) for _ in range(2)] and member_counts(4) == [1, 2, 4]
    alone = q_error_rows(probes, lambda o, a: noisy.ravel())
    for r in same:
        assert r["agree"] == pytest.approx(1.0)
        o = alone[[g for g, _ in probes.groups].index(r["group"])]
        assert r["corr"] == pytest.approx(o["corr"]) and r["critic_gain"] == pytest.approx(o["critic_gain"])
        adv = lambda q: (q[:, dict(probes.groups)[r["group"]]] - q[:, :1]).ravel()
        assert r["alone"] == pytest.approx(np.corrcoef(adv(noisy), adv(q_true))[0, 1])
    exact = critic_seed_rows(probes, [q_true.ravel() + 5.0, q_true.ravel()])  # a constant offset: the same ranking
    for r in exact:
        assert r["alone"] == pytest.approx(1.0) and r["agree"] == pytest.approx(1.0) and r["sign_agree"] == 1.0
        assert r["critic_gain"] == pytest.approx(r["oracle_gain"])
    e = rng.normal(size=(P, C))
    opposite = critic_seed_rows(probes, [q_true + e, q_true - e])
    for r in opposite:
        if r["members"] == 2:
            assert r["corr"] == pytest.approx(1.0) and r["critic_gain"] == pytest.approx(r["oracle_gain"])
        else:
            assert r["corr"] < 0.99
    # nearness to mu(s): a critic whose Q is -||a - mu||^2 / noise^2 (+ a state's level) correlates 1 with it,
    # one whose Q is +that -1; the exact values here (random) near 0 on many actions
    d2 = (((probes.actions - probes.actions[:, :1]) / probes.noise) ** 2).sum(-1)
    for sign in (-1, 1):
        rows = q_error_rows(probes, lambda o, a: (sign * d2 + rng.normal(size=(P, 1))).ravel())
        assert rows[1]["near_corr"] == pytest.approx(-sign) and rows[0]["near_corr"] == pytest.approx(-sign)
    got = q_error_rows(probes, lambda o, a: noisy.ravel())[1]["true_near_corr"]
    adv = (q_true[:, 2:] - q_true[:, :1]).ravel()
    assert got == pytest.approx(np.corrcoef(adv, -d2[:, 2:].ravel())[0, 1]) and abs(got) < 0.5
    with pytest.raises(ValueError, match="q_hats"):
        critic_seed_rows(probes, [q_true])
    with pytest.raises(ValueError, match="q_hats"):
        critic_seed_rows(probes, [q_true, q_true[:, :3]])
    with pytest.raises(ValueError, match="q_hats"):
        critic_seed_rows(probes, [q_true, np.full_like(q_true, np.nan)])


def test_within_state_fit_against_hand_orderings():
    """scripts/critic_data.py's within-state fit: a critic equal to the exact values up to a per-state offset orders
    every pair right with no centered error; the negated values order every pair wrong, with twice the spread as
    centered error."""
    cd = load_script("critic_data")
    rng = np.random.default_rng(0)
    obs, acts, vals = rng.normal(size=(7, 3)), rng.normal(size=(7, 4, 2)), rng.normal(size=(7, 4))
    table = {(tuple(o), tuple(a)): v for o, aa, vv in zip(obs, acts, vals) for a, v in zip(aa, vv)}
    offset = {tuple(o): 10.0 * i for i, o in enumerate(obs)}

    def exact(o, a, sign=1.0):
        return np.array([sign * table[(tuple(x), tuple(y))] + offset[tuple(x)] for x, y in zip(o, a)])
    right = cd.within_state_fit(exact, obs, acts, vals)
    assert right["sign_agree"] == 1.0 and right["err_rms"] == pytest.approx(0, abs=1e-12)
    assert right["corr"] == pytest.approx(1.0) and (right["states"], right["actions"]) == (7, 4)
    assert right["exact_spread"] == pytest.approx(np.sqrt(((vals - vals.mean(1, keepdims=True)) ** 2).mean()))
    wrong = cd.within_state_fit(lambda o, a: exact(o, a, -1.0), obs, acts, vals)
    assert wrong["sign_agree"] == 0.0 and wrong["corr"] == pytest.approx(-1.0)
    assert wrong["err_rms"] == pytest.approx(2 * right["exact_spread"])


def test_within_state_loss_is_the_regression_plus_the_centered_error():
    """The within-state critic's Q loss, by hand: the squared error of each head plus the weight times the squared
    error of the values centered within each group of consecutive rows; a per-group offset adds nothing to the
    centered part."""
    import torch

    from aepo_lite.config import CriticConfig
    cd = load_script("critic_data")
    crit = cd.WithinStateCritic(3, 2, CriticConfig(hidden=8, depth=1), group=4, weight=5.0)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(12, generator=g)
    q1, q2 = torch.randn(12, generator=g), torch.randn(12, generator=g)
    cent = [(q.reshape(3, 4) - q.reshape(3, 4).mean(1, keepdim=True)
             - (y.reshape(3, 4) - y.reshape(3, 4).mean(1, keepdim=True))) ** 2 for q in (q1, q2)]
    hand = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean() + 5.0 * (cent[0].mean() + cent[1].mean())
    assert float(crit._q_loss(q1, q2, y)) == pytest.approx(float(hand), rel=1e-6)
    shifted = y + torch.tensor([1.0, -2.0, 3.0]).repeat_interleave(4)
    plain = ((shifted - y) ** 2).mean() * 2
    assert float(crit._q_loss(shifted, shifted, y)) == pytest.approx(float(plain), rel=1e-6)


def test_inverted_double_pendulum_state_from_its_observation():
    """InvertedDoublePendulum's observation (cart position, angles as sines and cosines, velocities) rebuilt into a
    physics state: the returns rolled out from it equal those of an environment that reached the state itself by
    playing the actions from its reset (the other layout's observation is refused)."""
    from aepo_lite.rl.oracle import rollout_returns, state_from_observation
    policy = lambda obs: np.tanh(obs[:, :1] - obs[:, 5:6])  # noqa: E731  any deterministic policy
    rng = np.random.default_rng(2)
    prefix, first = 0.3 * rng.standard_normal((6, 1)), rng.uniform(-1, 1, (3, 1))
    env = gym.make("InvertedDoublePendulum-v5")
    obs, _ = env.reset(seed=5)
    for a in prefix:
        obs, *_ = env.step(a)
    assert np.abs(obs[5:8]).max() < 10  # velocities not clipped: the observation holds the whole state
    scratch = [gym.make("InvertedDoublePendulum-v5").unwrapped for _ in range(3)]
    for s in scratch:
        s.reset(seed=99)
    cont = np.zeros((15, 1))
    got = rollout_returns(state_from_observation(env, obs), scratch, first, policy, cont, gamma=0.9)
    want = [_replayed_return("InvertedDoublePendulum-v5", 5, prefix, a0, lambda o: np.clip(policy(o[None])[0], -1, 1),
                             16, 0.9)[1] for a0 in first]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(set(np.round(got, 6))) == 3
    with pytest.raises(ValueError, match="obs: expected 9"):
        state_from_observation(env, obs[:8])
