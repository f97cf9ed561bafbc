"""Critics against closed forms, the staged agent (every method, resume, guards), the results report, the CLI."""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

minari = pytest.importorskip("minari")

from aepo_lite.config import CriticConfig  # noqa: E402

from aepo_lite.core.critics import IQLCritic, InSupportCritic, MCCritic, expectile_loss, insupport_target  # noqa: E402
from conftest import load_script

DS = "t/hopper/medium-v0"




# ------------------------------------------------------------------------------- critics
def test_expectile_loss_closed_form_and_minimiser():
    u = torch.tensor([-2.0, -0.5, 1.0, 3.0])
    tau = 0.7
    hand = (0.3 * 4.0 + 0.3 * 0.25 + 0.7 * 1.0 + 0.7 * 9.0) / 4
    assert float(expectile_loss(u, tau)) == pytest.approx(hand)
    # the minimiser over a constant v of E|tau - 1(x < v)|(x - v)^2 is the tau-expectile:
    # sum_i w_i (x_i - v) = 0 with w_i = tau (x_i > v) else 1 - tau, solved here by bisection
    x = torch.tensor([0.0, 1.0, 2.0, 10.0], dtype=torch.float64)
    lo, hi = 0.0, 10.0
    for _ in range(200):
        v = 0.5 * (lo + hi)
        w = torch.where(x > v, tau, 1 - tau)
        lo, hi = (v, hi) if float((w * (x - v)).sum()) > 0 else (lo, v)
    # ... so the gradient of the loss in v vanishes there, and is non-zero a little away from it
    for v0, zero in ((lo, True), (lo + 0.1, False)):
        v = torch.tensor(v0, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(expectile_loss(x - v, tau), v)
        assert (abs(float(grad)) < 1e-9) == zero
    assert lo > float(x.mean())  # tau > 1/2 sits above the mean


def test_insupport_target_by_hand():
    r, done = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    q = torch.tensor([[1.0, 2.0, 4.0], [5.0, 0.0, 0.0]])
    y = insupport_target(r, done, q, gamma=0.9, beta_q=1.0)
    e = np.exp([1.0, 2.0, 4.0])
    v = float((e / e.sum() * [1.0, 2.0, 4.0]).sum())
    assert float(y[0]) == pytest.approx(1.0 + 0.9 * v, rel=1e-6)
    assert float(y[1]) == pytest.approx(2.0)  # terminal: no bootstrap
    # beta_Q -> 0 is the mean over support actions, beta_Q large the max
    assert float(insupport_target(r, done, q, 0.9, 0.0)[0]) == pytest.approx(1 + 0.9 * 7 / 3)
    assert float(insupport_target(r, done, q, 0.9, 100.0)[0]) == pytest.approx(1 + 0.9 * 4, rel=1e-4)


def test_critic_updates_soft_target_and_iql_target():
    torch.manual_seed(0)
    B, k, d = 32, 4, 2
    batch = {"s": torch.randn(B, k), "a": torch.rand(B, d) * 2 - 1, "r": torch.randn(B), "s2": torch.randn(B, k),
             "done": (torch.rand(B) < 0.2).float()}
    c = IQLCritic(k, d, CriticConfig(tau_target=0.1, hidden=16))
    old_t = [p.clone() for p in c.q_target.parameters()]
    out = c.update(batch)
    assert set(out) == {"v_loss", "q_loss", "q_mean", "v_mean"} and all(isinstance(v, float) for v in out.values())
    for pt, p, p0 in zip(c.q_target.parameters(), c.q.parameters(), old_t):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * p)
    # the Q loss uses y = r + gamma (1 - done) V(s'): with the V after its step, recompute it
    with torch.no_grad():
        y = batch["r"] + 0.99 * (1 - batch["done"]) * c.v(batch["s2"])
    assert torch.isfinite(y).all()
    ins = InSupportCritic(k, d, CriticConfig(kind="insupport", hidden=16))
    sup = torch.rand(B, 5, d) * 2 - 1
    with torch.no_grad():  # the target by hand, from the target network before the step
        q_next = torch.minimum(*ins.q_target(batch["s2"].repeat_interleave(5, 0), sup.reshape(-1, d))).reshape(B, 5)
        w = torch.softmax(q_next, -1)
        y = batch["r"] + 0.99 * (1 - batch["done"]) * (w * q_next).sum(-1)
    out = ins.update(dict(batch, support2=sup))
    assert set(out) == {"q_loss", "q_mean", "target_mean"}
    assert out["target_mean"] == pytest.approx(float(y.mean()), rel=1e-5)


@pytest.mark.parametrize("kind", ["iql", "insupport", "mc"])
def test_critic_step_keeps_metrics_on_device_and_matches_update(kind):
    """step() returns 0-d tensors (no host sync in a training loop); update() is the same step read back."""
    B, k, d = 32, 4, 2
    g = torch.Generator().manual_seed(3)
    batch = {"s": torch.randn(B, k, generator=g), "a": torch.rand(B, d, generator=g) * 2 - 1,
             "r": torch.randn(B, generator=g), "s2": torch.randn(B, k, generator=g), "done": torch.zeros(B),
             "support2": torch.rand(B, 4, d, generator=g) * 2 - 1, "g": torch.randn(B, generator=g)}
    runs = []
    for use_step in (True, False):
        torch.manual_seed(0)
        c = {"iql": IQLCritic, "insupport": InSupportCritic, "mc": MCCritic}[kind](k, d, CriticConfig(kind=kind, hidden=16))
        outs = [c.step(batch) if use_step else c.update(batch) for _ in range(3)]
        runs.append((outs, [p.detach().clone() for p in c.parameters()]))
    (o_step, p_step), (o_upd, p_upd) = runs
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for o in o_step for v in o.values())
    assert [{k: float(v) for k, v in o.items()} for o in o_step] == o_upd
    for x, y in zip(p_step, p_upd):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="gamma"):
        IQLCritic(k, d, CriticConfig(gamma=1.5))


def test_stage_loop_reads_metrics_back_only_when_logging_and_stops_on_nan(tmp_path):
    """run_stage: steps return 0-d tensors; they become floats (a host sync on GPU) only at log steps,
    where a NaN stops the run with the stage and step named."""
    from aepo_lite.core import guidance as G
    from aepo_lite.training import Stage, StageStore, run_stage
    from aepo_lite.training.stages import MetricsLog
    count = [0]

    class Probe:  # a learner whose metric is its step count (NaN from step `nan_from` on)
        def __init__(self, nan_from=None):
            self.nan_from = nan_from

        def step(self, batch):
            count[0] += 1
            bad = self.nan_from is not None and count[0] >= self.nan_from
            return {"loss": torch.tensor(float("nan") if bad else float(count[0]))}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    log = MetricsLog(tmp_path / "metrics.jsonl")
    _, st = run_stage(Stage("probe", {}, 10, Probe, lambda g: {}), StageStore(tmp_path / "a"), log=log, log_every=5,
                      progress=False)
    assert st["steps"] == 10 and count[0] == 10
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logged] == [(5, 5.0), (10, 10.0)]
    count[0] = 0
    with pytest.raises(FloatingPointError, match=r"probe: step 10 has non-finite \['loss'\]"):
        run_stage(Stage("probe", {}, 20, lambda: Probe(nan_from=7), lambda g: {}), StageStore(tmp_path / "b"),
                  log=log, log_every=5, progress=False)
    assert count[0] == 10  # stopped at the first logged step after the NaN
    log.close()
    # the losses' own checks: on by default (the CPU learner), skippable (the CUDA learner)
    f, y = torch.tensor([1.0, float("nan")]), torch.zeros(2)
    with pytest.raises(FloatingPointError, match="energy_regression_loss"):
        G.energy_regression_loss(f, y)
    assert torch.isnan(G.energy_regression_loss(f, y, check=False))
    with pytest.raises(FloatingPointError, match="cep_loss"):
        G.cep_loss(f[None], y[None], 1.0)
    assert torch.isnan(G.cep_loss(f[None], y[None], 1.0, check=False))


# ------------------------------------------------------------------------------- agent
def test_returns_to_go_by_hand_and_against_episode_returns():
    """returns_to_go: G_i = r_i + gamma G_{i+1} within an episode, cut where the next transition does not start at
    this one's next observation (a termination or a timeout); with gamma = 1 an episode's first G is its return."""
    from aepo_lite.rl.data import returns_to_go
    # two episodes stored as the loader stores them: rows 0-3 (3 transitions) then rows 4-6 (2 transitions)
    r = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    idx, nxt = np.array([0, 1, 2, 4, 5]), np.array([1, 2, 3, 5, 6])
    np.testing.assert_allclose(returns_to_go(r, idx, nxt, 0.5), [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4, 8 + 8, 16])
    np.testing.assert_allclose(returns_to_go(r, idx, nxt, 1.0)[[0, 3]], [7.0, 24.0])
    np.testing.assert_allclose(returns_to_go(r, idx, nxt, 0.0), r)
    for bad, match in [((r, idx, nxt[:-1], 0.5), "idx"), ((r, idx, nxt, 1.5), "gamma"), ((r, idx, nxt, np.nan), "gamma")]:
        with pytest.raises(ValueError, match=match):
            returns_to_go(*bad)


def test_mc_critic_regresses_q_and_v_on_the_returns():
    """The Monte-Carlo critic against a closed form: returns g = 2 s_0 + a_0 + noise with a independent of s, so
    Q(s, a) = 2 s_0 + a_0 and V(s) = E[g | s] = 2 s_0; after training both are close to these."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    c = MCCritic(3, 2, CriticConfig(kind="mc", hidden=32, lr=3e-3, tau_target=0.05))
    for _ in range(1500):
        s, a = torch.randn(256, 3, generator=g), torch.rand(256, 2, generator=g) * 2 - 1
        c.update({"s": s, "a": a, "g": 2 * s[:, 0] + a[:, 0] + 0.1 * torch.randn(256, generator=g)})
    s, a = torch.randn(2000, 3, generator=g), torch.rand(2000, 2, generator=g) * 2 - 1
    with torch.no_grad():
        q_err = (c.q_fn(s, a) - (2 * s[:, 0] + a[:, 0])).pow(2).mean().sqrt()
        v_err = (c.v(s) - 2 * s[:, 0]).pow(2).mean().sqrt()
    assert q_err < 0.1 and v_err < 0.25, (q_err, v_err)  # the returns' std: about 2.1; a V blind to s: 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Hopper-v5 dataset written straight into a temporary Minari root (no policy training)."""
    root = tmp_path_factory.mktemp("rl")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    from aepo_lite.rl.evaluation import run_episodes
    rng = np.random.default_rng(0)
    eps, _ = run_episodes(lambda: gym.make("Hopper-v5"), lambda o: rng.uniform(-1, 1, (o.shape[0], 3)), 10**6,
                          seed=0, n_envs=4, record=True, max_transitions=400)
    bufs = [EpisodeBuffer(id=i, observations=e.observations.astype(np.float64), actions=e.actions.astype(np.float32),
                          rewards=e.rewards, terminations=e.terminations, truncations=e.truncations, infos={})
            for i, e in enumerate(eps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(DS, bufs, env="Hopper-v5", eval_env="Hopper-v5", author="t",
                                           author_email="t@t", ref_min_score=0.0, ref_max_score=100.0)
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="module")
def smoke_runs(tiny):
    from aepo_lite.rl.agent import evaluate_run, make_config, train
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    runs = {}
    for m in ("bc", "aepo", "qgpo", "mse"):
        d = tiny / "runs" / m
        train(make_config(DS, m, "smoke", seed=0), d, data=data, progress=False,
              init_behaviour=None if m == "bc" else runs["bc"])
        evaluate_run(d, progress=False)
        runs[m] = d
    return runs


def test_every_method_trains_and_evaluates(smoke_runs):
    from aepo_lite._io import read_json
    for m, d in smoke_runs.items():
        res = read_json(d / "results.json")
        assert res["method"] == m and res["transitions"] == 400
        scales = {0.0} if m == "bc" else {0.0, 1.0}
        assert {r["guidance_scale"] for r in res["rows"]} == scales
        for row in res["rows"]:
            assert {"return_mean", "return_std", "normalized_score_mean", "normalized_score_std", "episodes"} <= set(row)
            assert row["episodes"] == 2
            assert row["normalized_score_mean"] == pytest.approx(row["return_mean"])  # ref (0, 100)
        cfg = read_json(d / "config.json")
        assert cfg["method"] == m and cfg["preset"] == "smoke"
        stages = {json.loads(line)["stage"] for line in open(d / "metrics.jsonl")}
        assert stages >= ({"behaviour"} if m == "bc" else {"critic", "energy"})
    # same behaviour checkpoint, same evaluation seeds: w = 0 gives the same returns for every method
    r0 = {m: [r for r in read_json(d / "results.json")["rows"] if r["guidance_scale"] == 0][0]["return_mean"]
          for m, d in smoke_runs.items()}
    assert len({round(v, 8) for v in r0.values()}) == 1
    assert (smoke_runs["qgpo"] / "checkpoints" / "support.pt").exists()
    assert (smoke_runs["aepo"] / "checkpoints" / "support.pt").exists()  # the default: the particle target
    assert not (smoke_runs["mse"] / "checkpoints" / "support.pt").exists()


def test_act_shapes_guidance_and_best_of_n(tiny, smoke_runs):
    from aepo_lite.rl.agent import load_run
    agent, cfg, data = load_run(smoke_runs["aepo"])
    obs = data.obs_rows[:5]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a0 = agent.act(obs, 0.0, generator=g())
    a1 = agent.act(obs, 100.0, generator=g())  # the smoke behaviour saturates the box; push hard
    assert a0.shape == (5, 3) and np.all(np.abs(a0) <= 1)
    np.testing.assert_array_equal(a0, agent.act(obs, 0.0, generator=g()))  # seeded
    assert not np.allclose(a0, a1)  # the guidance scale is an argument and it acts
    # guidance switched off for every t (t_max below t_min): the guided policy is the behaviour
    agent.cfg.sampling.guidance_t_max = 1e-4
    np.testing.assert_array_equal(agent.act(obs, 100.0, generator=g()), a0)
    agent.cfg.sampling.guidance_t_max = 1.0
    s = agent.normalize(obs)
    best = agent.act_unit(s, 1.0, n_candidates=4, generator=g())
    cands = agent.act_unit(s.repeat_interleave(4, 0), 1.0, generator=g()).reshape(5, 4, 3)
    q = agent.critic.q_fn(s.repeat_interleave(4, 0), cands.reshape(20, 3)).reshape(5, 4)
    torch.testing.assert_close(best, cands[torch.arange(5), q.argmax(1)])
    bc, _, _ = load_run(smoke_runs["bc"])
    with pytest.raises(ValueError, match="guidance_scale"):
        bc.act(obs, 1.0)
    with pytest.raises(ValueError, match="obs"):
        agent.act(obs[:, :4], 0.0)


def test_compiled_sampler_agent_matches_eager_and_pads_batches(tiny, smoke_runs):
    """compile_sampler: the same actions as the eager policy at a power-of-two batch (the same noise);
    other batch sizes are padded to the next power of two, so they reuse the compiled graph."""
    import shutil
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    import torch._dynamo
    from aepo_lite.rl.agent import load_run
    eager, _, data = load_run(smoke_runs["aepo"])
    comp, cfg, _ = load_run(smoke_runs["aepo"], overrides={"sampling": {"compile": True}})
    assert cfg.sampling.compile
    obs = data.obs_rows[:4]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch._dynamo.reset()
    np.testing.assert_allclose(comp.act(obs, 3.0, generator=g()), eager.act(obs, 3.0, generator=g()), atol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        a3 = comp.act(obs[:3], 1.0, generator=g())  # 3 rows -> padded to 4: no new graph
    assert a3.shape == (3, 3) and np.all(np.abs(a3) <= 1)


@pytest.mark.parametrize("method", ["aepo", "bc"])
def test_captured_sampler_agent_acts_as_the_plain_one(tiny, smoke_runs, method):
    """sampling.capture: on the CPU the agent's actions are the plain agent's exactly (the same noise drawn from
    the same generator), guided or not, with best-of-N, batch after batch; one sampler per batch size; and the
    settings it cannot run with are refused by name."""
    from aepo_lite.rl.agent import load_run, make_config
    plain, _, data = load_run(smoke_runs[method])
    cap, cfg, _ = load_run(smoke_runs[method], overrides={"sampling": {"capture": True}})
    assert cfg.sampling.capture and not plain.cfg.sampling.capture
    obs = data.obs_rows[:5]
    scales, cands = ((0.0, 3.0), (1, 3)) if method == "aepo" else ((0.0,), (1,))
    for w in scales:
        for n in cands:
            g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
            for rows in (5, 3, 5):  # the generator moves on: later calls draw new noise alike
                np.testing.assert_array_equal(cap.act(obs[:rows], w, n_candidates=n, generator=g1),
                                              plain.act(obs[:rows], w, n_candidates=n, generator=g2))
    assert sorted(cap._captured) == ([3, 5, 9, 15] if method == "aepo" else [3, 5])
    with pytest.raises(ValueError, match="sampling.capture: a captured sampler replays one CUDA graph .* Pass one of "
                                         "--sampling.capture and --sampling.compile"):
        make_config(DS, method, "smoke", sampling={"capture": True, "compile": True})
    with pytest.raises(ValueError, match="sampling.capture: ddpm draws fresh noise"):
        make_config(DS, method, "smoke", sampling={"capture": True, "solver": "ddpm"})


def test_evaluation_with_a_captured_sampler_gives_the_same_rows(tiny, smoke_runs, tmp_path):
    """`aepo-lite eval --sampling.capture` on a copy of the smoke aepo run: the same returns at every scale as the
    plain evaluation (on the CPU the captured sampler is the plain one's numbers), in the same rows (capture is
    not a row setting: it changes no result)."""
    import shutil
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import evaluate_run
    run = tmp_path / "aepo-copy"
    shutil.copytree(smoke_runs["aepo"], run)
    before = read_json(run / "results.json")["rows"]
    after = evaluate_run(run, overrides={"sampling": {"capture": True}}, progress=False)["rows"]
    assert len(after) == len(before)
    for r in before:
        same = [a for a in after if a["guidance_scale"] == r["guidance_scale"]]
        assert len(same) == 1 and same[0]["return_mean"] == r["return_mean"], (r, same)


def test_compiled_training_matches_eager(tiny, smoke_runs):
    """compile=True compiles every network in place for training (CUDA graphs on CUDA). On the CPU the
    behaviour and critic stages log the eager numbers; the energy stage's sampled AEPO target is a Monte
    Carlo estimate whose eigenvector basis may differ, so it is checked for finite values only."""
    import shutil
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    import torch._dynamo
    from aepo_lite.rl.agent import make_config, train
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    torch._dynamo.reset()
    d = tiny / "runs" / "aepo-compiled"
    train(make_config(DS, "aepo", "smoke", seed=0, compile=True), d, data=data, progress=False)
    rows = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    # the eager aepo run copied its behaviour stage from the bc run (same seed and settings)
    comp, eager = rows(d), rows(smoke_runs["bc"]) + rows(smoke_runs["aepo"])
    assert [(r["stage"], r["step"]) for r in comp] == [(r["stage"], r["step"]) for r in eager]
    for c, e in zip(comp, eager):
        for k, v in e.items():
            if k in ("stage", "step"):
                continue
            assert np.isfinite(c[k])
            if c["stage"] != "energy":
                assert c[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (c["stage"], c["step"], k)
    with pytest.raises(ValueError, match="compile"):
        make_config(DS, "aepo", "smoke", compile=True, energy=dict(expansion="second"))


@pytest.mark.parametrize("method", ["aepo", "qgpo"])
def test_captured_training_equals_eager_training(tiny, smoke_runs, method):
    """``capture=True``: each training step, its batch draw included, through CapturedStep (on the CPU: the
    warm-up, then undone, then eager steps). Every network ends bit for bit where the plain run's does (the run's
    draws are the same), also with a decaying learning rate; the stats say how each stage ran."""
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import load_run, make_config, train
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    d = tiny / "runs" / f"{method}-captured"
    train(make_config(DS, method, "smoke", seed=0, capture=True), d, data=data, progress=False,
          init_behaviour=smoke_runs["bc"])
    got, ref = load_run(d)[0], load_run(smoke_runs[method])[0]
    for net in ("behaviour", "critic", "energy"):
        for x, y in zip(getattr(got, net).state_dict().values(), getattr(ref, net).state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=net)
    stats = read_json(d / "train_stats.json")
    ok = "eager (no CUDA graphs on cpu); no host synchronisation found, so it should capture on CUDA"
    assert stats["critic"]["capture"] == stats["energy"]["capture"] == ok  # each step checked for host syncs
    assert "capture" not in stats["behaviour"]  # copied from the bc run, not trained here
    bc = tiny / "runs" / f"bc-captured-{method}"
    train(make_config(DS, "bc", "smoke", seed=0, capture=True), bc, data=data, progress=False)
    for x, y in zip(load_run(bc)[0].behaviour.state_dict().values(),
                    load_run(smoke_runs["bc"])[0].behaviour.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert read_json(bc / "train_stats.json")["behaviour"]["capture"] == ok
    with pytest.raises(ValueError, match="capture: a captured step replays one CUDA graph .* --capture and --compile"):
        make_config(DS, method, "smoke", capture=True, compile=True)
    if method == "aepo":  # a decaying rate: the schedule is stepped between the captured steps
        for capture in (False, True):
            train(make_config(DS, method, "smoke", seed=0, capture=capture, energy={"lr_decay": True}),
                  tiny / "runs" / f"decay-{capture}", data=data, progress=False, init_behaviour=smoke_runs["bc"])
        for x, y in zip(*(load_run(tiny / "runs" / f"decay-{c}")[0].energy.state_dict().values() for c in (False, True))):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"critic.lr_decay: the offline-RL critics .* constant learning rate"):
        make_config(DS, method, "smoke", critic={"lr_decay": True})  # it would be silently ignored


def test_resume_skips_finished_stages(tiny, smoke_runs):
    from aepo_lite.rl.agent import make_config, train
    d = smoke_runs["mse"]
    ck = d / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ck.iterdir()}
    lines = sum(1 for _ in open(d / "metrics.jsonl"))
    os.remove(ck / "energy.pt")
    train(make_config(DS, "mse", "smoke", seed=0), d, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in ck.iterdir()}
    assert after["behaviour.pt"] == before["behaviour.pt"] and after["critic.pt"] == before["critic.pt"]
    assert after["energy.pt"] != before["energy.pt"]
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    # the retrained stage's old lines were replaced, not duplicated; the others were kept as they were
    assert len(rows) == lines and [r["stage"] for r in rows[-2:]] == ["energy", "energy"]
    assert len({(r["stage"], r["step"]) for r in rows}) == len(rows)
    # and a second call trains nothing at all
    train(make_config(DS, "mse", "smoke", seed=0), d, progress=False)
    assert sum(1 for _ in open(d / "metrics.jsonl")) == lines


def test_run_dir_guards_and_broken_checkpoint(tiny, smoke_runs):
    from aepo_lite.rl.agent import evaluate_run, make_config, train
    d = smoke_runs["aepo"]
    snap = {p.name: p.read_bytes() for p in (d / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match="made by method 'aepo'"):
        train(make_config(DS, "qgpo", "smoke"), d, progress=False)
    with pytest.raises(ValueError, match="different config.*energy.beta"):
        train(make_config(DS, "aepo", "smoke", energy=dict(beta=5.0)), d, progress=False)
    with pytest.raises(ValueError, match="different config.*seed"):
        train(make_config(DS, "aepo", "smoke", seed=3), d, progress=False)
    with pytest.raises(ValueError, match="different config.*critic.activation"):
        train(make_config(DS, "aepo", "smoke", critic=dict(activation="relu")), d, progress=False)
    # evaluation settings may differ: the run resumes (nothing to train) under other sampling settings
    train(make_config(DS, "aepo", "smoke", sampling=dict(steps=5), eval=dict(episodes=1)), d, progress=False)
    # a run directory of the layout before the stage mechanism (flat config.json) is refused, not reused
    old = tiny / "runs" / "old-layout"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"method": "aepo", "beta": 3.0, "behaviour_steps": 60}))
    with pytest.raises(ValueError, match="older aepo-lite layout"):
        train(make_config(DS, "aepo", "smoke"), old, progress=False)
    assert {p.name: p.read_bytes() for p in (d / "checkpoints").iterdir()} == snap  # nothing touched
    broken = tiny / "runs" / "broken"
    train(make_config(DS, "bc", "smoke"), broken, progress=False)
    (broken / "checkpoints" / "behaviour.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"behaviour\.pt could not be read"):
        train(make_config(DS, "bc", "smoke"), broken, progress=False)
    assert (broken / "checkpoints" / "behaviour.pt").read_bytes() == b"not a checkpoint"
    with pytest.raises(ValueError, match="could not be read"):
        evaluate_run(broken, progress=False)
    with pytest.raises(ValueError, match="config.json"):
        evaluate_run(tiny / "runs" / "nothing-here", progress=False)


@pytest.mark.parametrize("kw,match", [(dict(method="sac"), "method"), (dict(preset="huge"), "preset"),
                                      (dict(energy=dict(covariance="full")), "energy.covariance"),
                                      (dict(sampling=dict(solver="rk4")), "sampling.solver"),
                                      (dict(behaviour=dict(steps=0)), "behaviour.steps"),
                                      (dict(bogus=1), "bogus: not a config field"),
                                      (dict(energy=dict(betta=1.0)), "energy.betta.*did you mean 'beta'"),
                                      (dict(seed=10**20), "seed"),
                                      (dict(sampling=dict(guidance_t_max=float("nan"))), "guidance_t_max"),
                                      (dict(critic=dict(activation="swish")), "critic.activation"),
                                      (dict(energy=dict(fit="huber")), "energy.fit"),
                                      (dict(critic=dict(activation="relu"), energy=dict(
                                          posterior="gaussian", centered=False, expansion="first")), "no curvature"),
                                      (dict(critic=dict(activation="relu"), energy=dict(
                                          posterior="gaussian", centered=False, expansion="second")), "no curvature")])
def test_bad_config_is_named(kw, match):
    from aepo_lite.rl.agent import make_config
    args = dict(dataset=DS, method="aepo", preset="smoke")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        make_config(**args)


def test_results_csv_table_and_readme(tiny, smoke_runs, tmp_path):
    import csv
    from aepo_lite.rl import report as rl_report
    csv_path = tmp_path / "figs" / "rl_results.csv"
    rows = rl_report.collect([tiny / "runs"], csv_path)
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == rl_report.COLUMNS
        got = list(reader)
    assert len(got) == len(rows) == 1 + 2 + 2 + 2 + 1  # bc, aepo x2, qgpo x2, mse x2, dataset row
    ds_row = [r for r in got if r["method"] == "dataset"][0]
    assert float(ds_row["normalized_score"]) == pytest.approx(float(ds_row["return_mean"]))  # ref (0, 100)
    paths = rl_report.render(csv_path, tmp_path / "figs")
    assert all(p.exists() for p in paths)
    assert "| t/hopper/medium-v0 | smoke | 400 | bc |" in (tmp_path / "figs" / "rl_results.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nbefore\n<!-- rl:start -->\nold\n<!-- rl:end -->\nafter\n")
    rl_report.update_readme(readme, csv_path)
    text = readme.read_text()
    assert text.startswith("# Title\nbefore\n<!-- rl:start -->\n") and text.endswith("<!-- rl:end -->\nafter\n")
    assert "old" not in text and "| t/hopper/medium-v0 |" in text
    speed = (tmp_path / "figs" / "rl_speed.csv").read_text()
    assert "behaviour" in speed and "actions/s" in speed


def test_cli_train_eval_and_errors(tiny, smoke_runs, capsys):
    from aepo_lite.cli import main
    out = tiny / "runs" / "cli-bc"
    assert main(["train", "--dataset", DS, "--method", "bc", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    assert main(["eval", "--run", str(smoke_runs["aepo"]), "--sampling.guidance-scales", "0.5", "--eval.episodes", "1",
                 "--quiet"]) == 0
    res = json.loads((smoke_runs["aepo"] / "results.json").read_text())
    got = {(r["guidance_scale"], r["episodes"]) for r in res["rows"]}
    assert got == {(0.0, 2), (1.0, 2), (0.5, 1)}  # merged, not lost; rows keep their own settings
    capsys.readouterr()
    assert main(["train", "--dataset", "nobody/none/none-v0", "--method", "bc", "--preset", "smoke", "--out",
                 str(tiny / "x"), "--quiet"]) == 2
    assert "make-dataset" in capsys.readouterr().err
    assert main(["train", "--dataset", DS, "--method", "qgpo", "--preset", "smoke", "--out", str(out), "--quiet"]) == 2
    assert "made by method 'bc'" in capsys.readouterr().err
    # QGPO's own critic network (ReLU): trains from the saved behaviour and support stages
    relu = tiny / "runs" / "cli-qgpo-relu"
    assert main(["train", "--dataset", DS, "--method", "qgpo", "--preset", "smoke", "--out", str(relu),
                 "--critic.activation", "relu",
                 "--init-behaviour", str(smoke_runs["qgpo"]), "--no-eval", "--quiet"]) == 0
    assert json.loads((relu / "config.json").read_text())["critic"]["activation"] == "relu"
    assert json.loads((relu / "train_stats.json").read_text())["support"].get("copied_from")
    capsys.readouterr()
    assert main(["train", "--dataset", DS, "--method", "aepo", "--preset", "smoke", "--energy.expansion", "first",
                 "--energy.posterior", "gaussian", "--energy.no-centered", "--critic.activation", "relu",
                 "--out", str(tiny / "y"), "--quiet"]) == 2
    assert "no curvature" in capsys.readouterr().err


@pytest.mark.parametrize("posterior", ["particles", "mixture"])
def test_in_support_aepo_trains_on_the_support_stage(tiny, smoke_runs, posterior):
    """AEPO's in-support targets (derivation section 4b) read the support stage's actions: the run trains a
    support stage, reuses the bc run's behaviour, and its energy moves the policy."""
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import load_run, make_config, train
    d = tiny / "runs" / f"aepo-{posterior}"
    train(make_config(DS, "aepo", "smoke", energy=dict(posterior=posterior, bandwidth=0.1)), d, progress=False,
          init_behaviour=smoke_runs["bc"])
    assert (d / "checkpoints" / "support.pt").exists()
    assert read_json(d / "train_stats.json")["behaviour"].get("copied_from")
    agent, cfg, data = load_run(d)
    obs = data.obs_rows[:4]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not np.allclose(agent.act(obs, 0.0, generator=g()), agent.act(obs, 50.0, generator=g()))


def test_stage_cache_trains_shared_stages_once_and_matches_a_plain_run(tiny, smoke_runs):
    """Runs of one dataset and seed share behaviour and critic through ``stage_cache``: the second run copies
    them (no training), and its networks equal those of the run trained without a cache (same seed)."""
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import load_run, make_config, train
    cache = tiny / "stage_cache"
    for m in ("mse", "aepo"):
        train(make_config(DS, m, "smoke", seed=0), tiny / "cached" / m, progress=False, stage_cache=cache)
    entries = sorted(p.name.split("-")[0] for p in cache.glob("*.pt"))
    assert entries == ["behaviour", "critic", "support"]  # one of each: aepo reused mse's behaviour and critic
    stats = read_json(tiny / "cached" / "aepo" / "train_stats.json")
    assert stats["behaviour"]["copied_from"] == str(cache) and stats["critic"]["copied_from"] == str(cache)
    assert "copied_from" not in stats["energy"]
    cached, _, _ = load_run(tiny / "cached" / "mse")
    plain, _, _ = load_run(smoke_runs["mse"])
    for a, b in ((cached.behaviour, plain.behaviour), (cached.critic, plain.critic), (cached.energy, plain.energy)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), k


def test_stages_trained_on_another_copy_of_the_dataset_are_refused(tiny, smoke_runs):
    """A dataset remade under the same id (make-dataset on another CPU: same name, same size, other numbers) must
    not reuse stages trained on the old copy: their hashes agree (they name the dataset, not its contents), so the
    checkpoints record the data's fingerprint, and a run, a stage cache or init_behaviour on the other copy is
    refused before anything is written. Checkpoints from before fingerprints (none recorded) still load."""
    import dataclasses
    import shutil
    from aepo_lite.rl.agent import load_run, make_config, train
    from aepo_lite.rl.data import load_minari
    from aepo_lite.training.stages import DataMismatch
    data, _ = load_minari(DS)
    assert data.fingerprint() == load_minari(DS)[0].fingerprint()  # a property of the contents, not of a load
    actions = data.actions.copy()
    actions[7, 1] = np.nextafter(actions[7, 1], np.float32(2))  # one action one ulp apart
    other = dataclasses.replace(data, actions=actions)
    assert other.fingerprint() != data.fingerprint() and other.n == data.n
    ck = torch.load(smoke_runs["mse"] / "checkpoints" / "behaviour.pt", weights_only=False)
    assert ck["data"] == data.fingerprint()
    load_run(smoke_runs["mse"], data=data)
    with pytest.raises(DataMismatch, match=r"behaviour\.pt was trained on other data.*remade"):
        load_run(smoke_runs["mse"], data=other)
    snap = {p.name: p.read_bytes() for p in (smoke_runs["mse"] / "checkpoints").iterdir()}
    with pytest.raises(DataMismatch, match="other data"):
        train(make_config(DS, "mse", "smoke", seed=0), smoke_runs["mse"], data=other, progress=False)
    assert {p.name: p.read_bytes() for p in (smoke_runs["mse"] / "checkpoints").iterdir()} == snap
    cache = tiny / "fp-cache"
    train(make_config(DS, "bc", "smoke", seed=0), tiny / "fp" / "a", data=data, progress=False, stage_cache=cache)
    with pytest.raises(DataMismatch, match=r"fp-cache.*behaviour-.*\.pt was trained on other data"):
        train(make_config(DS, "bc", "smoke", seed=0), tiny / "fp" / "b", data=other, progress=False,
              stage_cache=cache)
    assert not list((tiny / "fp" / "b").glob("checkpoints/*.pt"))
    with pytest.raises(DataMismatch, match="other data"):
        train(make_config(DS, "mse", "smoke", seed=0), tiny / "fp" / "c", data=other, progress=False,
              init_behaviour=tiny / "fp" / "a")
    # the first copy goes on using both; a checkpoint without a fingerprint (written before) is not checked
    train(make_config(DS, "bc", "smoke", seed=0), tiny / "fp" / "d", data=data, progress=False, stage_cache=cache)
    shutil.copytree(tiny / "fp" / "a", tiny / "fp" / "old")
    p = tiny / "fp" / "old" / "checkpoints" / "behaviour.pt"
    old = torch.load(p, weights_only=False)
    del old["data"]
    torch.save(old, p)
    load_run(tiny / "fp" / "old", data=other)


def test_labels_name_the_estimator_k_and_a_non_default_critic():
    from aepo_lite.rl.agent import estimator_label, make_config
    lab = lambda m, **kw: estimator_label(make_config(DS, m, "smoke", **kw))  # noqa: E731
    gauss = dict(posterior="gaussian", centered=False)
    assert lab("aepo") == "aepo(particles-K4-centered-softmax)"  # the library default (smoke: K = 4)
    assert lab("aepo", energy=dict(fit="squared")) == "aepo(particles-K4-centered)"
    assert lab("aepo", energy=gauss) == "aepo(tweedie/sampled)"
    assert lab("aepo", energy=dict(centered=False), support=dict(k=8)) == "aepo(particles-K8)"
    assert lab("aepo", energy=dict(posterior="mixture", bandwidth=0.05, centered=False), support=dict(k=8)) == \
        "aepo(mixture-K8-h0.05)"
    assert lab("aepo", energy=gauss, critic=dict(kind="insupport")) == "aepo(tweedie/sampled)+insupport"
    with pytest.raises(ValueError, match="energy.centered"):
        lab("aepo", energy=dict(posterior="gaussian"))
    assert lab("qgpo") == "qgpo" and lab("qgpo", critic=dict(kind="iql")) == "qgpo+iql"
    assert lab("mse", critic=dict(kind="insupport")) == "mse+insupport" and lab("bc") == "bc"


def test_reference_returns_are_recovered_from_the_rows(tmp_path):
    """The table's random/expert returns come from the rows' (return, score) pairs: exact for a known map."""
    from aepo_lite.rl.report import COLUMNS, _write_csv, markdown_table, reference_returns
    lo, hi = -150.7, -34.0
    score = lambda r: 100 * (r - lo) / (hi - lo)  # noqa: E731
    base = {k: "" for k in COLUMNS}
    rows = [dict(base, dataset="local/p/m-v0", method="dataset", return_mean=-50.2, normalized_score=score(-50.2),
                 transitions=10, preset="bench")]
    for seed, ret in enumerate((-60.0, -41.5)):
        rows.append(dict(base, dataset="local/p/m-v0", method="bc", seed=seed, guidance_scale=0.0, return_mean=ret,
                         normalized_score=score(ret), transitions=10, preset="bench", episodes=10, candidates=1,
                         guidance_t_max=1.0, sample_steps=15, solver="dpmpp2m"))
    p = tmp_path / "r.csv"
    _write_csv(p, COLUMNS, rows)
    ref = reference_returns(p)[("local/p/m-v0", "bench")]
    assert ref["random"] == pytest.approx(lo, abs=1e-9) and ref["expert"] == pytest.approx(hi, abs=1e-9)
    assert ref["data"] == pytest.approx((-50.2, score(-50.2)))
    assert "| local/p/m-v0 | bench | -150.7 | -34.0 | -50.2 (86.1) |" in markdown_table(p)
    _write_csv(p, COLUMNS, rows[:1])  # one score only: not determined, so no reference line
    assert reference_returns(p) == {}


def test_energy_gradient_norms_of_known_energies(tiny, smoke_runs, monkeypatch):
    """The diagnostic's gradient norms: exactly 3 sqrt(d) for f = 3 sum(a_t), and sigma_t-free t-dependence for
    f = t |a_t|^2 / 2 (grad = t a_t), checked against the norms of the same a_t computed by hand."""
    from aepo_lite.rl import agent as A, diagnostics
    real = A.load_run
    energy = {}

    def fake(run_dir, **kw):
        agent, cfg, data = real(run_dir, **kw)
        agent.energy = energy["f"]
        return agent, cfg, data

    monkeypatch.setattr(A, "load_run", fake)
    energy["f"] = lambda s, a, t: 3.0 * a.sum(-1)
    norms = diagnostics.energy_gradient_norms(smoke_runs["mse"], n=32)
    assert all(v == pytest.approx(3.0 * math.sqrt(3)) for v in norms.values())
    seen = []
    energy["f"] = lambda s, a, t: (seen.append(a.detach().clone()) or 0.5 * t * (a ** 2).sum(-1))
    norms = diagnostics.energy_gradient_norms(smoke_runs["mse"], times=(0.1, 0.7), n=32)
    for (t, v), a in zip(norms.items(), seen):
        assert v == pytest.approx(float((t * a).norm(dim=-1).mean()), rel=1e-6)
    monkeypatch.setattr(A, "load_run", real)
    with pytest.raises(ValueError, match="no energy network"):
        diagnostics.energy_gradient_norms(smoke_runs["bc"])


def test_guided_q_stats_match_exchangeability_and_a_known_push(tiny, smoke_runs, monkeypatch):
    """The guided-Q diagnostic with known critics: at w = 0 the policy's draw is one more behaviour sample, so it is
    the best of K + 1 with probability 1 / (K + 1) (Q = a_0 plus tiny i.i.d. noise, which breaks the ties of the
    smoke model's many actions clipped to the box's edge); an energy f = 50 a_0 pushes every guided action to
    a_0 = 1, so with Q = a_0 it is at least as high as any behaviour action."""
    from aepo_lite.rl import agent as A, diagnostics
    real, critic = A.load_run, {}

    def fake(run_dir, **kw):
        agent, cfg, data = real(run_dir, **kw)
        agent.energy = lambda s, a, t: 50.0 * a[:, 0]
        agent.critic.q_fn = critic["q"]
        return agent, cfg, data

    monkeypatch.setattr(A, "load_run", fake)
    n = min(2000, real(smoke_runs["mse"])[2].tensors(torch.device("cpu"))["obs"].shape[0])
    k = 3
    critic["q"] = lambda s, a: a[:, 0] + 1e-6 * torch.randn(a.shape[0])
    at0 = diagnostics.guided_q_stats(smoke_runs["mse"], scales=(), n=2000, k=k)[0]
    assert at0["w"] == 0 and abs(at0["frac_at_best"] - 1 / (k + 1)) < 4 * math.sqrt(k / (k + 1) ** 2 / n)
    assert at0["q_best_of_k"] > at0["q_mean"]
    critic["q"] = lambda s, a: a[:, 0]
    at0, at5 = diagnostics.guided_q_stats(smoke_runs["mse"], scales=(5.0,), n=2000, k=k)
    assert at5["w"] == 5.0 and at5["frac_at_best"] == 1.0 and at5["q_mean"] == pytest.approx(1.0)
    assert 0 < at5["support_distance"] <= 2 * math.sqrt(3)  # within the box [-1, 1]^3
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        diagnostics.guided_q_stats(smoke_runs["mse"], k=0)
    monkeypatch.setattr(A, "load_run", real)
    with pytest.raises(ValueError, match="has no critic"):
        diagnostics.guided_q_stats(smoke_runs["bc"])


def test_energy_fit_stats_against_a_linear_critic_and_the_reference_itself(tiny, smoke_runs, monkeypatch):
    """The energy-fit diagnostic with known parts. With Q = c . a, the particle reference's gradient is
    (alpha / sigma^2) (E_p[m] - E_r[m]), p the posterior r tilted by exp(beta c . m), so it never points against c:
    an energy f = c . a agrees with it everywhere and f = -c . a nowhere. With k = k_ref the k-particle target is
    the reference itself (agreement 1, error 0); a smaller k errs."""
    from aepo_lite.rl import agent as A, diagnostics
    real, sign = A.load_run, {}
    c = torch.tensor([1.0, -0.5, 0.25])

    def fake(run_dir, **kw):
        agent, cfg, data = real(run_dir, **kw)
        agent.energy = lambda s, a, t: sign["f"] * (a * c[: a.shape[1]]).sum(-1)
        agent.critic.q_fn = lambda s, a: (a * c[: a.shape[1]]).sum(-1)
        return agent, cfg, data

    monkeypatch.setattr(A, "load_run", fake)
    for f_sign, expected in ((1.0, 1.0), (-1.0, 0.0)):
        sign["f"] = f_sign
        rows = diagnostics.energy_fit_stats(smoke_runs["mse"], times=(0.2, 0.5), n=64, k=16, k_ref=16)
        assert [r["t"] for r in rows] == [0.2, 0.5]
        for r in rows:
            assert r["energy_agree"] == expected and r["target_agree"] == 1.0 and r["target_rel_err"] == 0.0
            assert r["ref_grad"] > 0 and r["energy_grad"] == pytest.approx(float(c.norm()), rel=1e-5)
    few = diagnostics.energy_fit_stats(smoke_runs["mse"], times=(0.2,), n=64, k=2, k_ref=16)[0]
    assert few["target_rel_err"] > 0.01 and few["k"] == 2 and few["k_ref"] == 16
    for kw, match in (({"k": 0}, "k: expected a positive integer"), ({"k_ref": 0}, "k_ref: expected"),
                      ({"k": 8, "k_ref": 4}, "k: 8 is more than k_ref")):
        with pytest.raises(ValueError, match=match):
            diagnostics.energy_fit_stats(smoke_runs["mse"], **kw)
    monkeypatch.setattr(A, "load_run", real)
    with pytest.raises(ValueError, match="needs an energy network and a critic"):
        diagnostics.energy_fit_stats(smoke_runs["bc"])


def test_energy_fit_stats_around_the_runs_guided_action(tiny, smoke_runs, monkeypatch, tmp_path, capsys):
    """``around = w`` draws a_t around the run's own guided action at scale w (here a stand-in policy that always
    acts at 0.9): the a_t the energy is asked about then centre on alpha_t * 0.9; ``around = 0`` is the default
    measurement, row for row. The table and ``scripts/energy_fit.py --around-scale`` keep the two apart."""
    from aepo_lite.rl import agent as A, diagnostics
    real, seen, scales = A.load_run, [], []

    def fake(run_dir, **kw):
        agent, cfg, data = real(run_dir, **kw)
        act = agent.act_unit

        def act_unit(s, w, **k):
            scales.append(w)
            return act(s, 0.0, **k) * 0 + 0.9 if w else act(s, w, **k)

        agent.act_unit = act_unit
        agent.energy = lambda s, a, t: (seen.append(a.detach().clone()), (a * a).sum(-1))[1]
        return agent, cfg, data

    monkeypatch.setattr(A, "load_run", fake)
    run, kw = smoke_runs["mse"], {"times": (0.2,), "n": 256, "k": 4, "k_ref": 16}
    base = diagnostics.energy_fit_stats(run, **kw)[0]
    assert diagnostics.energy_fit_stats(run, around=0.0, **kw)[0] == base and base["around_w"] == 0.0
    assert 3.0 not in scales
    seen.clear()
    near = diagnostics.energy_fit_stats(run, around=3.0, **kw)[0]
    assert scales[-1] == 3.0 and near["around_w"] == 3.0 and near != base
    from aepo_lite.core.schedule import VPSchedule
    alpha, sigma = (float(v) for v in VPSchedule().alpha_sigma(torch.tensor(0.2)))
    mean = torch.cat(seen).mean(0)  # 256 draws a dimension of alpha * 0.9 + sigma * eps
    assert float((mean - alpha * 0.9).abs().max()) < 4 * sigma / 16
    with pytest.raises(ValueError, match="around: expected a value >= 0"):
        diagnostics.energy_fit_stats(run, around=-1.0, **kw)
    table = diagnostics.energy_fit_table([{"dataset": "d", "method": "m", "seed": 0, **r} for r in (base, near)])
    names = [ln.split(" | ")[1] for ln in table.splitlines()[2:6]]
    assert names == ["K-particle target (K = 4, K_ref = 16)", "K-particle target (K = 4, K_ref = 16) (a_t around w = 3)",
                     "m", "m (a_t around w = 3)"]
    script = load_script("energy_fit")
    out, args = tmp_path / "fit.csv", ["--runs", str(run), "--times", "0.2", "--k-ref", "16", "--out"]
    script.main(args + [str(out)])
    script.main(args + [str(out), "--around-scale", "3"])  # not the rows the CSV holds: measured and added
    both = out.read_text()
    assert len(both.splitlines()) == 3 and "kept" not in capsys.readouterr().out
    script.main(args + [str(out), "--around-scale", "3"])
    assert out.read_text() == both and "kept" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(args + [str(out), "--around-scale", "3", "--mixture-bandwidths", "0"])


def test_mixture_target_grad_against_finite_differences_and_the_particles():
    """``mixture_target_grad`` differentiates the mixture target through its responsibilities, its component means
    and Q's gradient there: against central differences of ``insupport_target``'s values (float64, a critic with
    curvature), and at bandwidth 0 against the particle target's own gradient (derivation 4b: h = 0 is the particles)."""
    from aepo_lite.core import guidance as G
    from aepo_lite.core.aepo import insupport_target
    from aepo_lite.core.schedule import VPSchedule
    from aepo_lite.rl.diagnostics import mixture_target_grad
    gen = torch.Generator().manual_seed(0)
    B, K, d, beta = 6, 5, 3, 2.0
    s = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    sup = (0.6 * torch.randn(B, K, d, generator=gen, dtype=torch.float64)).clamp(-0.9, 0.9)
    a_t = 0.5 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    q_fn = lambda s_, a: torch.sin(2 * a).sum(-1) + 0.5 * (a**2).sum(-1) * s_[:, 0].tanh()  # noqa: E731
    sched, t = VPSchedule(), torch.full((B,), 0.3, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    for h in (0.05, 0.2):
        g, lin, var = mixture_target_grad(a_t, s, sup, q_fn, beta, alpha, sigma, h, clip=None)
        _, m_t, s2 = G.mixture_posterior(a_t, sup, h, alpha, sigma)  # the two terms at the component means
        torch.testing.assert_close(lin, beta * q_fn(s.repeat_interleave(K, 0), m_t.reshape(B * K, d)).reshape(B, K))
        slope = 2 * torch.cos(2 * m_t) + m_t * s.tanh()[:, None, :1]  # grad_a of q_fn, by hand
        torch.testing.assert_close(var, 0.5 * beta**2 * s2[:, None] * (slope**2).sum(-1))
        y = lambda x: insupport_target(x, t, s, sup, posterior="mixture", schedule=sched, beta=beta,  # noqa: E731
                                       q_fn=q_fn, bandwidth=h, clip=None)
        fd = torch.stack([(y(a_t + 1e-5 * e) - y(a_t - 1e-5 * e)) / 2e-5
                          for e in torch.eye(d, dtype=torch.float64)], dim=1)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-6)
    x = a_t.clone().requires_grad_(True)
    (g_p,) = torch.autograd.grad(G.particle_target(x, sup, q_fn(s.repeat_interleave(K, 0), sup.reshape(B * K, d))
                                                   .reshape(B, K), beta, alpha, sigma).sum(), x)
    g0, _, var0 = mixture_target_grad(a_t, s, sup, q_fn, beta, alpha, sigma, 0.0)
    torch.testing.assert_close(g0, g_p)
    assert float(var0.abs().max()) == 0.0  # no kernel, no variance term


def test_energy_fit_stats_measures_a_mixture_runs_own_target(tiny, smoke_runs, monkeypatch, tmp_path, capsys):
    """For a run with the mixture posterior the energy-fit rows carry its own target's agreement: at bandwidth 0 the
    particle target's (the same K actions), at h > 0 another; other runs carry none. ``scripts/energy_fit.py`` keeps
    the rows its CSV holds and adds the others."""
    from aepo_lite.rl import agent as A, diagnostics
    real, h = A.load_run, {}
    c = torch.tensor([1.0, -0.5, 0.25])

    def fake(run_dir, **kw):
        agent, cfg, data = real(run_dir, **kw)
        agent.critic.q_fn = lambda s, a: torch.sin(3 * a * c[: a.shape[1]]).sum(-1)
        if "h" in h:
            cfg.energy.posterior, cfg.energy.bandwidth = "mixture", h["h"]
        return agent, cfg, data

    monkeypatch.setattr(A, "load_run", fake)
    plain = diagnostics.energy_fit_stats(smoke_runs["mse"], times=(0.2,), n=64, k=4, k_ref=16)[0]
    assert "mix_target_agree" not in plain
    h["h"] = 0.0
    at0 = diagnostics.energy_fit_stats(smoke_runs["mse"], times=(0.2,), n=64, k=4, k_ref=16)[0]
    assert at0["mix_target_agree"] == at0["target_agree"]
    assert at0["mix_target_rel_err"] == pytest.approx(at0["target_rel_err"], rel=1e-4)
    h["h"] = 0.3
    wide = diagnostics.energy_fit_stats(smoke_runs["mse"], times=(0.2,), n=64, k=4, k_ref=16)[0]
    assert wide["target_rel_err"] == pytest.approx(at0["target_rel_err"])
    assert abs(wide["mix_target_rel_err"] - at0["mix_target_rel_err"]) > 1e-3
    table = diagnostics.energy_fit_table([{"dataset": "d", "method": "m", "seed": 0, **wide}])
    lines = [ln.split(" | ")[1] for ln in table.splitlines()[2:5]]
    assert lines == ["K-particle target (K = 4, K_ref = 16)", "target of m", "m"]
    assert wide["mix_value_spread"] > 0 and wide["mix_variance_spread"] > 0 and at0["mix_variance_spread"] == 0.0
    assert f"| d | m | 0 | {wide['mix_value_spread']:.2f} / {wide['mix_variance_spread']:.2f} |" in table
    script = load_script("energy_fit")
    out = tmp_path / "energy_fit.csv"
    script.main(["--runs", str(smoke_runs["mse"]), "--times", "0.2", "--k-ref", "16", "--out", str(out)])
    first = out.read_text()
    assert len(first.splitlines()) == 2 and "target of" in (tmp_path / "energy_fit.md").read_text()
    script.main(["--runs", str(smoke_runs["mse"]), "--times", "0.2", "--k-ref", "16", "--out", str(out)])
    assert out.read_text() == first and "kept" in capsys.readouterr().out
    # the bandwidth sweep (no energy needed): the same states and a_t, so h = 0 is the k-particle row above, and
    # the run's own bandwidth its own target's row
    sweep = diagnostics.mixture_bandwidth_stats(smoke_runs["mse"], (0.0, 0.3), times=(0.2,), n=64, k=4, k_ref=16)
    assert [r["bandwidth"] for r in sweep] == [0.0, 0.3]
    assert (sweep[0]["agree"], sweep[1]["agree"]) == (wide["target_agree"], wide["mix_target_agree"])
    assert sweep[0]["rel_err"] == pytest.approx(wide["target_rel_err"], rel=1e-4)
    assert sweep[1]["rel_err"] == pytest.approx(wide["mix_target_rel_err"], rel=1e-5)
    assert sweep[1]["variance_spread"] == pytest.approx(wide["mix_variance_spread"], rel=1e-5)
    for bad, match in (((-0.1,), "bandwidths: expected a value >= 0"), ((), "bandwidths: expected at least one")):
        with pytest.raises(ValueError, match=match):
            diagnostics.mixture_bandwidth_stats(smoke_runs["mse"], bad, times=(0.2,), n=8, k=2, k_ref=4)
    out = tmp_path / "mixture_bandwidth.csv"
    script.main(["--runs", str(smoke_runs["mse"]), "--times", "0.2", "--k-ref", "16", "--mixture-bandwidths", "0",
                 "0.3", "--out", str(out)])
    md = (tmp_path / "mixture_bandwidth.md").read_text()
    assert len(out.read_text().splitlines()) == 3 and "| 0 | 1 |" in md and "| 0.3 | 1 |" in md


def test_seeds_trained_together_match_runs_trained_alone(tiny, smoke_runs):
    """``train_seeds``: the behaviour and IQL critic stages of seeds 0 and 1 are each trained as one stacked model
    into the stage cache, each seed's run reads its own from there, and their energy stages train as one stacked
    model too. Each behaviour model, critic and energy network equals the one its seed trains alone (to float32
    rounding), the stacked checkpoints are gone once every seed's is written, and a rerun trains nothing."""
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import load_run, make_config, train, train_seeds, train_stacked_stages
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    cfgs = [make_config(DS, "mse", "smoke", seed=s) for s in (0, 1)]
    cache, dirs = tiny / "stacked_cache", [tiny / "stacked" / f"s{s}" for s in (0, 1)]
    train_seeds(cfgs, dirs, stage_cache=cache, data=data, progress=False)
    assert not list(cache.glob("*-stacked-*.pt"))
    assert len(list(cache.glob("behaviour-*.pt"))) == 2 and len(list(cache.glob("critic-*.pt"))) == 2
    stats = read_json(dirs[1] / "train_stats.json")
    for stage in ("behaviour", "critic"):
        assert stats[stage]["stacked_seeds"] == [0, 1] and stats[stage]["copied_from"] == str(cache)
    assert stats["energy"]["stacked_seeds"] == [0, 1] and "copied_from" not in stats["energy"]
    alone1 = tiny / "stacked" / "alone-s1"
    train(make_config(DS, "mse", "smoke", seed=1), alone1, data=data, progress=False)
    for d, ref in ((dirs[0], smoke_runs["mse"]), (dirs[1], alone1)):
        got, ref_agent = load_run(d)[0], load_run(ref)[0]
        for net in ("behaviour", "critic", "energy"):
            gap = max((x - y).abs().max().item() for x, y in zip(getattr(got, net).state_dict().values(),
                                                                 getattr(ref_agent, net).state_dict().values())
                      if isinstance(x, torch.Tensor))
            assert gap < 1e-5, (d, net, gap)
    a0, a1 = load_run(dirs[0])[0], load_run(dirs[1])[0]
    assert max((x - y).abs().max().item() for x, y in zip(a0.behaviour.parameters(), a1.behaviour.parameters())) > 1e-3
    assert train_stacked_stages(cfgs, cache, data=data, progress=False) == {}  # every seed's stage is there
    with pytest.raises(ValueError, match=r"seeds: several seeds train together only with one config; seed 1 differs"
                                         r" from seed 0 in behaviour.lr"):
        train_stacked_stages([cfgs[0], make_config(DS, "mse", "smoke", seed=1, behaviour={"lr": 0.5})], cache,
                                 data=data)
    with pytest.raises(ValueError, match=r"seeds: each seed once, got \[0, 0\]"):
        train_stacked_stages([cfgs[0], cfgs[0]], cache, data=data)
    with pytest.raises(ValueError, match=r"stages: only \('behaviour', 'support', 'critic'\) stack, got \['energy'\]"):
        train_stacked_stages(cfgs, cache, data=data, stages=("energy",))
    with pytest.raises(ValueError, match="out: expected one run directory per seed"):
        train_seeds(cfgs, dirs[:1], stage_cache=cache, data=data)


def test_cli_train_several_seeds(tiny, capsys):
    from aepo_lite.cli import main
    from aepo_lite.rl.agent import evaluation_done, load_run
    out = tiny / "cli-seeds"
    assert main(["train", "--dataset", DS, "--method", "bc", "--preset", "smoke", "--seeds", "2", "3", "--out",
                 str(out), "--quiet"]) == 0
    for s in (2, 3):
        agent, cfg, _ = load_run(out / f"bc-smoke-s{s}")
        assert cfg.seed == s and evaluation_done(out / f"bc-smoke-s{s}", cfg)
    assert len(list((out / "stage_cache").glob("behaviour-*.pt"))) == 2
    capsys.readouterr()
    assert main(["train", "--dataset", DS, "--method", "bc", "--preset", "smoke", "--seeds", "4", "4", "--out",
                 str(out), "--quiet"]) == 2
    assert "seeds: expected distinct non-negative seeds, got [4, 4]" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["aepo", "qgpo"])
def test_seeds_trained_together_with_support_actions(tiny, smoke_runs, method):
    """AEPO's default (particle target on support actions, IQL critic) and QGPO (in-support critic, reading each
    seed's support actions), seeds 0 and 1 trained together. Seed 0's behaviour model and critic equal the run trained alone (to float32
    rounding); its energy network equals the one trained alone on the same upstream stages (copied from the
    stacked run), but for the output bias. Both losses are blind to a constant added to f per state (CEP's softmax,
    the centered regression), so that bias's gradient is rounding noise, which Adam's normalised steps turn into
    moves of up to the learning rate either way; guidance never reads it."""
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import load_run, make_config, train, train_seeds
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    dirs = [tiny / f"stacked-{method}" / f"s{s}" for s in (0, 1)]
    cfg0 = make_config(DS, method, "smoke", seed=0)
    train_seeds([cfg0, make_config(DS, method, "smoke", seed=1)], dirs, stage_cache=tiny / f"stacked-{method}-cache",
                data=data, progress=False)
    same_upstream = tiny / f"stacked-{method}" / "alone-s0"
    train(cfg0, same_upstream, data=data, progress=False, init_behaviour=dirs[0])

    def gap(a, b, net, skip_last=False):
        pairs = list(zip(getattr(a, net).named_parameters(), getattr(b, net).parameters()))
        if skip_last:
            assert pairs[-1][0][0].endswith("bias")
            pairs = pairs[:-1]
        return max((x - y).abs().max().item() for (_, x), y in pairs)
    got, alone, copied = load_run(dirs[0])[0], load_run(smoke_runs[method])[0], load_run(same_upstream)[0]
    for net in ("behaviour", "critic"):
        assert gap(got, alone, net) < 1e-4, (method, net, gap(got, alone, net))
    assert gap(got, copied, "energy", skip_last=True) < 1e-5, (method, gap(got, copied, "energy", skip_last=True))
    other = load_run(dirs[1])[0]
    assert gap(got, other, "energy", skip_last=True) > 1e-3  # the seeds differ
    stats = read_json(dirs[1] / "train_stats.json")
    assert stats["energy"]["stacked_seeds"] == [0, 1]
    assert stats["critic"]["stacked_seeds"] == [0, 1]  # IQL and the in-support critic (on each seed's support)
    assert stats["support"]["stacked_seeds"] == [0, 1]  # both seeds' support actions in one sampling pass

    def support(run):
        return torch.cat(torch.load(run / "checkpoints" / "support.pt", weights_only=False)["learner"]["chunks"])
    assert (support(dirs[0]) - support(smoke_runs[method])).abs().max().item() < 1e-4
    from aepo_lite.rl.agent import train_stacked_stages
    with pytest.raises(ValueError, match="stages: seed 0 has no finished behaviour stage in .*; stack 'behaviour'"):
        train_stacked_stages([cfg0, make_config(DS, method, "smoke", seed=1)], tiny / f"empty-cache-{method}",
                             data=data, stages=("support",))


def test_mc_critic_runs_end_to_end_and_is_trained_per_seed(tiny):
    """critic.kind = mc: AEPO trains on the data's returns to go (its label names the critic), resumes as any run,
    and several seeds train it one by one (no stacked Monte-Carlo critic), each as it trains alone."""
    from dataclasses import replace
    from aepo_lite._io import read_json
    from aepo_lite.rl.agent import estimator_label, load_run, make_config, train, train_seeds
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(DS)
    cfgs = [make_config(DS, "aepo", "smoke", seed=s) for s in (0, 1)]
    cfgs = [replace(c, critic=replace(c.critic, kind="mc")) for c in cfgs]
    assert estimator_label(cfgs[0]).endswith("+mc")
    dirs = [tiny / "mc" / f"s{s}" for s in (0, 1)]
    train_seeds(cfgs, dirs, stage_cache=tiny / "mc-cache", data=data, progress=False)
    agent = load_run(dirs[0])[0]
    assert isinstance(agent.critic, MCCritic)
    assert "stacked_seeds" not in read_json(dirs[0] / "train_stats.json")["critic"]
    alone = tiny / "mc" / "alone-s0"
    train(cfgs[0], alone, data=data, progress=False, init_behaviour=dirs[0])
    for x, y in zip(agent.critic.parameters(), load_run(alone)[0].critic.parameters()):
        assert torch.equal(x, y)
