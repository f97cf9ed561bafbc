"""The error budget (docs/derivation.md 6b): the parts are zero where theory says, each part changes only its own
source (an exact stand-in for the behaviour model or the critic reproduces the part before it), the
exact noise prediction's Jacobian is the posterior covariance, and the outputs are finite and written
deterministically."""
import pytest
import torch
from torch import nn

from aepo_lite.config import BehaviourConfig, CriticConfig
from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.core.schedule import VPSchedule
from aepo_lite.toy import budget as B
from aepo_lite.toy import tasks as toy
from aepo_lite.training import StageStore
from conftest import load_script

DT = torch.float64


def _cfg(**kw):
    base = dict(tasks=("2spirals",), times=(0.05, 0.5), n_ref_data=1500, grid_size=12, support_pool=256,
                sample_steps=8, support_k=(8,), chunk=64)
    base.update(kw)
    return B.BudgetConfig(**base).validate()


class _ExactNet(nn.Module):
    """eps* of the reference data in float64: a behaviour model with no learning error."""

    def __init__(self, data, schedule):
        super().__init__()
        self.fn, self.action_dim = B.exact_eps_fn(data, schedule), 2
        self.unused = nn.Parameter(torch.zeros((), dtype=DT))  # sets the dtype the budget evaluates it in

    def forward(self, a_t, t, s=None):
        return self.fn(a_t, t)


class _RewardNet(nn.Module):
    """The true reward as a critic module (float64)."""

    def __init__(self, task):
        super().__init__()
        self.q = B._true_reward(task)
        self.unused = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x):
        return self.q(None, x)[:, None]


def test_particles_with_every_data_point_are_the_exact_energy():
    cfg = _cfg(tasks=("8gaussians",), estimators=("particles-all",), support_k=(0,))
    part = B.approximation_part("8gaussians", cfg)
    assert set(part) == {("particles-all", t) for t in cfg.times}
    assert max(part.values()) < 1e-9, part


def test_mixture_with_zero_bandwidth_is_the_particle_target():
    cfg = _cfg(estimators=("particles-K8", "mixture-first-K8-h0"), bandwidths=(0.0,), clip=None)
    part = B.approximation_part("2spirals", cfg)
    for t in cfg.times:
        assert abs(part[("particles-K8", t)] - part[("mixture-first-K8-h0", t)]) < 1e-9
        assert part[("particles-K8", t)] > 1e-3  # K = 8 is not exact: the comparison is not between zeros


def test_exact_eps_jacobian_is_the_posterior_covariance():
    """d eps*/d x_t = (I - (alpha^2 / sigma^2) Cov[x_0 | x_t]) / sigma, Cov from the posterior weights directly."""
    sch = VPSchedule()
    data = toy.get_task("moons").sample(500, seed=3, dtype=DT)
    eps = B.exact_eps_fn(data, sch)
    x = torch.tensor([[0.1, -0.2], [0.5, 0.3]], dtype=DT)
    for t in (0.05, 0.5):
        alpha, sigma = (float(v) for v in sch.alpha_sigma(torch.tensor(t, dtype=DT)))
        tt = torch.full((2,), t, dtype=DT)
        J = torch.autograd.functional.jacobian(lambda z: eps(z, tt), x)  # (2, 2, 2, 2): [b, i, b', j]
        w = torch.softmax(-torch.cdist(x, alpha * data) ** 2 / (2 * sigma**2), dim=1)
        mean = w @ data
        for b in range(2):
            c = data - mean[b]
            cov = (w[b, :, None] * c).T @ c
            ref = (torch.eye(2, dtype=DT) - alpha**2 / sigma**2 * cov) / sigma
            assert torch.allclose(J[b, :, b, :], ref, atol=1e-9)
            assert torch.allclose(x[b] - sigma * eps(x, tt)[b], alpha * mean[b], atol=1e-12)  # the Tweedie mean


def test_each_part_changes_only_its_own_source():
    """With an exact behaviour model the moments part is the approximation part (Gaussian estimators: the
    same eps*), and with the true reward as the critic the critic part is the moments part (every row)."""
    sch = VPSchedule()
    cfg = _cfg(estimators=("tweedie-first", "tweedie-sampled", "gaussian-fit-second", "none", "particles-K8",
                           "mixture-first-K8-silverman"))
    task = toy.get_task("2spirals")
    ref = B.reference(task, cfg, sch)
    exact_model = DiffusionModel(_ExactNet(ref.data, sch), sch)
    approx = B.approximation_part(task, cfg, ref)
    moments = B.moments_part(task, exact_model, cfg, ref)
    critic = B.critic_part(task, exact_model, _RewardNet(task), cfg, ref)
    for key, v in approx.items():
        if not key[0].startswith(("particles", "mixture")):  # their support: data vs sampler output
            assert abs(moments[key] - v) < 1e-9, (key, moments[key], v)
        assert abs(critic[key] - moments[key]) < 1e-9, (key, critic[key], moments[key])
    assert approx[("tweedie-sampled", 0.5)] != approx[("tweedie-first", 0.5)]


def test_budget_with_small_trained_models_is_finite_and_written_deterministically(tmp_path):
    cfg = _cfg(behaviour=BehaviourConfig(steps=60, batch=128, lr=2e-3, hidden=32, blocks=1),
               critic=CriticConfig(kind="regression", steps=60, batch=128, lr=2e-3, hidden=32, depth=2,
                                   activation="silu"),
               estimators=("tweedie-first", "isotropic-sampled", "gaussian-fit-sampled", "particles-K8",
                           "particles-all", "mixture-first-K8-silverman"), support_k=(8, 0))
    store = StageStore(tmp_path / "store", keyed=True)
    rows = B.run_budget(cfg, out_dir=tmp_path / "a", store=store, progress=False)
    assert len(rows) == len(cfg.estimators) * len(cfg.times)
    for r in rows:
        for p in (*B.PARTS, "spread"):
            assert r[p] == r[p] and 0 <= r[p] < 1e3, r
        if r["estimator"] == "particles-all":
            assert r["approximation"] < 1e-9
    # the models come from the stage cache the second time: the same numbers and the same bytes
    rows2 = B.run_budget(cfg, out_dir=tmp_path / "b", store=store, progress=False)
    assert rows2 == rows
    for name in ("toy2d_budget.csv", "toy2d_budget.md", "toy2d_budget.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    text = (tmp_path / "a" / "toy2d_budget.md").read_text()
    assert "### critic" in text and "particles-K8" in text
    # the table and figure are rebuilt from the CSV alone (what `aepo-lite figures` runs)
    assert B.read_budget(tmp_path / "a" / "toy2d_budget.csv")[0]["beta"] == cfg.beta
    (tmp_path / "c").mkdir()
    B.render(tmp_path / "a" / "toy2d_budget.csv", tmp_path / "c")
    for name in ("toy2d_budget.md", "toy2d_budget.png"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    with pytest.raises(FileNotFoundError, match="csv_path"):
        B.read_budget(tmp_path / "nope.csv")


def test_budget_config_rejects_bad_values():
    with pytest.raises(ValueError, match="estimators"):
        _cfg(estimators=("tweedie-third",))
    with pytest.raises(ValueError, match="support_k"):
        _cfg(support_k=(-1,))
    with pytest.raises(ValueError, match="bandwidths"):
        _cfg(bandwidths=(-0.1,))
    with pytest.raises(ValueError, match="times"):
        _cfg(times=(1.5,))
    with pytest.raises(ValueError, match="task"):
        _cfg(tasks=("spiral",))


def test_toy_budget_script_passes_its_sizes_and_refuses_bad_counts(monkeypatch, capsys):
    mod = load_script("toy_budget")
    got = {}
    monkeypatch.setattr(mod, "run_budget", lambda cfg, **kw: got.update(cfg=cfg, **kw))
    assert mod.main(["--tasks", "moons", "--n-ref-data", "10000", "--grid-size", "24", "--behaviour-steps", "1500",
                     "--critic-steps", "777", "--out-dir", "somewhere", "--cache", "cache"]) == 0
    cfg = got["cfg"]
    assert (cfg.tasks, cfg.n_ref_data, cfg.grid_size, cfg.behaviour.steps, cfg.critic.steps) == (
        ("moons",), 10000, 24, 1500, 777)
    assert cfg.critic.kind == "regression" and cfg.critic.hidden == B.BudgetConfig().critic.hidden
    assert got["out_dir"] == "somewhere" and str(got["store"].root) == "cache"
    for bad, name in ((["--critic-steps", "0"], "--critic-steps"), (["--tasks", "nope"], "nope")):
        with pytest.raises(SystemExit):
            mod.main(bad)
        assert name in capsys.readouterr().err
