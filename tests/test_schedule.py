import math

import pytest
import torch

from aepo_lite.core.schedule import VPSchedule

DT = torch.float64


def test_schedule_matches_method_md(schedule):
    t = torch.linspace(schedule.t_min, 1.0, 101, dtype=DT)
    # log alpha_t = -(t^2/4)(b1 - b0) - (t/2) b0, written out independently
    ref = torch.tensor([-(x * x / 4) * (20 - 0.1) - (x / 2) * 0.1 for x in t.tolist()], dtype=DT)
    assert torch.allclose(schedule.log_alpha(t), ref, atol=0, rtol=1e-14)
    a, s = schedule.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-15)
    assert torch.allclose(s, torch.sqrt(1 - torch.exp(2 * ref)), rtol=1e-10)
    lam = schedule.lambda_(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    assert torch.allclose(lam, torch.log(a / s), rtol=1e-12)


def test_t_of_lambda_inverts(schedule):
    t = torch.linspace(schedule.t_min, 1.0, 57, dtype=DT)
    assert torch.allclose(schedule.t_of_lambda(schedule.lambda_(t)), t, rtol=1e-10, atol=1e-13)
    grid = schedule.lambda_grid(15)
    assert grid[0] == 1.0 and grid[-1] == pytest.approx(schedule.t_min)
    steps = schedule.lambda_(grid).diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-8), "grid must be uniform in lambda"


def test_sample_t_and_diffuse_moments(schedule):
    gen = torch.Generator().manual_seed(0)
    t = schedule.sample_t(200_000, generator=gen, dtype=DT)
    assert float(t.min()) >= schedule.t_min and float(t.max()) <= schedule.t_max
    assert abs(float(t.mean()) - (schedule.t_min + 1) / 2) < 4 * math.sqrt(1 / 12 / 200_000)
    # a_t = alpha a0 + sigma eps with a0 = 0.7: mean alpha * 0.7, variance sigma^2
    tt = torch.full((200_000,), 0.4, dtype=DT)
    a_t, _ = schedule.diffuse(torch.full((200_000, 1), 0.7, dtype=DT), tt, generator=gen)
    a, s = (float(v) for v in schedule.alpha_sigma(torch.tensor(0.4, dtype=DT)))
    se = s / math.sqrt(200_000)
    assert abs(float(a_t.mean()) - 0.7 * a) < 4 * se
    assert abs(float(a_t.var()) - s**2) < 4 * s**2 * math.sqrt(2 / 200_000)


@pytest.mark.parametrize("kwargs, word", [(dict(b0=-1.0), "b0"), (dict(b1=0.05), "b1"), (dict(t_min=0.0), "t_min"),
                                          (dict(t_min=float("nan")), "t_min")])
def test_bad_schedule(kwargs, word):
    with pytest.raises(ValueError, match=word):
        VPSchedule(**kwargs)


def test_check_t_rejects_outside(schedule):
    with pytest.raises(ValueError, match=r"t: expected diffusion times in \[t_min"):
        schedule.check_t(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t"):
        schedule.check_t(torch.tensor([1e-5]))
    with pytest.raises(ValueError, match="finite"):
        schedule.check_t(torch.tensor([float("nan")]))
