"""Several seeds in one process (aepo_lite.training.stacked): N behaviour models trained as one stacked model
reach the parameters of N separate runs, resume exactly, and refuse what they cannot stack."""
from __future__ import annotations

import pytest
import torch

from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.core.nets import NoiseNet
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.training import BehaviourLearner, Stage, StageStore, run_stage
from aepo_lite.training.stacked import StackedBatches, StackedBehaviourLearner

SEEDS = (3, 7, 11)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(200, 3, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(200, 5, generator=g,
                                                                                     dtype=torch.float64)


def _draw(data):
    A, S = data
    return lambda g: (lambda i: {"a": A[i], "s": S[i]})(torch.randint(0, len(A), (16,), generator=g))


def _model(seed, hidden=32):
    torch.manual_seed(seed)
    return DiffusionModel(NoiseNet(3, 5, hidden, 1), VPSchedule()).double()


def _stacked(data, seeds=SEEDS, decay=10):
    src = StackedBatches(_draw(data), [torch.Generator().manual_seed(100 + s) for s in seeds])
    return StackedBehaviourLearner([_model(s) for s in seeds], 1e-3, decay_steps=decay, batches=src,
                                   generators=[torch.Generator().manual_seed(100 + s) for s in seeds]), src


def _separate(data, seed, steps, decay=10):
    """One seed alone, drawn as run_stage draws it: the global generator for the noise, its own for the batches."""
    learner = BehaviourLearner(_model(seed), 1e-3, decay_steps=decay)
    torch.manual_seed(100 + seed)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        learner.step(_draw(data)(g))
    return learner


def _gap(a: BehaviourLearner, b: BehaviourLearner) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_stacked_seeds_end_at_the_separate_runs_and_continue_alike(data):
    stacked, src = _stacked(data)
    for _ in range(6):
        m = stacked.step(src())
    assert m["loss"].shape == () and m["loss_max"] >= m["loss"]
    for i, seed in enumerate(SEEDS):
        alone = _separate(data, seed, 6)
        one = stacked.unstacked(i, _model(0))
        assert _gap(one, alone) < 1e-12  # float64: rounding only
        # the unstacked learner carries Adam's moments, step count and the cosine schedule: 3 more steps agree
        for learner in (alone, one):
            torch.manual_seed(9)
            g = torch.Generator().manual_seed(5)
            for _ in range(3):
                learner.step(_draw(data)(g))
        assert _gap(one, alone) < 1e-12
    # the seeds differ (a stack of copies would pass the checks above only if every seed were the same)
    p = next(iter(stacked.params.values()))
    assert (p[0] - p[1]).abs().max() > 1e-3


def test_a_dropped_moment_would_show(data):
    """The test above can fail: an unstacked learner without Adam's moments drifts from the separate run."""
    stacked, src = _stacked(data)
    for _ in range(6):
        stacked.step(src())
    alone = _separate(data, SEEDS[0], 6)
    fresh = BehaviourLearner(_model(0), 1e-3, decay_steps=10)
    fresh.model.load_state_dict(stacked.unstacked(0, _model(0)).model.state_dict())
    assert _gap(fresh, alone) < 1e-12
    for learner in (alone, fresh):
        torch.manual_seed(9)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            learner.step(_draw(data)(g))
    assert _gap(fresh, alone) > 1e-6


def test_run_stage_resumes_a_stacked_stage_bit_for_bit(data, tmp_path):
    def stage(store_dir, steps):
        holder = {}

        def learner():
            holder["l"], holder["src"] = _stacked(data, decay=None)
            return holder["l"]
        return Stage("behaviour-stacked", {"seeds": list(SEEDS)}, steps, learner=learner,
                     batches=lambda g: holder["src"]()), StageStore(store_dir)

    st, store = stage(tmp_path / "straight", 8)
    straight, _ = run_stage(st, store, progress=False, checkpoint_every=4)

    class Killed(Exception):
        pass
    calls = {"n": 0}

    def kill():
        calls["n"] += 1
        if calls["n"] == 7:
            raise Killed
    st, store = stage(tmp_path / "killed", 8)
    with pytest.raises(Killed):
        run_stage(st, store, progress=False, checkpoint_every=4, before_step=kill)
    st, store = stage(tmp_path / "killed", 8)
    resumed, stats = run_stage(st, store, progress=False, checkpoint_every=4)
    assert stats["resumed_from"] == 4
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k]), k


def test_refusals_name_the_setting(data):
    with pytest.raises(ValueError, match="generators: expected one per model"):
        StackedBehaviourLearner([_model(0), _model(1)], 1e-3, generators=[torch.Generator()])
    with pytest.raises(ValueError, match="one architecture"):
        StackedBehaviourLearner([_model(0), _model(1, hidden=16)], 1e-3, generators=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="seeds: a stacked run needs at least one"):
        StackedBatches(_draw(data), [])
    stacked, src = _stacked(data)
    b = src()
    with pytest.raises(ValueError, match="batch: expected 3 stacked batches"):
        stacked.step({k: v[:2] for k, v in b.items()})
    with pytest.raises(ValueError, match=r"i: expected a model index in \[0, 3\)"):
        stacked.unstacked(3, _model(0))
    two, _ = _stacked(data, seeds=SEEDS[:2])
    with pytest.raises(ValueError, match="seeds: the checkpoint holds 3 models, this run has 2"):
        two.load_state_dict(stacked.state_dict())


# ----------------------------------------------------------------------------- IQL critics
def _critic_data():
    g = torch.Generator().manual_seed(1)
    n = 120
    return {"s": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "a": torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1,
            "r": torch.randn(n, generator=g, dtype=torch.float64), "s2": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "done": (torch.rand(n, generator=g) < 0.2).double()}


def _critic(seed, kind="iql", **kw):
    from aepo_lite.config import CriticConfig
    from aepo_lite.core.critics import InSupportCritic, IQLCritic
    torch.manual_seed(seed)
    cls = IQLCritic if kind == "iql" else InSupportCritic
    return cls(5, 3, CriticConfig(hidden=16, depth=2, lr=3e-3, **kw)).double()


def _critic_draw(data, support=None):
    """Critic batches; ``support`` (n, K, d): that seed's support actions at s' (the in-support critic)."""
    def draw(g):
        i = torch.randint(0, 120, (12,), generator=g)
        out = {k: v[i] for k, v in data.items()}
        if support is not None:
            out["support2"] = support[i]
        return out
    return draw


def _support(seed):
    g = torch.Generator().manual_seed(50 + seed)
    return torch.rand(120, 4, 3, generator=g, dtype=torch.float64) * 2 - 1


def _critic_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict(prefix="").values(),
                                                          b.state_dict(prefix="").values()))


@pytest.mark.parametrize("kind", ["iql", "insupport"])
def test_stacked_critics_end_at_the_separate_runs(kind):
    """IQL and QGPO's in-support critic (each seed reading its own support actions at s')."""
    from aepo_lite.training.stacked import StackedCritic
    data = _critic_data()
    sup = {s: _support(s) if kind == "insupport" else None for s in SEEDS}
    src = StackedBatches([_critic_draw(data, sup[s]) for s in SEEDS],
                         [torch.Generator().manual_seed(100 + s) for s in SEEDS])
    stacked = StackedCritic([_critic(s, kind) for s in SEEDS], batches=src)
    for _ in range(5):
        m = stacked.step(src())
    assert set(m) == ({"v_loss", "q_loss", "q_mean", "v_mean"} if kind == "iql" else {"q_loss", "q_mean", "target_mean"})
    means = []
    for i, seed in enumerate(SEEDS):
        alone, g = _critic(seed, kind), torch.Generator().manual_seed(100 + seed)
        for _ in range(5):
            last = alone.step(_critic_draw(data, sup[seed])(g))
        means.append(last["q_loss"])
        one = stacked.unstacked(i, _critic(0, kind))
        assert _critic_gap(one, alone) < 1e-12  # q, q_target (and v)
        g = torch.Generator().manual_seed(5)  # the Adams carried over: 3 more steps agree
        for _ in range(3):
            batch = _critic_draw(data, sup[seed])(g)
            one.step(batch), alone.step(batch)
        assert _critic_gap(one, alone) < 1e-12
    assert float(m["q_loss"]) == pytest.approx(float(torch.stack(means).mean()), rel=1e-12)
    w = stacked.q["weights.0"]
    assert (w[0] - w[1]).abs().max() > 1e-3  # the seeds differ


def test_stacked_critic_resumes_and_refuses():
    from aepo_lite.training.stacked import StackedCritic
    data = _critic_data()

    def make():
        src = StackedBatches(_critic_draw(data), [torch.Generator().manual_seed(100 + s) for s in SEEDS])
        return StackedCritic([_critic(s) for s in SEEDS], batches=src), src
    straight, src = make()
    for _ in range(6):
        straight.step(src())
    first, src1 = make()
    for _ in range(3):
        first.step(src1())
    second, src2 = make()
    second.load_state_dict(first.state_dict())
    for _ in range(3):
        second.step(src2())
    for part in ("q", "v", "q_target"):
        for k, v in getattr(straight, part).items():
            assert torch.equal(v, getattr(second, part)[k]), (part, k)
    with pytest.raises(ValueError, match="critics: a stacked run needs one critic config"):
        StackedCritic([_critic(0), _critic(1, expectile=0.9)])
    used = _critic(0)
    used.step(_critic_draw(data)(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="before their first step"):
        StackedCritic([used, _critic(1)])
    from aepo_lite.config import CriticConfig
    from aepo_lite.core.critics import InSupportCritic
    with pytest.raises(ValueError, match=r"critic: a stacked run needs critics of one kind .* got \['IQLCritic', "
                                         r"'InSupportCritic'\]"):
        StackedCritic([_critic(0), InSupportCritic(5, 3, CriticConfig(hidden=16))])
    with pytest.raises(ValueError, match="seeds: the checkpoint holds 3 critics, this run has 2"):
        StackedCritic([_critic(0), _critic(1)]).load_state_dict(straight.state_dict())


# ----------------------------------------------------------------------------- energy learners
def _energy_setup(method, **kw):
    """Per seed: an energy learner with its own critic (a different quadratic Q per seed, as each seed's critic
    differs), and one batch source per seed reading that critic."""
    from aepo_lite.config import EnergyConfig
    from aepo_lite.core.aepo import EnergyLearner
    from aepo_lite.core.nets import EnergyNet
    g = torch.Generator().manual_seed(2)
    n, K = 90, 4
    S = torch.randn(n, 5, generator=g, dtype=torch.float64)
    A = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    SUP = torch.rand(n, K, 3, generator=g, dtype=torch.float64) * 2 - 1
    cfg = EnergyConfig(hidden=16, depth=2, lr=3e-3, beta=2.0, **kw)

    def q_fn_of(seed):
        c = torch.linspace(-0.5, 0.5, 3, dtype=torch.float64) * (1 + seed / 10)
        return lambda s, a: -((a - c) ** 2).sum(-1) + 0.1 * s[:, 0]

    def learner(seed):
        torch.manual_seed(seed)
        net = EnergyNet(3, 5, 16, 2).double()
        return EnergyLearner(net, cfg, schedule=VPSchedule(), q_fn=q_fn_of(seed), method=method,
                             decay_steps=20)

    def draw_of(seed):
        q_fn = q_fn_of(seed)

        def draw(gen):
            i = torch.randint(0, n, (10,), generator=gen)
            sup = SUP[i]
            q = q_fn(S[i].repeat_interleave(K, 0), sup.reshape(-1, 3)).reshape(10, K)
            return {"s": S[i], "a": A[i], "support": sup, "support_q": q}
        return draw
    return learner, draw_of


@pytest.mark.parametrize("method,kw,fuse", [("aepo", {}, True), ("aepo", {}, False), ("aepo", {"centered": False}, True),
                                            ("qgpo", {}, True), ("qgpo", {}, False), ("mse", {}, True),
                                            ("aepo", {"grad_clip": 0.01}, True), ("aepo", {"fit": "squared"}, True)])
def test_stacked_energy_learners_end_at_the_separate_runs(method, kw, fuse, monkeypatch):
    """3 stacked energy learners end at the 3 trained alone; the row-wise losses (the particle target on
    support_q, CEP) through the fused step (every seed's targets in one pass) or seed by seed."""
    from aepo_lite.training.stacked import StackedEnergyLearner
    learner, draw_of = _energy_setup(method, **kw)
    src = StackedBatches([draw_of(s) for s in SEEDS], [torch.Generator().manual_seed(100 + s) for s in SEEDS])
    stacked = StackedEnergyLearner([learner(s) for s in SEEDS], batches=src, fuse_targets=fuse,
                                   generators=[torch.Generator().manual_seed(200 + s) for s in SEEDS])
    fused = []
    monkeypatch.setattr(stacked, "_fused_step", (lambda f: lambda *a: fused.append(1) or f(*a))(stacked._fused_step))
    for _ in range(5):
        m = stacked.step(src())
    assert len(fused) == (5 if fuse and method != "mse" else 0)
    assert "energy_loss" in m and ("target_mean" in m) == (method == "aepo")
    for i, seed in enumerate(SEEDS):
        alone, gen = learner(seed), torch.Generator().manual_seed(100 + seed)
        torch.manual_seed(200 + seed)  # a run's energy learner draws from torch's global generator
        for _ in range(5):
            alone.step(draw_of(seed)(gen))
        one = stacked.unstacked(i, learner(seed))  # a fresh learner of that seed (its own critic)
        gap = max((x - y).abs().max().item() for x, y in zip(one.energy.parameters(), alone.energy.parameters()))
        assert gap < 1e-9, (method, seed, gap)  # float64 rounding, grown through Adam's first steps
        assert one.generator is None
        for lr in (one, alone):  # Adam's moments and the schedule carried over
            torch.manual_seed(9)
            g2 = torch.Generator().manual_seed(7)
            for _ in range(2):
                lr.step(draw_of(seed)(g2))
        gap = max((x - y).abs().max().item() for x, y in zip(one.energy.parameters(), alone.energy.parameters()))
        assert gap < 1e-9, (method, seed, gap)
    w = next(iter(stacked.params.values()))
    assert (w[0] - w[1]).abs().max() > 1e-3


def test_stacked_energy_grad_clip_acts_and_refusals():
    """With a tight grad_clip the separate runs differ from unclipped ones (so the per-model clip above is tested),
    and what cannot be stacked is refused. Two steps: Adam's first step is nearly blind to a gradient's scale (its
    update is g / |g| but for eps), so a clip shows from the second step, whose clip factor differs."""
    from aepo_lite.training.stacked import StackedEnergyLearner
    clipped, draw_of = _energy_setup("aepo", grad_clip=0.01)  # the default fit's gradient norm here: 0.04
    free, _ = _energy_setup("aepo")
    a, b = clipped(3), free(3)
    for lr in (a, b):
        torch.manual_seed(1)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            lr.step(draw_of(3)(g))
    assert max((x - y).abs().max().item() for x, y in zip(a.energy.parameters(), b.energy.parameters())) > 1e-6
    with pytest.raises(ValueError, match="energy: a stacked run needs one energy config and method"):
        StackedEnergyLearner([clipped(0), free(1)], generators=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="before their first step"):
        StackedEnergyLearner([a], generators=[torch.Generator()])
    with pytest.raises(ValueError, match="generators: expected one per learner"):
        StackedEnergyLearner([free(0), free(1)], generators=[torch.Generator()])
    with pytest.raises(ValueError, match="draw: expected one batch source per seed"):
        StackedBatches([draw_of(0)], [torch.Generator()] * 2)


def _sampler(seed, obs, k=3, solver="dpmpp2m", steps=4, chunk=24):
    from aepo_lite.config import TrainConfig
    from aepo_lite.rl.agent import SupportSampler
    cfg = TrainConfig()
    cfg.support.k, cfg.support.solver, cfg.support.steps = k, solver, steps
    return SupportSampler(_model(seed), obs, cfg, chunk=chunk)


@pytest.mark.parametrize("solver", ["dpmpp2m", "dpm2"])
def test_stacked_support_actions_are_the_separate_passes(data, solver):
    """N seeds' support actions drawn in one pass are each seed's own pass (float64), chunk by chunk."""
    from aepo_lite.training.stacked import StackedSupportSampler
    obs = data[1][:37]
    stacked = StackedSupportSampler([_sampler(s, obs, solver=solver) for s in SEEDS],
                                    generators=[torch.Generator().manual_seed(100 + s) for s in SEEDS])
    n = _sampler(0, obs).n_steps(37, 3, chunk=24)
    assert n == 5  # 8 rows a chunk: the last chunk is short
    for _ in range(n):
        stacked.step({})
    for i, seed in enumerate(SEEDS):
        alone, g = _sampler(seed, obs, solver=solver), torch.Generator().manual_seed(100 + seed)
        for _ in range(n):
            alone.step({"generator": g})
        got = stacked.unstacked(i, _sampler(seed, obs, solver=solver)).support
        assert got.shape == alone.support.shape == (37, 3, 3)
        assert (got - alone.support).abs().max().item() < 1e-12
    # the seeds' models differ, and their actions with them
    assert (stacked.unstacked(0).support - stacked.unstacked(1).support).abs().max().item() > 1e-2


def test_stacked_support_resumes_and_refuses(data):
    from aepo_lite.training.stacked import StackedSupportSampler
    obs = data[1][:40]

    def make(seeds=SEEDS, **kw):
        return StackedSupportSampler([_sampler(s, obs, **kw) for s in seeds],
                                     generators=[torch.Generator().manual_seed(100 + s) for s in seeds])
    whole, cut = make(), make()
    for _ in range(5):
        whole.step({})
    for _ in range(2):
        cut.step({})
    again = make()
    again.load_state_dict(cut.state_dict())
    for _ in range(3):
        again.step({})
    assert torch.equal(again.unstacked(2).support, whole.unstacked(2).support)
    with pytest.raises(ValueError, match="seeds: the checkpoint holds 3 support samplers, this run has 2"):
        make(SEEDS[:2]).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="support.solver: .* got 'ddpm'"):
        make(solver="ddpm")
    with pytest.raises(ValueError, match="support: a stacked run needs one support config"):
        StackedSupportSampler([_sampler(3, obs), _sampler(7, obs, k=4)], generators=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="generators: expected one per sampler"):
        StackedSupportSampler([_sampler(3, obs)], generators=[])
    stepped = _sampler(3, obs)
    stepped.step({"generator": torch.Generator()})
    with pytest.raises(ValueError, match="before their first step"):
        StackedSupportSampler([stepped, _sampler(7, obs)], generators=[torch.Generator()] * 2)
    with pytest.raises(ValueError, match="i: expected a sampler index"):
        whole.unstacked(3)


@pytest.mark.parametrize("method,kw", [("aepo", {}), ("aepo", {"centered": False}), ("qgpo", {})])
def test_noise_drawn_first_gives_the_same_loss(method, kw):
    """loss_parts(batch, draws=noise_draws(batch)) is loss_parts(batch): the same draws from the same generator."""
    learner, draw_of = _energy_setup(method, **kw)
    batch = draw_of(3)(torch.Generator().manual_seed(0))
    losses = []
    for pre in (False, True):
        el = learner(3)
        el.generator = torch.Generator().manual_seed(5)
        args, finish = el.loss_parts(batch, draws=el.noise_draws(batch) if pre else None)
        losses.append(finish(el.energy(*args))[0])
        assert el.generator.get_state().equal(torch.Generator().manual_seed(5).get_state()) is False
    assert torch.equal(losses[0], losses[1])
    mse, mse_draw = _energy_setup("mse")
    el, b = mse(3), mse_draw(3)(torch.Generator().manual_seed(0))
    assert not el.rowwise(b)
    with pytest.raises(ValueError, match="draws: the mse energy .* is not row-wise"):
        el.noise_draws(b)
    with pytest.raises(ValueError, match="draws: the mse energy .* is not row-wise"):
        el.loss_parts(b, draws=(torch.zeros(10), torch.zeros(10, 3)))


@pytest.mark.parametrize("kind", ["iql", "insupport"])
def test_stacked_q_is_each_critics_q(kind):
    """StackedQ: block i through critic i's q_fn (float64); support_q as each seed's batch source computes it."""
    from aepo_lite.training.stacked import StackedQ
    critics = [_critic(s, kind) for s in SEEDS]
    for c in critics:  # targets that differ from the online heads (q_fn reads the target heads)
        with torch.no_grad():
            for p in c.q_target.parameters():
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    sup = torch.rand(3, 7, 4, 3, generator=g, dtype=torch.float64) * 2 - 1
    sq = StackedQ(critics)
    out = sq.support_q({"s": s, "support": sup})
    for i, c in enumerate(critics):
        want = c.q_fn(s[i].repeat_interleave(4, 0), sup[i].reshape(-1, 3)).reshape(7, 4)
        assert (out["support_q"][i] - want).abs().max().item() < 1e-12
        assert (c.q_fn(s[i], sup[i, :, 0]) - sq(s, sup[:, :, 0])[i]).abs().max().item() < 1e-12
    assert (out["support_q"][0] - out["support_q"][1]).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="s, a: expected 3 stacked blocks"):
        sq(s[:2], sup[:2, :, 0])
    with pytest.raises(ValueError, match="critics: a stacked Q needs one architecture"):
        from aepo_lite.config import CriticConfig
        StackedQ([_critic(0, kind), type(critics[0])(5, 3, CriticConfig(hidden=8, depth=2)).double()])


def test_support_sampled_ahead_is_the_chunk_by_chunk_pass(data, tmp_path):
    """SupportSampler(per_call=3): three chunks a pass (the default on CUDA), their noise drawn chunk by chunk,
    gives the actions of one chunk a pass (float64), also when the stage is killed inside a pass and resumed.
    37 rows: the last chunk holds 5 rows, not 8."""
    obs = data[1][:37]

    def stage(per_call):
        def make():
            sampler = _sampler(3, obs)
            sampler.per_call = per_call
            return sampler
        return Stage("support", {"per_call": "any"}, _sampler(3, obs).n_steps(37, 3, chunk=24), learner=make,
                     batches=lambda g: {"generator": g}, seed=5)
    one, _ = run_stage(stage(1), StageStore(tmp_path / "one"), progress=False)
    ahead, _ = run_stage(stage(3), StageStore(tmp_path / "ahead"), progress=False)
    assert len(one.chunks) == len(ahead.chunks) == 5 and ahead.done == 5
    assert ahead.support.shape == one.support.shape == (37, 3, 3)
    assert (one.support - ahead.support).abs().max().item() < 1e-12
    # killed at step 2 (a checkpoint inside the first pass of 3 chunks), then resumed
    store = StageStore(tmp_path / "cut")
    cut = stage(3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(replace_batches(cut, stop_at=3), store, progress=False, checkpoint_every=2)
    resumed, stats = run_stage(cut, store, progress=False, checkpoint_every=2)
    assert stats["resumed_from"] == 2
    assert (resumed.support - ahead.support).abs().max().item() < 1e-12


def replace_batches(stage, stop_at):
    """``stage`` whose batch source raises KeyboardInterrupt at its ``stop_at``-th call (a killed run)."""
    from dataclasses import replace
    calls = [0]

    def batches(g):
        calls[0] += 1
        if calls[0] == stop_at:
            raise KeyboardInterrupt
        return stage.batches(g)
    return replace(stage, batches=batches)


def test_stacked_steps_read_nothing_back_to_the_host(data):
    """Several seeds train eagerly (no capture), so a host read in a stacked step would stall the GPU at every
    step: the behaviour, both critics' and the energies' stacked steps call none of the operators that read
    back on CUDA (optimiser steps aside: fused on CUDA)."""
    from aepo_lite.training.captured import host_syncs
    from aepo_lite.training.stacked import StackedCritic, StackedEnergyLearner
    stacked, src = _stacked(data)
    stacked.step(src())
    steps = {"behaviour": (stacked, src)}
    for kind in ("iql", "insupport"):
        crit_src = StackedBatches([_critic_draw(_critic_data(), _support(s) if kind == "insupport" else None)
                                   for s in SEEDS], [torch.Generator().manual_seed(100 + s) for s in SEEDS])
        steps[kind] = (StackedCritic([_critic(s, kind) for s in SEEDS], batches=crit_src), crit_src)
    for method in ("aepo", "qgpo", "mse"):
        learner, draw_of = _energy_setup(method)
        e_src = StackedBatches([draw_of(s) for s in SEEDS], [torch.Generator().manual_seed(100 + s) for s in SEEDS])
        learners = [learner(s) for s in SEEDS]
        for one in learners:
            one.check_finite = False  # as on CUDA (the CPU's named NaN errors read back)
        steps[method] = (StackedEnergyLearner(learners, batches=e_src, fuse_targets=True,
                                              generators=[torch.Generator().manual_seed(200 + s) for s in SEEDS]),
                         e_src)
    for name, (learner, batches) in steps.items():
        learner.step(batches())  # lazily made state
        assert host_syncs(learner.step, batches(), skip_optimisers=True) == [], name
    assert host_syncs(stacked.step, src()) == ["aten._local_scalar_dense"]  # the CPU's Adam, counted without the skip
