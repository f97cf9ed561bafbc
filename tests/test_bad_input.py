"""Bad input gets a ValueError naming the argument and what was expected; a non-finite target
or loss is caught where it appears."""
import pytest
import torch

from aepo_lite.core import guidance as G
from aepo_lite.config import EnergyConfig
from aepo_lite.core.aepo import EnergyLearner, aepo_target
from aepo_lite.core.nets import EnergyNet

from conftest import DT, make_problem


@pytest.fixture
def args(schedule):
    p = make_problem(2, seed=0)
    return dict(a_t=torch.zeros(3, 2, dtype=DT), m=p["m"], S=p["S"], c=0.0, g=p["g"], H=p["H"], beta=1.0,
                alpha=0.8, sigma=0.6)


def _call(fn, args, **over):
    kw = dict(args, **over)
    return fn(kw["a_t"], kw["m"], kw["S"], kw["c"], kw["g"], kw["H"], kw["beta"], kw["alpha"], kw["sigma"])


@pytest.mark.parametrize("fn", [G.gaussian_intermediate_energy, G.gaussian_intermediate_energy_grad,
                                G.gaussian_intermediate_energy_marginal])
@pytest.mark.parametrize("over, pattern", [
    (dict(a_t=torch.zeros(3, 3, dtype=DT)), r"m: expected shape \(3,\)"),
    (dict(a_t=torch.zeros(3, dtype=DT)), r"a_t: expected 2 dimension"),
    (dict(a_t=torch.full((3, 2), float("nan"), dtype=DT)), r"a_t: expected finite"),
    (dict(S=-torch.eye(2, dtype=DT)), r"S: expected a positive definite"),
    (dict(S=torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DT)), r"S: expected a symmetric"),
    (dict(S=torch.ones(2, 3, dtype=DT)), r"S: expected shape \(2, 2\)"),
    (dict(H=-torch.eye(2, dtype=DT)), r"H: expected a positive semi-definite"),
    (dict(g=torch.zeros(3, dtype=DT)), r"g: expected shape \(2,\)"),
    (dict(beta=-1.0), r"beta: expected a value >= 0"),
    (dict(beta=float("nan")), r"beta: expected a finite"),
    (dict(alpha=0.0), r"alpha: expected a value > 0"),
    (dict(sigma=1.5), r"sigma: expected a value <= 1"),
    (dict(c=float("inf")), r"c: expected a finite"),
    (dict(a_t=[[0.0, 0.0]]), r"a_t: expected a torch.Tensor"),
])
def test_gaussian_functions_reject(fn, args, over, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(fn, args, **over)


def test_aepo_target_rejects(schedule):
    q = lambda s, a: a.sum(-1)  # noqa: E731
    eps = lambda x, t, s: x  # noqa: E731
    a = torch.zeros(4, 2)
    ok = dict(eps_fn=eps, q_fn=q, schedule=schedule, beta=1.0)
    with pytest.raises(ValueError, match=r"t: expected diffusion times in \[t_min=0.001, t_max=1\]"):
        aepo_target(a, torch.full((4,), 1.5), None, **ok)
    with pytest.raises(ValueError, match=r"t: expected diffusion times"):
        aepo_target(a, torch.full((4,), 0.0), None, **ok)
    with pytest.raises(ValueError, match=r"t: expected shape \(4,\)"):
        aepo_target(a, torch.full((3,), 0.5), None, **ok)
    with pytest.raises(ValueError, match="covariance"):
        aepo_target(a, torch.full((4,), 0.5), None, covariance="full", **ok)
    with pytest.raises(ValueError, match="expansion"):
        aepo_target(a, torch.full((4,), 0.5), None, expansion="third", **ok)
    with pytest.raises(ValueError, match="beta"):
        aepo_target(a, torch.full((4,), 0.5), None, **dict(ok, beta=-2.0))
    with pytest.raises(ValueError, match="s: expected 4 rows"):
        aepo_target(a, torch.full((4,), 0.5), torch.zeros(5, 3), **ok)
    with pytest.raises(ValueError, match="eps_table"):
        aepo_target(a, torch.full((4,), 0.5), None, covariance="isotropic", **ok)
    with pytest.raises(ValueError, match="fit_cov"):
        aepo_target(a, torch.full((4,), 0.5), None, covariance="gaussian-fit", **ok)


def test_non_finite_target_is_caught_where_it_appears(schedule):
    q_nan = lambda s, a: a.sum(-1) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="aepo_target_first"):
        aepo_target(torch.zeros(4, 2), torch.full((4,), 0.5), None, eps_fn=lambda x, t, s: x, q_fn=q_nan,
                    schedule=schedule, beta=1.0)
    with pytest.raises(FloatingPointError, match="cep_loss"):
        G.cep_loss(torch.full((2, 4), float("nan")), torch.zeros(2, 4), 1.0)
    with pytest.raises(FloatingPointError, match="energy_regression_loss"):
        G.energy_regression_loss(torch.tensor([float("inf")]), torch.tensor([0.0]))


def test_energy_learner_rejects_bad_config(schedule):
    f = EnergyNet(2, 0, hidden=8)
    with pytest.raises(ValueError, match="method"):
        EnergyLearner(f, EnergyConfig(), schedule=schedule, method="dpo")
    with pytest.raises(ValueError, match="beta"):
        EnergyLearner(f, EnergyConfig(beta=-1.0), schedule=schedule, eps_fn=lambda x, t, s: x, q_fn=lambda s, a: a[:, 0])
    with pytest.raises(ValueError, match="q_fn"):
        EnergyLearner(f, EnergyConfig(), schedule=schedule, method="mse")
    with pytest.raises(ValueError, match="eps_fn"):
        EnergyLearner(f, EnergyConfig(posterior="gaussian", centered=False), schedule=schedule, method="aepo", q_fn=lambda s, a: a[:, 0])
    with pytest.raises(ValueError, match="cep_loss"):
        G.cep_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize("method", ["aepo", "mse", "qgpo"])
def test_energy_learner_update_returns_finite_floats(method, schedule):
    torch.manual_seed(0)
    f = EnergyNet(2, 0, hidden=16)
    learner = EnergyLearner(f, EnergyConfig(beta=2.0, posterior="gaussian", centered=False), schedule=schedule, method=method,
                            eps_fn=lambda x, t, s: G.gaussian_eps(x, t, torch.zeros(2), 0.3 * torch.eye(2), schedule),
                            q_fn=lambda s, a: -(a**2).sum(-1))
    batch = {"a": torch.rand(32, 2) * 2 - 1, "s": None,
             "support": torch.rand(8, 4, 2) * 2 - 1, "support_q": torch.randn(8, 4)}
    losses = [learner.update(batch)["energy_loss"] for _ in range(30)]
    assert all(isinstance(v, float) and v == v for v in losses)
    assert losses[-1] < losses[0]
