"""Every guidance function against an independent reference: a different closed form (float64)
or Monte Carlo with >= 1e6 samples, in dimensions 1, 2 and 6, at t near 0, in the middle and at 1."""
import math

import numpy as np
import pytest
import torch

from aepo_lite.core import guidance as G
from aepo_lite.core.aepo import EpsNormTable, aepo_target

from conftest import DIMS, DT, TIMES, make_problem

N_MC = 1_000_000


def _ab(schedule, t):
    a, s = schedule.alpha_sigma(torch.tensor(t, dtype=DT))
    return float(a), float(s)


def _q(p, a):
    """The quadratic critic evaluated directly: c + g^T a - a^T H a / 2."""
    return p["c"] + a @ p["g"] - 0.5 * ((a @ p["H"]) * a).sum(-1)


def _points(d, n=4, seed=1):
    return 0.8 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_two_routes_of_3b_agree(d, t, schedule):
    p = make_problem(d, seed=d)
    al, si = _ab(schedule, t)
    a_t = _points(d, 16)
    e1 = G.gaussian_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], 2.5, al, si)
    e2 = G.gaussian_intermediate_energy_marginal(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], 2.5, al, si)
    assert e1.shape == (16,) and e1.dtype == DT
    assert float((e1 - e2).abs().max()) < 1e-9


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_posterior_matches_precision_form(d, t, schedule):
    """S~ = (S^-1 + alpha^2/sigma^2 I)^-1, m~ = S~ (S^-1 m + alpha/sigma^2 a_t): docs/derivation.md's other form."""
    p = make_problem(d, seed=10 + d)
    al, si = _ab(schedule, t)
    a_t = _points(d)
    m_t, S_t = G.gaussian_posterior(a_t, p["m"], p["S"], al, si)
    Si = torch.linalg.inv(p["S"])
    S_ref = torch.linalg.inv(Si + (al**2 / si**2) * torch.eye(d, dtype=DT))
    m_ref = (S_ref @ (Si @ p["m"][:, None] + (al / si**2) * a_t.T)).T
    assert torch.allclose(S_t, S_ref, rtol=1e-7, atol=1e-12)
    assert torch.allclose(m_t, m_ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_energy_matches_monte_carlo_over_posterior(d, t, schedule):
    """E_t = log E_{N(m~, S~)} exp(beta Q): Monte Carlo with 1e6 posterior samples per point."""
    p = make_problem(d, seed=20 + d)
    al, si = _ab(schedule, t)
    beta = 1.5
    a_t = _points(d, 3, seed=2)
    closed = G.gaussian_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], beta, al, si)
    m_t, S_t = G.gaussian_posterior(a_t, p["m"], p["S"], al, si)
    L = torch.linalg.cholesky(S_t + 1e-300 * torch.eye(d, dtype=DT))
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        x = m_t[i] + torch.randn(N_MC, d, generator=gen, dtype=DT) @ L.T
        logw = beta * _q(p, x)
        est = float(torch.logsumexp(logw, 0) - math.log(N_MC))
        w = torch.exp(logw - logw.max())
        se = float(w.std() / w.mean()) / math.sqrt(N_MC)  # delta-method SE of log mean
        assert abs(est - float(closed[i])) < 5 * se + 1e-12, (est, float(closed[i]), se)


@pytest.mark.parametrize("d", DIMS)
def test_target_policy_matches_importance_sampling(d):
    p = make_problem(d, seed=30 + d)
    beta = 2.0
    m_pi, S_pi = G.gaussian_target_policy(p["m"], p["S"], p["g"], p["H"], beta)
    gen = torch.Generator().manual_seed(4)
    x = p["m"] + torch.randn(N_MC, d, generator=gen, dtype=DT) @ torch.linalg.cholesky(p["S"]).T
    logw = beta * _q(p, x)
    w = torch.softmax(logw, 0)
    ess = float(1 / (w**2).sum())
    mean = w @ x
    cov = (x - mean).T @ ((x - mean) * w[:, None])
    se_m = (S_pi.diagonal() / ess).sqrt()
    assert torch.all((mean - m_pi).abs() < 5 * se_m)
    se_c = ((S_pi**2 + S_pi.diagonal()[:, None] * S_pi.diagonal()[None]) / ess).sqrt()
    assert torch.all((cov - S_pi).abs() < 5 * se_c)
    # the linear critic's closed form: pi = N(m + beta S g, S)
    m_lin, S_lin = G.gaussian_target_policy(p["m"], p["S"], p["g"], None, beta)
    assert torch.allclose(m_lin, p["m"] + beta * p["S"] @ p["g"]) and torch.equal(S_lin, p["S"])


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_energy_gradient_matches_finite_differences_and_autograd(d, t, schedule):
    p = make_problem(d, seed=40 + d)
    al, si = _ab(schedule, t)
    a_t = _points(d, 5)
    args = (p["m"], p["S"], p["c"], p["g"], p["H"], 1.7, al, si)
    grad = G.gaussian_intermediate_energy_grad(a_t, *args)
    x = a_t.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(G.gaussian_intermediate_energy(x, *args).sum(), x)
    assert torch.allclose(grad, auto, rtol=1e-8, atol=1e-8)
    h = 1e-5
    fd = torch.stack([(G.gaussian_intermediate_energy_marginal(a_t + h * e, *args)
                       - G.gaussian_intermediate_energy_marginal(a_t - h * e, *args)) / (2 * h)
                      for e in torch.eye(d, dtype=DT)], dim=1)
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_linear_critic_closed_form_3a(d, t, schedule):
    p = make_problem(d, seed=50 + d)
    al, si = _ab(schedule, t)
    a_t = _points(d)
    beta = 3.0
    e = G.linear_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], beta, al, si)
    ref = G.gaussian_intermediate_energy_marginal(a_t, p["m"], p["S"], p["c"], p["g"], 0 * p["H"], beta, al, si)
    assert float((e - ref).abs().max()) < 1e-9
    grad = G.linear_intermediate_energy_grad(a_t, p["m"], p["S"], p["c"], p["g"], beta, al, si)
    ref_g = G.gaussian_intermediate_energy_grad(a_t, p["m"], p["S"], p["c"], p["g"], 0 * p["H"], beta, al, si)
    assert torch.allclose(grad, ref_g, rtol=1e-8, atol=1e-10)
    assert torch.allclose(grad, grad[:1].expand_as(grad)), "a linear critic's guidance is a constant field"


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_jensen_mse_target_below_energy(d, t, schedule):
    """E[beta Q | a_t] (what MSE regression learns) <= E_t, strictly when the posterior has spread."""
    p = make_problem(d, seed=60 + d)
    al, si = _ab(schedule, t)
    a_t = _points(d, 8)
    beta = 2.0
    E = G.gaussian_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], beta, al, si)
    m_t, S_t = G.gaussian_posterior(a_t, p["m"], p["S"], al, si)
    mse_target = beta * (_q(p, m_t) - 0.5 * torch.trace(p["H"] @ S_t))  # E[beta Q(a0)|a_t], closed form
    assert torch.all(mse_target < E)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_aepo_targets_exact_for_gaussian_behaviour(d, t, schedule):
    """With the exact Gaussian eps, Tweedie gives the exact posterior: first order is exact for a
    linear Q, second order for a quadratic Q; every covariance option recovers S~."""
    p = make_problem(d, seed=70 + d)
    al, si = _ab(schedule, t)
    B = 6
    a_t = _points(d, B)
    tt = torch.full((B,), t, dtype=DT)
    beta = 2.0
    eps_fn = lambda x, tv, s: G.gaussian_eps(x, tv, p["m"], p["S"], schedule)  # noqa: E731
    q_lin = lambda s, a: p["c"] + a @ p["g"]  # noqa: E731
    q_quad = lambda s, a: _q(p, a)  # noqa: E731
    kw = dict(eps_fn=eps_fn, schedule=schedule, beta=beta, clip=None)
    E_lin = G.linear_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], beta, al, si)
    E_quad = G.gaussian_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], beta, al, si)
    tol = 1e-9 * max(1.0, float(E_quad.abs().max()))
    y1 = aepo_target(a_t, tt, None, q_fn=q_lin, expansion="first", **kw)
    assert float((y1 - E_lin).abs().max()) < tol
    y2 = aepo_target(a_t, tt, None, q_fn=q_quad, expansion="second", **kw)
    assert float((y2 - E_quad).abs().max()) < tol
    y3 = aepo_target(a_t, tt, None, q_fn=q_quad, expansion="second", covariance="gaussian-fit", fit_cov=p["S"], **kw)
    assert float((y3 - E_quad).abs().max()) < tol
    # `none`: the target collapses to beta Q(a0_hat), a0_hat = posterior mean; below E_t (Jensen)
    m_t, S_t = G.gaussian_posterior(a_t, p["m"], p["S"], al, si)
    y0 = aepo_target(a_t, tt, None, q_fn=q_lin, covariance="none", **kw)
    assert torch.allclose(y0, beta * q_lin(None, m_t), rtol=1e-9, atol=1e-9)
    assert torch.all(y0 <= E_lin + 1e-12)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", TIMES)
def test_covariance_estimators_recover_posterior(d, t, schedule):
    p = make_problem(d, seed=80 + d)
    al, si = _ab(schedule, t)
    a_t = _points(d, 5)
    tt = torch.full((5,), t, dtype=DT)
    m_t, S_t = G.gaussian_posterior(a_t, p["m"], p["S"], al, si)
    # Tweedie mean and covariance from the exact eps and its exact Jacobian
    eps = G.gaussian_eps(a_t, tt, p["m"], p["S"], schedule)
    assert torch.allclose(G.tweedie_mean(a_t, eps, al, si, clip=None), m_t, rtol=1e-8, atol=1e-8)
    M = al**2 * p["S"] + si**2 * torch.eye(d, dtype=DT)
    J = (si * torch.linalg.inv(M)).expand(5, d, d)  # d eps*/d a_t
    S_tw = G.tweedie_covariance(J, al, si)
    assert torch.allclose(S_tw, S_t.expand(5, d, d), rtol=1e-7, atol=1e-12)
    S_fit = G.gaussian_fit_covariance(p["S"], torch.full((5,), al, dtype=DT), torch.full((5,), si, dtype=DT))
    assert torch.allclose(S_fit, S_t.expand(5, d, d), rtol=1e-7, atol=1e-12)
    # isotropic: exact when S = s^2 I, with E||eps*||^2 = sigma^2 tr(M^-1)
    s2 = 0.2
    Si = s2 * torch.eye(d, dtype=DT)
    Mi = al**2 * Si + si**2 * torch.eye(d, dtype=DT)
    e2 = si**2 * float(torch.trace(torch.linalg.inv(Mi)))
    iso = G.isotropic_covariance(e2, al, si, d, batch=5, like=a_t)
    _, S_iso = G.gaussian_posterior(a_t, 0 * p["m"], Si, al, si)
    assert torch.allclose(iso, S_iso.expand(5, d, d), rtol=1e-8, atol=1e-14)


def test_tweedie_covariance_is_clipped_psd():
    J = torch.tensor([[[5.0, 0.0], [0.0, -5.0]]], dtype=DT)  # would give a negative and a too-large variance
    S_hat = G.tweedie_covariance(J, 0.8, 0.6)
    ev = torch.linalg.eigvalsh(S_hat[0])
    assert float(ev.min()) >= 0.0 and float(ev.max()) == pytest.approx(0.6**2 / 0.8**2)
    # the box bound: no distribution on [-c, c] has variance above c^2
    J0 = torch.zeros(1, 2, 2, dtype=DT)
    assert float(torch.linalg.eigvalsh(G.tweedie_covariance(J0, 0.1, 0.995, max_var=0.25)[0]).max()) == pytest.approx(0.25)


def test_eps_norm_table_matches_closed_form(schedule):
    d = 2
    p = make_problem(d, seed=90)
    gen = torch.Generator().manual_seed(5)
    a0 = p["m"] + torch.randn(200_000, d, generator=gen, dtype=DT) @ torch.linalg.cholesky(p["S"]).T
    eps_fn = lambda x, tv, s: G.gaussian_eps(x, tv, p["m"], p["S"], schedule)  # noqa: E731
    table = EpsNormTable.estimate(eps_fn, a0, None, schedule, n_grid=32, generator=gen)
    for t in (0.01, 0.05, 0.3, 0.9):
        al, si = _ab(schedule, t)
        M = al**2 * p["S"] + si**2 * torch.eye(d, dtype=DT)
        ref = si**2 * float(torch.trace(torch.linalg.inv(M)))
        # log-linear interpolation in log-SNR over a 32-point grid + MC error: 2% is real but fair
        assert abs(float(table(torch.tensor([t], dtype=DT))) - ref) < 0.02 * ref


def test_sampled_target_converges_to_energy(schedule):
    d, t = 2, 0.5
    p = make_problem(d, seed=91)
    al, si = _ab(schedule, t)
    a_t = _points(d, 4)
    tt = torch.full((4,), t, dtype=DT)
    E = G.gaussian_intermediate_energy(a_t, p["m"], p["S"], p["c"], p["g"], p["H"], 1.0, al, si)
    eps_fn = lambda x, tv, s: G.gaussian_eps(x, tv, p["m"], p["S"], schedule)  # noqa: E731
    y = aepo_target(a_t, tt, None, eps_fn=eps_fn, q_fn=lambda s, a: _q(p, a), schedule=schedule, beta=1.0,
                    clip=None, expansion="sampled", n_samples=100_000, generator=torch.Generator().manual_seed(6))
    assert float((y - E).abs().max()) < 0.02


def test_log_expectation_matches_monte_carlo():
    d = 3
    p = make_problem(d, seed=92)
    mean = torch.tensor([[0.1, -0.2, 0.3]], dtype=DT)
    b, A = 1.3 * p["g"], 0.7 * p["H"]
    closed = float(G.gaussian_log_expectation(mean, p["S"], b, A))
    x = mean + torch.randn(N_MC, d, generator=torch.Generator().manual_seed(7), dtype=DT) @ torch.linalg.cholesky(p["S"]).T
    logw = x @ b - 0.5 * ((x @ A) * x).sum(-1)
    est = float(torch.logsumexp(logw, 0) - math.log(N_MC))
    w = torch.exp(logw - logw.max())
    assert abs(est - closed) < 5 * float(w.std() / w.mean()) / math.sqrt(N_MC)
    # a singular covariance (zero spread) gives exactly the integrand at the mean
    zero = G.gaussian_log_expectation(mean, torch.zeros(d, d, dtype=DT), b, A)
    assert torch.allclose(zero, mean @ b - 0.5 * ((mean @ A) * mean).sum(-1))


def test_cep_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    f, q = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    beta = 3.0
    w = np.exp(beta * q - (beta * q).max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    logp = f - f.max(1, keepdims=True) - np.log(np.exp(f - f.max(1, keepdims=True)).sum(1, keepdims=True))
    ref = -(w * logp).sum(1).mean()
    got = G.cep_loss(torch.tensor(f), torch.tensor(q), beta)
    assert abs(float(got) - ref) < 1e-12
    # minimiser: f = beta q + const per state (zero gradient there)
    fq = (beta * torch.tensor(q) + torch.randn(5, 1, dtype=DT)).requires_grad_(True)
    (gr,) = torch.autograd.grad(G.cep_loss(fq, torch.tensor(q), beta), fq)
    assert float(gr.abs().max()) < 1e-12


def test_mse_and_regression_losses():
    f, q, y = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0])
    assert float(G.mse_energy_loss(f, q, 2.0)) == pytest.approx(((1 - 1) ** 2 + (2 - 2) ** 2) / 2)
    assert float(G.energy_regression_loss(f, y)) == pytest.approx((1 + 1) / 2)
