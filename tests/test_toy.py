"""Toy 2D tasks and their exact references (docs/derivation.md section 6), checked against independent
brute-force computations."""
import math

import pytest
import torch

from aepo_lite.toy import tasks as toy
from aepo_lite.core.schedule import VPSchedule

TASKS = ("swissroll", "8gaussians", "moons", "rings", "checkerboard", "2spirals")


def test_the_six_tasks_are_registered_seeded_and_in_the_box():
    assert set(TASKS) <= set(toy.task_names())
    for name in TASKS:
        task = toy.get_task(name)
        x = task.sample(3000, seed=3)
        assert x.shape == (3000, 2) and x.dtype == torch.float32
        assert torch.equal(x, task.sample(3000, seed=3))
        assert not torch.equal(x, task.sample(3000, seed=4))
        assert float(x.abs().max()) < 1.1, name
        e = task.reward(x)
        assert e.shape == (3000,) and float(e.min()) >= 0 and float(e.max()) <= 1
        assert float(e.std()) > 0.1, f"{name}: the reward should vary over the data"


def test_rewards_follow_the_published_labels():
    s = toy.SCALE
    # 8 gaussians: centre k (counter-clockwise from (0, 1)) has reward k / 7
    ang = math.pi / 2 + math.pi / 4 * torch.arange(8, dtype=torch.float64)
    centres = 4 / 1.414 * s * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    assert torch.allclose(toy.get_task("8gaussians").reward(centres), torch.arange(8, dtype=torch.float64) / 7)
    # rings, from the outside in: 0.667, 0.333, 1, 0
    pts = torch.tensor([[3.0, 0], [0, 2.25], [-1.5, 0], [0, -0.75]], dtype=torch.float64) * s
    assert torch.allclose(toy.get_task("rings").reward(pts), torch.tensor([0.667, 0.333, 1.0, 0.0], dtype=torch.float64))
    # checkerboard: 1 on the columns 0 < x <= 2 and x <= -2 (published units)
    cb = torch.tensor([[1.0, 0], [3.0, 0], [-1.0, 0], [-3.0, 0]], dtype=torch.float64) * s
    assert toy.get_task("checkerboard").reward(cb).tolist() == [1.0, 0.0, 0.0, 1.0]
    # moons: the lower (inner) moon's tip is rewarded, the upper moon's top is not
    mo = (torch.tensor([[1.0, 0.5 - 1.0], [0.0, 1.0]], dtype=torch.float64) * 2 + torch.tensor([-1.0, -0.2])) * s
    assert toy.get_task("moons").reward(mo).tolist() == [1.0, 0.0]
    # swiss roll and spirals: radial rewards
    assert float(toy.get_task("swissroll").reward(torch.zeros(1, 2))) == 0.0
    assert float(toy.get_task("2spirals").reward(torch.zeros(1, 2))) == 1.0


def test_moons_reward_is_the_nearest_arc_point_by_brute_force():
    """The moons reward compares each point's distance to the nearer of 256 points on each arc; it is computed from
    the angle (the arc point nearest in angle), checked here against the distances to all 512 points: on the box,
    on the data, beyond the arcs' ends and at the circles' centres."""
    from aepo_lite.toy import tasks as T
    g = torch.Generator().manual_seed(3)
    box = torch.rand(20000, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    data = T.get_task("moons").sample(20000, seed=4)
    ends = torch.cat([a[[0, -1]] for a in T._MOON_ARCS]).repeat(1000, 1)
    ends = ends + 0.05 * torch.randn(ends.shape, generator=g, dtype=torch.float64)
    centres = torch.tensor([c for c, _ in T._MOON_CIRCLES], dtype=torch.float64) * T.SCALE
    x = torch.cat([box, data, ends, centres])
    outer, inner = T._MOON_ARCS
    brute = [((x[:, None] - a[None]) ** 2).sum(-1).min(1).values.sqrt() for a in (outer, inner)]
    for arc, (c, start), want in zip((outer, inner), T._MOON_CIRCLES, brute):
        assert torch.allclose(T._arc_distance(x, arc, c, start), want, atol=1e-12)
    labels = (brute[1] < brute[0]).double()
    assert 0.3 < labels.mean() < 0.7  # both labels occur
    assert torch.equal(T.get_task("moons").reward(x), labels)
    assert torch.equal(T.get_task("moons").reward(x.float()), labels.float())


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: swissroll, 8gaussians"):
        toy.get_task("spiral")


def test_user_registered_task():
    name = "test_user_disk"
    sampler = lambda n, g: 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)  # noqa: E731
    reward = lambda x: (x[:, 0] > 0).to(x.dtype)  # noqa: E731
    try:
        toy.register_task(name, sampler, reward, "a test task")
        assert name in toy.task_names()
        x = toy.target_samples(name, 20.0, 2000, seed=0)
        assert float((x[:, 0] > 0).float().mean()) > 0.99
        with pytest.raises(ValueError, match="already registered"):
            toy.register_task(name, sampler, reward)
    finally:
        toy.TOY_TASKS.pop(name, None)
    with pytest.raises(ValueError, match=r"reward: expected values in \[0, 1\]"):
        toy.register_task("test_bad", sampler, lambda x: 2 + x[:, 0] * 0)
    assert "test_bad" not in toy.task_names()


def _brute_force_E(x_t, t, data, e, beta):
    a, s = (float(v) for v in VPSchedule().alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    d2 = ((x_t[:, None, :] - a * data[None]) ** 2).sum(-1)  # (M, N)
    logk = -d2 / (2 * s**2)
    E = torch.logsumexp(logk + beta * e, 1) - torch.logsumexp(logk, 1)
    logp = torch.logsumexp(logk, 1) - math.log(data.shape[0]) - math.log(2 * math.pi * s**2)
    return E, logp


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.3, 1.0])
def test_exact_intermediate_energy_matches_brute_force_logsumexp(t):
    task = toy.get_task("8gaussians")
    data = task.sample(300, seed=1, dtype=torch.float64)
    e = task.reward(data)
    x_t = torch.randn(57, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    E, logp = toy.exact_intermediate_energy(x_t, t, data, e, 10.0, return_log_density=True, chunk_bytes=4000)
    E_ref, logp_ref = _brute_force_E(x_t, t, data, e, 10.0)
    assert torch.allclose(E, E_ref, atol=1e-9, rtol=0)
    assert torch.allclose(logp, logp_ref, atol=1e-9, rtol=0)
    # float32 kernel: same numbers to float32 precision
    E32 = toy.exact_intermediate_energy(x_t.float(), t, data.float(), e.float(), 10.0)
    assert torch.allclose(E32.double(), E_ref, atol=2e-3)


def test_exact_energy_limits():
    task = toy.get_task("rings")
    data = task.sample(2000, seed=0, dtype=torch.float64)
    e = task.reward(data)
    beta = 3.0
    # t = 1: the posterior is (almost) the prior, E_1 = log mean_j exp(beta e_j) everywhere
    E1 = toy.exact_intermediate_energy(torch.zeros(5, 2, dtype=torch.float64), 1.0, data, e, beta)
    assert torch.allclose(E1, torch.logsumexp(beta * e, 0) - math.log(len(e)), atol=2e-3)
    # t = t_min at a data point: E_0 = beta e(x)
    E0 = toy.exact_intermediate_energy(data[:20] * float(VPSchedule().alpha(torch.tensor(1e-3))), 1e-3, data, e, beta)
    assert torch.allclose(E0, beta * e[:20], atol=1e-6)


def test_target_samples_match_the_reward_weighted_mean():
    task = toy.get_task("2spirals")
    pool = task.sample(20_000, seed=5, dtype=torch.float64)
    e = task.reward(pool)
    beta = 10.0
    w = torch.softmax(beta * e, 0)
    x = toy.target_samples(task, beta, 40_000, pool=pool, seed=6, dtype=torch.float64)
    er = task.reward(x)
    se = float(er.std()) / math.sqrt(len(er))
    assert abs(float(er.mean()) - float((w * e).sum())) < 4 * se
    m_exact = (w[:, None] * pool).sum(0)
    assert torch.allclose(x.mean(0), m_exact, atol=4 * float(x.std(0).max()) / math.sqrt(len(x)))
    # beta = 0 is the behaviour distribution itself
    x0 = toy.target_samples(task, 0.0, 50_000, pool=pool, seed=7, dtype=torch.float64)
    assert abs(float(task.reward(x0).mean()) - float(e.mean())) < 0.01


def test_sliced_wasserstein_known_values_and_floor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    # a shift by delta along e1: W_2 along theta is delta |cos theta|, so SW_2 = delta / sqrt(2)
    assert toy.sliced_wasserstein(x, x + torch.tensor([0.3, 0.0]), 256) == pytest.approx(0.3 / math.sqrt(2), rel=1e-3)
    assert toy.sliced_wasserstein(x, x) == 0.0
    # the floor shrinks like n^(-1/2)
    f_small = sum(toy.distance_floor("8gaussians", 10.0, 500, seed=s, pool_size=30_000) for s in range(3)) / 3
    f_big = sum(toy.distance_floor("8gaussians", 10.0, 8000, seed=s, pool_size=30_000) for s in range(3)) / 3
    assert 2.5 < f_small / f_big < 6.5
    # and the behaviour is far from the beta = 10 target compared with the floor
    behaviour = toy.get_task("moons").sample(2000, seed=9)
    target = toy.target_samples("moons", 10.0, 2000, seed=9, pool_size=10_000)
    assert toy.sliced_wasserstein(behaviour, target) > 5 * toy.distance_floor("moons", 10.0, 2000, pool_size=10_000)


def test_energy_error_ignores_a_constant_and_weights():
    E = torch.randn(100, dtype=torch.float64)
    assert toy.energy_error(E + 3.7, E) == pytest.approx(0.0, abs=1e-12)
    bump = torch.zeros(100, dtype=torch.float64)
    bump[0] = 1.0
    lw = torch.zeros(100, dtype=torch.float64)
    lw[0] = -50.0  # the bumped point has (almost) no weight
    assert toy.energy_error(E + bump, E, lw) < 1e-9
    assert toy.energy_error(E + bump, E) == pytest.approx(math.sqrt(0.01 - 1e-4), rel=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        toy.target_samples("moons", -1.0, 10)
    with pytest.raises(ValueError, match="beta"):
        toy.target_samples("moons", float("nan"), 10)
    with pytest.raises(ValueError, match="grid"):
        toy.make_grid(10**6)
    with pytest.raises(ValueError, match="n: .*GiB"):
        toy.get_task("moons").sample(10**12)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        toy.get_task("moons").sample(0)
    with pytest.raises(ValueError, match="x, y"):
        toy.sliced_wasserstein(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="t:"):
        toy.exact_intermediate_energy(torch.zeros(2, 2), 2.0, torch.zeros(3, 2), torch.zeros(3), 1.0)
