"""The guidance maths of docs/derivation.md sections 2-5 (and our section 4b), as pure functions of tensors.

Notation follows docs/derivation.md: behaviour mu(a|s) = N(m, S) in the Gaussian sections, critic
Q(a) = c + g^T a - a^T H a / 2, target pi ∝ mu exp(beta Q), VP marginal a_t = alpha a_0 + sigma eps,
posterior mu_{0t}(a_0|a_t) = N(m~, S~), intermediate energy
E_t(a_t) = log E_{a_0 ~ mu_{0t}(.|a_t)} exp(beta Q(a_0)).

Shapes: a_t (B, d), m (d,), S (d, d), g (d,), H (d, d); alpha, sigma, beta, c are floats.
Every function works in the dtype of its inputs (float64 for the exactness checks) and on any
device. Batched AEPO estimators take per-sample g (B, d), H (B, d, d) and S_hat (B, d, d).
The in-support estimators of section 4b take K support actions per row, m_k (B, K, d).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from aepo_lite._checks import check_finite, check_positive_definite, check_scalar, check_tensor

__all__ = [
    # Gaussian closed forms (docs/derivation.md section 3)
    "mvn_log_prob", "gaussian_marginal", "gaussian_posterior", "gaussian_target_policy",
    "gaussian_log_expectation", "linear_intermediate_energy", "linear_intermediate_energy_grad",
    "gaussian_intermediate_energy", "gaussian_intermediate_energy_marginal",
    "gaussian_intermediate_energy_grad", "gaussian_eps",
    # AEPO's target (docs/derivation.md section 4)
    "tweedie_mean", "tweedie_covariance", "isotropic_covariance", "gaussian_fit_covariance",
    "psd_project", "jacobi_eigh", "aepo_target_first", "aepo_target_second", "aepo_target_sampled",
    "COVARIANCES", "EXPANSIONS",
    # in-support targets (docs/derivation.md section 4b, ours)
    "mixture_posterior", "particle_target", "mixture_target_first", "POSTERIORS",
    # losses (docs/derivation.md sections 4-5)
    "energy_regression_loss", "mse_energy_loss", "cep_loss",
]

COVARIANCES = ("tweedie", "isotropic", "gaussian-fit", "none")
EXPANSIONS = ("first", "second", "sampled")
POSTERIORS = ("gaussian", "mixture", "particles")  # gaussian: section 4 (COVARIANCES x EXPANSIONS); the others: 4b
GROUP_FITS = ("squared", "softmax")  # how the centered in-support targets are fitted (EnergyConfig.fit, ours)


# ----------------------------------------------------------------------------- validation
def _gaussian_args(a_t, m, S, alpha, sigma):
    check_tensor("a_t", a_t, ndim=2)
    check_finite("a_t", a_t)
    d = a_t.shape[1]
    check_tensor("m", m, shape=(d,))
    check_finite("m", m)
    check_tensor("S", S, shape=(d, d))
    check_positive_definite("S", S)
    alpha = check_scalar("alpha", alpha, low=0.0, high=1.0, low_open=True)
    sigma = check_scalar("sigma", sigma, low=0.0, high=1.0)
    return d, alpha, sigma


def _critic_args(d, c, g, H, beta, H_required=True):
    c = check_scalar("c", c)
    check_tensor("g", g, shape=(d,))
    check_finite("g", g)
    if H is not None or H_required:
        check_tensor("H", H, shape=(d, d))
        check_positive_definite("H", H, semi=True)
    beta = check_scalar("beta", beta, low=0.0)
    return c, beta


def _eye(d, like):
    return torch.eye(d, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- Gaussian closed forms
def mvn_log_prob(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov): x (B, d), mean (d,), cov (d, d) -> (B,)."""
    L = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(L, (x - mean).T, upper=False)  # (d, B)
    maha = (z**2).sum(0)
    logdet = 2 * torch.log(torch.diagonal(L)).sum()
    return -0.5 * (maha + logdet + x.shape[-1] * math.log(2 * math.pi))


def gaussian_marginal(m: torch.Tensor, S: torch.Tensor, alpha: float, sigma: float):
    """mu_t for mu = N(m, S): returns (alpha m (d,), alpha^2 S + sigma^2 I (d, d))."""
    return alpha * m, alpha**2 * S + sigma**2 * _eye(S.shape[0], S)


def gaussian_posterior(a_t: torch.Tensor, m: torch.Tensor, S: torch.Tensor, alpha: float, sigma: float):
    """Posterior mu_{0t}(a_0 | a_t) = N(m~, S~) for mu = N(m, S) (docs/derivation.md section 3).

        S~ = S - alpha^2 S (alpha^2 S + sigma^2 I)^-1 S
        m~ = m + alpha S (alpha^2 S + sigma^2 I)^-1 (a_t - alpha m)

    Returns (m~ (B, d), S~ (d, d)).
    """
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    M = alpha**2 * S + sigma**2 * _eye(d, S)
    K = alpha * torch.linalg.solve(M, S).T  # alpha S M^-1  (S, M symmetric)
    S_t = S - alpha * K @ S
    S_t = 0.5 * (S_t + S_t.T)
    m_t = m + (a_t - alpha * m) @ K.T
    return m_t, S_t


def gaussian_eps(a_t: torch.Tensor, t: torch.Tensor, m: torch.Tensor, S: torch.Tensor, schedule) -> torch.Tensor:
    """The exact noise prediction of a Gaussian behaviour N(m, S): a_t (B, d), t (B,) -> (B, d).

        eps*(a_t) = sigma_t (alpha_t^2 S + sigma_t^2 I)^-1 (a_t - alpha_t m)

    Use it as ``eps_fn`` to test samplers and estimators with no learning error.
    """
    alpha, sigma = schedule.alpha_sigma(t)
    d = a_t.shape[1]
    r = a_t - alpha[:, None] * m
    if bool((t == t[0]).all()):  # one time for the whole batch (a sampler step): one solve
        M = alpha[0] ** 2 * S + sigma[0] ** 2 * _eye(d, S)
        return sigma[0] * torch.linalg.solve(M, r.T).T
    M = alpha[:, None, None] ** 2 * S + sigma[:, None, None] ** 2 * _eye(d, S)
    return sigma[:, None] * torch.linalg.solve(M, r.unsqueeze(-1)).squeeze(-1)


def gaussian_target_policy(m: torch.Tensor, S: torch.Tensor, g: torch.Tensor, H: torch.Tensor | None, beta: float):
    """pi ∝ N(m, S) exp(beta Q) for Q = c + g^T a - a^T H a / 2 (docs/derivation.md 3a/3b).

        S_pi = (S^-1 + beta H)^-1,   m_pi = S_pi (S^-1 m + beta g)

    Returns (m_pi (d,), S_pi (d, d)). ``H=None`` is the linear critic: pi = N(m + beta S g, S).
    """
    d = m.shape[0]
    check_tensor("S", S, shape=(d, d))
    check_positive_definite("S", S)
    check_tensor("g", g, shape=(d,))
    beta = check_scalar("beta", beta, low=0.0)
    if H is None:
        return m + beta * S @ g, S.clone()
    check_positive_definite("H", H, semi=True)
    # S_pi = (I + beta S H)^-1 S, computed without inverting S
    A = _eye(d, S) + beta * S @ H
    S_pi = torch.linalg.solve(A, S)
    S_pi = 0.5 * (S_pi + S_pi.T)
    m_pi = torch.linalg.solve(A, m + beta * S @ g)
    return m_pi, S_pi


def gaussian_log_expectation(mean: torch.Tensor, cov: torch.Tensor, b: torch.Tensor,
                             A: torch.Tensor | None = None, *, sync_free: bool = False) -> torch.Tensor:
    """log E[exp(b^T x - x^T A x / 2)] for x ~ N(mean, cov), A PSD.

    mean (B, d); cov (d, d) or (B, d, d), PSD (singular allowed, e.g. 0); b (d,) or (B, d);
    A (d, d) or (B, d, d) or None (= 0). Returns (B,). With x = mean + u and b' = b - A mean:

        = b^T mean - mean^T A mean / 2 + b'^T (I + cov A)^-1 cov b' / 2 - logdet(I + cov A) / 2,

    which equals docs/derivation.md's det(I + S~A)^(-1/2) exp(...) form but never inverts ``cov``.
    ``sync_free``: the solve without its error check (no host read-back).
    """
    B, d = mean.shape
    b = b.expand(B, d)
    cov = cov.expand(B, d, d)
    lin = (b * mean).sum(-1)
    if A is None:
        return lin + 0.5 * (b.unsqueeze(-2) @ cov @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    A = A.expand(B, d, d)
    Am = (A @ mean.unsqueeze(-1)).squeeze(-1)
    bp = b - Am
    I = _eye(d, mean).expand(B, d, d)
    M = I + cov @ A
    sol = _solve(M, cov @ bp.unsqueeze(-1), sync_free).squeeze(-1)
    logdet = torch.linalg.slogdet(M)[1]
    return lin - 0.5 * (mean * Am).sum(-1) + 0.5 * (bp * sol).sum(-1) - 0.5 * logdet


def linear_intermediate_energy(a_t, m, S, c, g, beta, alpha, sigma) -> torch.Tensor:
    """E_t for a linear critic Q = c + g^T a (docs/derivation.md 3a): (B, d) -> (B,).

        E_t = beta c + beta g^T m~ + (beta^2 / 2) g^T S~ g
    """
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    c, beta = _critic_args(d, c, g, None, beta, H_required=False)
    m_t, S_t = gaussian_posterior(a_t, m, S, alpha, sigma)
    return beta * c + beta * m_t @ g + 0.5 * beta**2 * (g @ S_t @ g)


def linear_intermediate_energy_grad(a_t, m, S, c, g, beta, alpha, sigma) -> torch.Tensor:
    """grad_{a_t} E_t for a linear critic (docs/derivation.md 3a): beta alpha S (alpha^2 S + sigma^2 I)^-1 g, (B, d).

    It does not depend on a_t: the guidance of a linear critic is a constant field per t.
    """
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    c, beta = _critic_args(d, c, g, None, beta, H_required=False)
    M = alpha**2 * S + sigma**2 * _eye(d, S)
    grad = beta * alpha * S @ torch.linalg.solve(M, g)
    return grad.expand(a_t.shape[0], d).clone()


def gaussian_intermediate_energy(a_t, m, S, c, g, H, beta, alpha, sigma) -> torch.Tensor:
    """Exact E_t(a_t) for behaviour N(m, S) and critic Q(a) = c + g^T a - a^T H a / 2. (B, d) -> (B,).

    Route of docs/derivation.md 3b: the Gaussian integral of exp(beta Q) over the posterior N(m~, S~).
    """
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    c, beta = _critic_args(d, c, g, H, beta)
    m_t, S_t = gaussian_posterior(a_t, m, S, alpha, sigma)
    return beta * c + gaussian_log_expectation(m_t, S_t, beta * g, beta * H)


def gaussian_intermediate_energy_marginal(a_t, m, S, c, g, H, beta, alpha, sigma) -> torch.Tensor:
    """The same E_t computed the other way: log pi_t(a_t) - log mu_t(a_t) + log Z. (B, d) -> (B,)."""
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    c, beta = _critic_args(d, c, g, H, beta)
    m_pi, S_pi = gaussian_target_policy(m, S, g, H, beta)
    mean_pi, cov_pi = gaussian_marginal(m_pi, S_pi, alpha, sigma)
    mean_mu, cov_mu = gaussian_marginal(m, S, alpha, sigma)
    log_Z = beta * c + gaussian_log_expectation(m[None], S, beta * g, beta * H)
    return mvn_log_prob(a_t, mean_pi, cov_pi) - mvn_log_prob(a_t, mean_mu, cov_mu) + log_Z


def gaussian_intermediate_energy_grad(a_t, m, S, c, g, H, beta, alpha, sigma) -> torch.Tensor:
    """grad_{a_t} E_t = grad log pi_t - grad log mu_t, (B, d):

        -(alpha^2 S_pi + sigma^2 I)^-1 (a_t - alpha m_pi) + (alpha^2 S + sigma^2 I)^-1 (a_t - alpha m)
    """
    d, alpha, sigma = _gaussian_args(a_t, m, S, alpha, sigma)
    c, beta = _critic_args(d, c, g, H, beta)
    m_pi, S_pi = gaussian_target_policy(m, S, g, H, beta)
    mean_pi, cov_pi = gaussian_marginal(m_pi, S_pi, alpha, sigma)
    mean_mu, cov_mu = gaussian_marginal(m, S, alpha, sigma)
    return (-torch.linalg.solve(cov_pi, (a_t - mean_pi).T).T
            + torch.linalg.solve(cov_mu, (a_t - mean_mu).T).T)


# ----------------------------------------------------------------------------- AEPO's target (section 4)
def _alpha_sigma_b(alpha, sigma, like):
    """alpha, sigma as floats or (B,) tensors -> (B, 1) tensors."""
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return a.reshape(-1, 1).expand(like.shape[0], 1), s.reshape(-1, 1).expand(like.shape[0], 1)


def tweedie_mean(a_t: torch.Tensor, eps: torch.Tensor, alpha, sigma, clip: float | None = 1.0) -> torch.Tensor:
    """Posterior mean a0_hat = (a_t - sigma eps) / alpha, clipped to [-clip, clip]. (B, d) -> (B, d).

    ``alpha``, ``sigma``: floats or (B,) tensors. ``clip=None`` keeps it unclipped (exact for the
    Gaussian checks).
    """
    a, s = _alpha_sigma_b(alpha, sigma, a_t)
    x0 = (a_t - s * eps) / a
    return x0.clamp(-clip, clip) if clip is not None else x0


def tweedie_covariance(jac: torch.Tensor, alpha, sigma, max_var: float | None = None, *,
                       sync_free: bool = False) -> torch.Tensor:
    """Second-order Tweedie: S_hat = (sigma^2 / alpha^2)(I - sigma J), J = d eps / d a_t. (B, d, d) -> (B, d, d).

    J is symmetrised and the eigenvalues of (I - sigma J) are clipped to [0, 1], so S_hat is PSD
    and never larger than the prior-free bound (sigma^2 / alpha^2) I. ``max_var`` further caps the
    eigenvalues of S_hat (e.g. clip^2 for actions in [-clip, clip]: no distribution on that box
    has a larger variance), which matters at large t where sigma^2 / alpha^2 reaches ~2e4.
    ``sync_free``: the eigendecomposition by :func:`jacobi_eigh` (no host read-back: capturable on CUDA).
    """
    check_tensor("jac", jac, ndim=3)
    B, d, _ = jac.shape
    a, s = _alpha_sigma_b(alpha, sigma, jac[:, :, 0])
    Js = 0.5 * (jac + jac.transpose(-1, -2))
    M = _eye(d, jac) - s[:, :, None] * Js
    evals, evecs = _eigh(M, sync_free)
    scale = (s**2 / a**2)  # (B, 1)
    evals = evals.clamp(0.0, 1.0) * scale
    if max_var is not None:
        evals = evals.clamp(max=max_var)
    return evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)


def isotropic_covariance(eps_sq_mean, alpha, sigma, d: int, batch: int | None = None, like=None) -> torch.Tensor:
    """Analytic-DPM posterior covariance r_t^2 I, r_t^2 = (sigma^2/alpha^2)(1 - E||eps_theta||^2 / d).

    ``eps_sq_mean``: E||eps_theta(a_t, t)||^2 at each sample's t, float or (B,). Returns (B, d, d).
    """
    like = like if like is not None else torch.as_tensor(eps_sq_mean, dtype=torch.get_default_dtype())
    e = torch.as_tensor(eps_sq_mean, dtype=like.dtype, device=like.device).reshape(-1)
    B = batch or e.shape[0]
    a, s = _alpha_sigma_b(alpha, sigma, torch.empty(B, 1, dtype=like.dtype, device=like.device))
    r2 = (s**2 / a**2).squeeze(-1) * (1.0 - e.expand(B) / d).clamp(0.0, 1.0)
    return r2[:, None, None] * _eye(d, like)


def gaussian_fit_covariance(S_s: torch.Tensor, alpha, sigma, *, sync_free: bool = False) -> torch.Tensor:
    """Section 3's exact S~ for a behaviour fitted as N(m_s, S_s): (B, d, d) or (d, d) -> (B, d, d).

    ``alpha``, ``sigma``: (B,) tensors (or floats, with S_s batched). ``sync_free``: the solve without its
    error check (no host read-back).
    """
    S_s = S_s if S_s.ndim == 3 else S_s[None]
    d = S_s.shape[-1]
    a, s = _alpha_sigma_b(alpha, sigma, torch.empty(max(S_s.shape[0], torch.as_tensor(alpha).numel()), 1,
                                                     dtype=S_s.dtype, device=S_s.device))
    S_s = S_s.expand(a.shape[0], d, d)
    M = a[:, :, None] ** 2 * S_s + s[:, :, None] ** 2 * _eye(d, S_s)
    S_t = S_s - a[:, :, None] ** 2 * S_s @ _solve(M, S_s, sync_free)
    return 0.5 * (S_t + S_t.transpose(-1, -2))


def psd_project(M: torch.Tensor, *, sync_free: bool = False) -> torch.Tensor:
    """Symmetrise and clip negative eigenvalues to 0: (..., d, d) -> (..., d, d).
    ``sync_free``: by :func:`jacobi_eigh`."""
    Ms = 0.5 * (M + M.transpose(-1, -2))
    evals, evecs = _eigh(Ms, sync_free)
    return evecs @ torch.diag_embed(evals.clamp_min(0.0)) @ evecs.transpose(-1, -2)


def _jacobi_rounds(d: int) -> list[tuple[list[int], list[int]]]:
    """A sweep of the parallel (round-robin) Jacobi order: d - 1 rounds (d if d is odd) of disjoint pairs
    (p < q), every pair once a sweep."""
    n = d + d % 2
    others, rounds = list(range(1, n)), []
    for _ in range(n - 1):
        ring = [0] + others
        pairs = [tuple(sorted((ring[i], ring[n - 1 - i]))) for i in range(n // 2)]
        pairs = [pq for pq in pairs if pq[1] < d]  # the pair with the odd d's stand-in index sits out
        rounds.append(([p for p, _ in pairs], [q for _, q in pairs]))
        others = others[-1:] + others[:-1]
    return rounds


@functools.lru_cache(maxsize=None)
def _round_indices(d: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rounds' index tensors on ``device``, made once (a copy to the device is no graph operation)."""
    return [tuple(torch.tensor(i, device=device) for i in r) for r in _jacobi_rounds(d)] if d > 1 else []


def jacobi_eigh(M: torch.Tensor, sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigendecomposition of symmetric matrices by a fixed number of Jacobi sweeps: (..., d, d) ->
    (eigenvalues (..., d), eigenvectors (..., d, d)), M ~= V diag(w) V^T, in no particular order.

    ``torch.linalg.eigh`` checks its solver's flag on the host, so a CUDA graph cannot hold it; this reads
    nothing back (a fixed sweep count instead of a convergence test), for the small d of action spaces. Each
    round rotates d / 2 disjoint pairs at once (round-robin order): about 34 operators a round, d - 1 rounds a
    sweep (d if d is odd). ``sweeps``: 8 in float32, 12 in float64, 4 more above d = 8 by default (Jacobi converges
    quadratically; the tests check the result against ``eigh`` for d up to 17, repeated eigenvalues included).
    """
    check_tensor("M", M, ndim=None)
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M: expected square matrices (..., d, d), got shape {tuple(M.shape)}")
    d = M.shape[-1]
    sweeps = sweeps if sweeps is not None else (12 if M.dtype == torch.float64 else 8) + 4 * (d > 8)
    A = 0.5 * (M + M.transpose(-1, -2))
    eye = _eye(d, M).expand(A.shape)
    V = eye.clone()
    rounds = _round_indices(d, M.device)
    for _ in range(sweeps if rounds else 0):
        for P, Q in rounds:
            app, aqq, apq = A[..., P, P], A[..., Q, Q], A[..., P, Q]
            zero = apq == 0
            tau = (aqq - app) / (2 * torch.where(zero, torch.ones_like(apq), apq))
            t = torch.where(tau >= 0, 1.0, -1.0).to(M.dtype) / (tau.abs() + torch.sqrt(1 + tau * tau))
            c = torch.rsqrt(1 + t * t).masked_fill(zero, 1.0)
            sn = (t * c).masked_fill(zero, 0.0)
            J = eye.clone()  # the rotations of this round's pairs: J^T A J zeroes A[p, q]
            J[..., P, P], J[..., Q, Q], J[..., P, Q], J[..., Q, P] = c, c, sn, -sn
            A = J.transpose(-1, -2) @ A @ J
            V = V @ J
    return torch.diagonal(A, dim1=-2, dim2=-1), V


def _eigh(M: torch.Tensor, sync_free: bool):
    return jacobi_eigh(M) if sync_free else torch.linalg.eigh(M)


def _solve(A: torch.Tensor, B: torch.Tensor, sync_free: bool) -> torch.Tensor:
    return torch.linalg.solve_ex(A, B)[0] if sync_free else torch.linalg.solve(A, B)


def aepo_target_first(q: torch.Tensor, g: torch.Tensor, S_hat: torch.Tensor, beta: float, *,
                      check: bool = True) -> torch.Tensor:
    """First-order AEPO target y_t = beta Q(a0_hat) + (beta^2 / 2) g^T S_hat g.

    q (B,), g (B, d) = grad_a Q at a0_hat, S_hat (B, d, d) -> (B,). The variance term lifts the
    estimate above Jensen's E[beta Q].
    """
    beta = check_scalar("beta", beta, low=0.0)
    quad = (g.unsqueeze(-2) @ S_hat @ g.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return _finite("aepo_target_first", beta * q + 0.5 * beta**2 * quad, check)


def aepo_target_second(q: torch.Tensor, g: torch.Tensor, H: torch.Tensor, S_hat: torch.Tensor, beta: float, *,
                       check: bool = True) -> torch.Tensor:
    """Second-order AEPO target: the Gaussian integral of docs/derivation.md 3b around a0_hat.

    With u ~ N(0, S_hat), Q(a0_hat + u) ≈ q + g^T u - u^T H u / 2 and H = -hess Q (PSD-projected
    here): y_t = beta q + log E exp(beta g^T u - beta u^T H u / 2). (B,), (B, d), (B, d, d), (B, d, d) -> (B,).
    ``check=False`` (a GPU loop) reads nothing back: no NaN test, :func:`jacobi_eigh`, solves unchecked.
    """
    beta = check_scalar("beta", beta, low=0.0)
    zero = torch.zeros_like(g)
    y = beta * q + gaussian_log_expectation(zero, S_hat, beta * g, beta * psd_project(H, sync_free=not check),
                                            sync_free=not check)
    return _finite("aepo_target_second", y, check)


def aepo_target_sampled(q_fn: Callable[[torch.Tensor], torch.Tensor], a0_hat: torch.Tensor, S_hat: torch.Tensor,
                        beta: float, n_samples: int = 16, generator: torch.Generator | None = None,
                        clip: float | None = None, *, check: bool = True) -> torch.Tensor:
    """Sampled AEPO target y_t = logmeanexp_k beta Q(a0_hat + S_hat^(1/2) z_k), z_k ~ N(0, I).

    q_fn maps actions (B * K, d) -> (B * K,) (the state is the caller's to repeat); a0_hat (B, d),
    S_hat (B, d, d) -> (B,). ``check=False`` (a GPU loop) reads nothing back: no NaN test, :func:`jacobi_eigh`.
    """
    beta = check_scalar("beta", beta, low=0.0)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
    B, d = a0_hat.shape
    evals, evecs = _eigh(0.5 * (S_hat + S_hat.transpose(-1, -2)), not check)
    root = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt())
    z = torch.randn((B, n_samples, d), generator=generator, dtype=a0_hat.dtype,
                    device=generator.device if generator is not None else a0_hat.device).to(a0_hat.device)
    a = a0_hat[:, None, :] + z @ root.transpose(-1, -2)
    if clip is not None:
        a = a.clamp(-clip, clip)
    qv = q_fn(a.reshape(B * n_samples, d)).reshape(B, n_samples)
    y = torch.logsumexp(beta * qv, dim=1) - math.log(n_samples)
    return _finite("aepo_target_sampled", y, check)


def _finite(where: str, y: torch.Tensor, check: bool = True) -> torch.Tensor:
    """y, after raising FloatingPointError if it has NaN/inf. ``check=False`` skips the test: it reads
    a value back to the host, a synchronisation a GPU training loop avoids (it checks its logged
    metrics instead)."""
    if check and not bool(torch.isfinite(y).all()):
        raise FloatingPointError(f"{where}: the target has NaN/inf entries (check beta, the critic and S_hat)")
    return y


# ----------------------------------------------------------------------------- in-support targets (section 4b)
def _time_b1(x, like: torch.Tensor, name: str, low: float, low_open: bool, check: bool) -> torch.Tensor:
    """alpha or sigma, a float or a (B,) tensor, as a (B, 1) tensor (range-checked when ``check``)."""
    if not isinstance(x, torch.Tensor):
        check_scalar(name, x, low=low, high=1.0, low_open=low_open)
    elif check:
        check_finite(name, x)
        if bool((x < low).any()) or bool((x > 1.0).any()) or (low_open and bool((x == low).any())):
            raise ValueError(f"{name}: expected values in {'(' if low_open else '['}{low}, 1], got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
    v = torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1, 1)
    if v.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{name}: expected a float or {like.shape[0]} values (one per row), got {v.shape[0]}")
    return v.expand(like.shape[0], 1)


def mixture_posterior(a_t: torch.Tensor, support: torch.Tensor, bandwidth: float, alpha, sigma, *,
                      check: bool = True, moments: bool = True):
    """The posterior of a mixture behaviour mu = (1/K) sum_k N(m_k, h^2 I) (docs/derivation.md section 4b).

    a_t (B, d); support m_k (B, K, d), K >= 1 actions per row; bandwidth h >= 0 (h = 0: particles);
    alpha, sigma floats or (B,) tensors. With v = alpha^2 h^2 + sigma^2 the posterior is the mixture
    mu_{0t}(.|a_t) = sum_k r_k(a_t) N(m~_k, s~^2 I) with

        r_k  = softmax_k( -||a_t - alpha m_k||^2 / (2 v) ),
        m~_k = m_k + (alpha h^2 / v) (a_t - alpha m_k),        s~^2 = h^2 sigma^2 / v.

    Returns (log r (B, K), m~ (B, K, d), s~^2 (B,)): responsibilities as logs, for the log-sum-exp
    of the targets. ``check=False`` skips the checks that read values back to the host (NaN in
    ``support``, the range of tensor ``alpha``/``sigma``): a GPU training loop passes it. ``moments=False``
    returns (log r, None, None): the particle target reads only the responsibilities.
    """
    check_tensor("a_t", a_t, ndim=2)
    check_tensor("support", support, ndim=3)
    B, d = a_t.shape
    if support.shape[0] != B or support.shape[2] != d:
        raise ValueError(f"support: expected shape ({B}, K, {d}) to match a_t {tuple(a_t.shape)}, "
                         f"got {tuple(support.shape)}")
    if support.shape[1] < 1:
        raise ValueError(f"support: expected K >= 1 support actions per row, got K = {support.shape[1]}")
    h = check_scalar("bandwidth", bandwidth, low=0.0)
    if check:
        check_finite("support", support)
        check_finite("a_t", a_t)
    al = _time_b1(alpha, a_t, "alpha", 0.0, True, check)  # (B, 1)
    si = _time_b1(sigma, a_t, "sigma", 0.0, h == 0.0, check)  # sigma = 0 is allowed only with a bandwidth
    v = si**2 if h == 0.0 else al**2 * h**2 + si**2  # (B, 1)
    r = a_t[:, None, :] - al[:, :, None] * support  # (B, K, d): a_t - alpha m_k
    log_r = torch.log_softmax(-(r**2).sum(-1) / (2 * v), dim=1)
    if not moments:
        return log_r, None, None
    m_t = support + (al * h**2 / v)[:, :, None] * r
    s2 = (h**2 * si**2 / v).squeeze(-1)
    return log_r, m_t, s2


def particle_target(a_t: torch.Tensor, support: torch.Tensor, support_q: torch.Tensor, beta: float, alpha, sigma,
                    *, check: bool = True) -> torch.Tensor:
    """The particle target (h = 0, docs/derivation.md 4b): y_t = log sum_k r_k(a_t) exp(beta Q(m_k)).

    a_t (B, d), support m_k (B, K, d), support_q = Q(s, m_k) (B, K) precomputed (Q is queried on
    support actions only), alpha, sigma floats or (B,) tensors -> (B,). With every data point as a
    particle this is the exact E_t of docs/derivation.md section 6; with K draws it is biased low (Jensen).
    """
    beta = check_scalar("beta", beta, low=0.0)
    log_r, _, _ = mixture_posterior(a_t, support, 0.0, alpha, sigma, check=check, moments=False)
    check_tensor("support_q", support_q, shape=tuple(log_r.shape))
    if check:
        check_finite("support_q", support_q)
    return _finite("particle_target", torch.logsumexp(log_r + beta * support_q, dim=1), check)


def mixture_target_first(log_r: torch.Tensor, q: torch.Tensor, g: torch.Tensor, s2: torch.Tensor, beta: float, *,
                         check: bool = True) -> torch.Tensor:
    """The mixture target with a first-order expansion of Q in each component (docs/derivation.md 4b):

        y_t = log sum_k r_k exp( beta Q(m~_k) + (beta^2 / 2) s~^2 |g_k|^2 ),   g_k = grad_a Q(m~_k).

    log_r (B, K), q = Q(m~_k) (B, K), g (B, K, d), s2 = s~^2 (B,) (from :func:`mixture_posterior`)
    -> (B,). Exact for a linear Q; with K = 1 it is :func:`aepo_target_first` with S_hat = s~^2 I.
    """
    beta = check_scalar("beta", beta, low=0.0)
    check_tensor("log_r", log_r, ndim=2)
    check_tensor("q", q, shape=tuple(log_r.shape))
    check_tensor("g", g, shape=(*log_r.shape, None))
    check_tensor("s2", s2, shape=(log_r.shape[0],))
    inner = beta * q + 0.5 * beta**2 * s2[:, None] * (g**2).sum(-1)
    return _finite("mixture_target_first", torch.logsumexp(log_r + inner, dim=1), check)


# ----------------------------------------------------------------------------- losses
def energy_regression_loss(f: torch.Tensor, y: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """AEPO's loss: mean (f_phi(s, a_t, t) - stopgrad(y_t))^2. f, y (B,) -> scalar."""
    return _finite("energy_regression_loss", ((f - y.detach()) ** 2).mean(), check)


def mse_energy_loss(f: torch.Tensor, q: torch.Tensor, beta: float, *, check: bool = True) -> torch.Tensor:
    """The MSE baseline: mean (f_phi(s, a_t, t) - beta Q(s, a_0))^2. Learns E[beta Q | a_t] <= E_t (Jensen)."""
    beta = check_scalar("beta", beta, low=0.0)
    return _finite("mse_energy_loss", ((f - beta * q.detach()) ** 2).mean(), check)


def cep_loss(f: torch.Tensor, q: torch.Tensor, beta: float, *, check: bool = True) -> torch.Tensor:
    """QGPO's contrastive energy prediction over K support actions per state.

    f (B, K) = f_phi(s, a_t^(i), t), q (B, K) = Q(s, a^(i)) -> scalar
        L = - mean_B sum_i softmax_i(beta q) log softmax_i(f)
    """
    beta = check_scalar("beta", beta, low=0.0)
    if f.shape != q.shape or f.ndim != 2:
        raise ValueError(f"cep_loss: expected f and q of the same shape (B, K), got {tuple(f.shape)} and {tuple(q.shape)}")
    w = torch.softmax(beta * q.detach(), dim=1)
    return _finite("cep_loss", -(w * torch.log_softmax(f, dim=1)).sum(1).mean(), check)
