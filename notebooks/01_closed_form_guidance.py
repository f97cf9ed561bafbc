# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version,-jupytext.text_representation.format_version
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1. Closed-form guidance: the intermediate energy $E_t$, exactly
#
# An energy-guided diffusion policy samples from the improved policy
# $\pi(a|s) \propto \mu(a|s)\, e^{\beta Q(s,a)}$ by adding a *guidance* term to a diffusion model of the
# behaviour $\mu$. Which term? This chapter derives it, and checks every step with numbers.
#
# **After this chapter you can**
#
# 1. write the intermediate energy $E_t$ and say why $\nabla_{a_t} E_t$ is the exact guidance (section 2);
# 2. explain why regressing an energy network on $\beta Q$ (the "MSE" energy) learns something
#    *smaller* than $E_t$ (Jensen), and see the gap;
# 3. compute $E_t$ in closed form when the behaviour is Gaussian, for a linear and for a concave
#    quadratic critic, two ways (section 3);
# 4. sample from $\pi$ with the exact guidance, and tell guidance error from *discretisation* error
#    of the sampler (a convergence table);
# 5. compute AEPO's analytic target from a noise-prediction model (Tweedie), and see when it is
#    exact (section 4);
# 6. call the library's CEP and MSE losses and say what each one's minimiser is.
#
# The derivation is [docs/derivation.md](../docs/derivation.md) sections 1-4. Every identity is
# followed by a cell that checks it numerically and raises an error if it does not hold (`check`,
# which, unlike `assert`, also runs under `python -O`). Nothing here is trained: the behaviour is a
# known Gaussian (or a known finite data set), so every quantity has an exact value to compare with.
# Numbers here are this course's own, not the AEPO paper's.
#
# **Scale.** `AEPO_SCALE=smoke` (the default, a minute or two on a laptop) or `full` (more samples,
# the same code path); set it before starting JupyterLab. The first code cell prints the one in use.
# Each exercise at the end has a solution to unfold and a cell that checks your answer.


# %% [markdown]
# **The result, precomputed.** Exact guidance on a Gaussian behaviour: guided samples for w = 0, 0.5, 1, 2 against the exact pi (made by `aepo-lite demo`, redrawn by `aepo-lite figures`).
# Shown here so the page says something before you run it.
#
# ![closed_form_guidance.png](../figures/closed_form_guidance.png)

# %%
import math
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from aepo_lite.core import guidance as G
from aepo_lite.core.aepo import aepo_target, posterior_estimate
from aepo_lite.course.demo import gaussian_problem
from aepo_lite.course.notebook import check, course_scale, markdown_table
from aepo_lite.core.diffusion import sample
from aepo_lite.core.schedule import VPSchedule

# One switch for scale: smoke unless AEPO_SCALE is set; it only changes sample counts, not the code path.
SCALE = course_scale()
FULL = SCALE == "full"
N_MC = 1_000_000  # Monte Carlo samples for the closed-form checks (cheap: kept at both scales)
N_SAMPLER = 200_000 if FULL else 30_000  # guided samples for the moment check of section 3
N_WIDGET = 4_000 if FULL else 1_000  # guided samples per beta for the slider

torch.set_default_dtype(torch.float64)  # the exactness checks are float64 identities
torch.set_num_threads(1)  # the tensors here are small: one thread avoids threading overhead on a busy CPU
gen = torch.Generator().manual_seed(0)
T_START = time.time()
sch = VPSchedule()  # linear VP-SDE, b0 = 0.1, b1 = 20, t in [1e-3, 1]
print(f"N_MC={N_MC:,}  N_SAMPLER={N_SAMPLER:,}  N_WIDGET={N_WIDGET:,}  torch {torch.__version__}")


def alpha_sigma(t: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) as python floats."""
    a, s = sch.alpha_sigma(torch.tensor(float(t)))
    return float(a), float(s)


# %% [markdown]
# ## 1. The objects
#
# * **Forward (VP) process.** $a_t = \alpha_t a_0 + \sigma_t \epsilon$, $\epsilon \sim \mathcal N(0, I)$,
#   $\alpha_t^2 + \sigma_t^2 = 1$, with $\log \alpha_t = -\tfrac{t^2}{4}(b_1 - b_0) - \tfrac t2 b_0$.
#   At $t \approx 0$ the action is clean; at $t = 1$ it is almost pure noise.
# * **Behaviour** $\mu(a_0|s)$ and its noisy marginals $\mu_t(a_t|s) = \int \mu(a_0|s)\,
#   \mathcal N(a_t; \alpha_t a_0, \sigma_t^2 I)\, da_0$. A diffusion model learns
#   $\epsilon_\theta(a_t, t, s) \approx -\sigma_t \nabla_{a_t} \log \mu_t(a_t|s)$.
# * **Target policy** $\pi(a|s) = \mu(a|s)\, e^{\beta Q(s,a)} / Z(s)$: the solution of
#   KL-regularised policy improvement, with inverse temperature $\beta$.
#
# The state $s$ is fixed throughout this chapter and dropped from the notation.

# %%
ts = torch.linspace(sch.t_min, sch.t_max, 200)
al, si = sch.alpha_sigma(ts)
check(torch.allclose(al**2 + si**2, torch.ones_like(ts), atol=1e-12), 'torch.allclose(al**2 + si**2, torch.ones_like(ts), atol=1e-12)')  # variance preserving
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot(ts, al, label=r"$\alpha_t$")
ax.plot(ts, si, label=r"$\sigma_t$")
ax.set_xlabel("t")
ax.set_ylabel(r"$\alpha_t$, $\sigma_t$")
ax.legend()
ax.set_title("The VP schedule")
plt.show()
print(f"alpha at t_min = {float(al[0]):.6f}, alpha at t = 1: {float(al[-1]):.4f}")

# %% [markdown]
# ## 2. The intermediate energy (exact, for any behaviour)
#
# Diffusing $\pi$ instead of $\mu$ gives
#
# $$
# \pi_t(a_t) = \int \frac{\mu(a_0)\, e^{\beta Q(a_0)}}{Z}\, \mathcal N(a_t;\alpha_t a_0, \sigma_t^2 I)\, da_0
#            = \frac{\mu_t(a_t)}{Z} \int \mu_{0t}(a_0|a_t)\, e^{\beta Q(a_0)}\, da_0 ,
# $$
#
# using Bayes' rule $\mu(a_0)\,\mathcal N(a_t;\alpha_t a_0,\sigma_t^2 I) = \mu_t(a_t)\, \mu_{0t}(a_0|a_t)$.
# So with the **intermediate energy**
#
# $$
# E_t(a_t) = \log \mathbb E_{a_0 \sim \mu_{0t}(\cdot|a_t)}\big[ e^{\beta Q(a_0)} \big], \qquad E_0 = \beta Q,
# $$
#
# we have $\pi_t(a_t) = \mu_t(a_t)\, e^{E_t(a_t)} / Z$ with $Z$ independent of $a_t$, hence the
# **exact guided score**
#
# $$
# \nabla_{a_t} \log \pi_t = \nabla_{a_t} \log \mu_t + \nabla_{a_t} E_t ,
# \qquad
# \epsilon_{\text{guided}} = \epsilon_\theta - w\, \sigma_t\, \nabla_{a_t} E_t \quad (w = 1 \text{ exact}).
# $$
#
# **Check it with a behaviour that is not Gaussian.** Take a finite data set $x^1..x^N$ (a
# two-bump mixture in 1D) as $\mu$. Then everything is a finite sum: the posterior over the data
# points given $a_t$ is $p_j(a_t) = \operatorname{softmax}_j\big(-(a_t - \alpha_t x^j)^2 / 2\sigma_t^2\big)$,
# $E_t = \log \sum_j p_j e^{\beta Q(x^j)}$, and $\pi_t$ is the data set reweighted by
# $\operatorname{softmax}_j(\beta Q(x^j))$, then diffused. (These are the "ground truth" formulas of
# derivation.md section 6.) We check that $\log \pi_t - \log \mu_t - E_t$ is the constant $-\log Z$, and
# that the score identity holds to float64 precision.

# %%
N_DATA = 2000
comp = torch.rand(N_DATA, generator=gen) < 0.6
x_data = torch.where(comp, -0.5 + 0.15 * torch.randn(N_DATA, generator=gen),
                     0.45 + 0.2 * torch.randn(N_DATA, generator=gen))  # behaviour samples, (N,)
q_data = torch.sin(3.0 * x_data)  # a smooth critic Q(a) = sin(3a), evaluated on the data
BETA_1D = 3.0


def log_kernel(a_t, t):
    """log N(a_t; alpha x^j, sigma^2) for a grid a_t (M,) against the data -> (M, N)."""
    a, s = alpha_sigma(t)
    return -0.5 * ((a_t[:, None] - a * x_data[None, :]) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))


def energies_1d(a_t, t):
    """(log mu_t, log pi_t, E_t, E[beta Q | a_t]) on a grid a_t (M,), each (M,)."""
    lk = log_kernel(a_t, t)
    log_mu_t = torch.logsumexp(lk, 1) - math.log(N_DATA)
    log_w = torch.log_softmax(BETA_1D * q_data, 0)  # pi = data reweighted by softmax(beta Q)
    log_pi_t = torch.logsumexp(lk + log_w, 1)
    post = torch.softmax(lk, 1)  # mu_0t(x^j | a_t), Bayes on the finite data set
    E_t = torch.logsumexp(torch.log_softmax(lk, 1) + BETA_1D * q_data, 1)
    mse_target = (post * BETA_1D * q_data).sum(1)
    return log_mu_t, log_pi_t, E_t, mse_target


grid_1d = torch.linspace(-1.5, 1.5, 301)
log_Z = float(torch.logsumexp(BETA_1D * q_data, 0) - math.log(N_DATA))
worst_const, worst_score, min_gap = 0.0, 0.0, float("inf")
for t in (0.01, 0.1, 0.3, 0.6):
    x = grid_1d.clone().requires_grad_(True)
    log_mu_t, log_pi_t, E_t, mse_target = energies_1d(x, t)
    worst_const = max(worst_const, float((log_pi_t - log_mu_t - E_t + log_Z).detach().abs().max()))
    g_pi, = torch.autograd.grad(log_pi_t.sum(), x, retain_graph=True)
    g_mu, = torch.autograd.grad(log_mu_t.sum(), x, retain_graph=True)
    g_E, = torch.autograd.grad(E_t.sum(), x)
    worst_score = max(worst_score, float((g_pi - g_mu - g_E).abs().max()))
    min_gap = min(min_gap, float((E_t - mse_target).detach().min()))
print(f"max |log pi_t - log mu_t - E_t + log Z|        = {worst_const:.2e}")
print(f"max |grad log pi_t - grad log mu_t - grad E_t| = {worst_score:.2e}")
print(f"min over the grid of E_t - E[beta Q | a_t]     = {min_gap:.3e}  (Jensen: >= 0)")
check(worst_const < 1e-10 and worst_score < 1e-9, 'worst_const < 1e-10 and worst_score < 1e-9')
check(min_gap >= -1e-12, 'min_gap >= -1e-12')

# %% [markdown]
# ### Why regressing on $\beta Q$ is not enough (Jensen)
#
# The simplest way to learn an energy is least squares: fit $f(a_t, t)$ to $\beta Q(a_0)$ over pairs
# $(a_0, a_t)$ from the forward process. The minimiser of $\mathbb E\,(f(a_t) - \beta Q(a_0))^2$ is the
# conditional mean $f^\star(a_t) = \mathbb E[\beta Q(a_0)\,|\,a_t]$. But $\log$ is concave, so by Jensen
#
# $$
# \mathbb E[\beta Q \,|\, a_t] \;\le\; \log \mathbb E\big[e^{\beta Q}\,|\,a_t\big] = E_t(a_t),
# $$
#
# with equality only when the posterior puts all its mass where $Q$ is constant: at $t \to 0$. The
# gap is not a constant shift (that would not matter for a gradient); it depends on $a_t$, so the
# MSE energy guides toward the wrong distribution. For small $\beta$ the gap is about
# $\tfrac{\beta^2}{2}\operatorname{Var}[Q|a_t]$: largest where the posterior is wide and $Q$ varies.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].hist(x_data.numpy(), bins=60, density=True, color="0.7", label=r"data $\sim\mu$")
w_pi = torch.softmax(BETA_1D * q_data, 0)
axes[0].hist(x_data.numpy(), bins=60, density=True, weights=(w_pi * N_DATA).numpy(), histtype="step",
             color="C1", lw=1.5, label=r"$\pi \propto \mu e^{\beta Q}$")
axes[0].plot(grid_1d, np.sin(3 * grid_1d.numpy()), "k--", lw=1, label="Q")
axes[0].set_title("behaviour, critic and target")
axes[0].set_xlabel("$a$")
axes[0].set_ylabel("density; Q(a)")
axes[0].legend(fontsize=8)
gaps = {}
for i, t in enumerate((0.05, 0.3)):
    _, _, E_t, mse_target = energies_1d(grid_1d, t)
    axes[1 + i].plot(grid_1d, E_t, label=r"$E_t$ (exact)")
    axes[1 + i].plot(grid_1d, mse_target, "--", label=r"$\mathbb{E}[\beta Q|a_t]$ (MSE)")
    axes[1 + i].set_title(f"t = {t}")
    axes[1 + i].set_xlabel("$a_t$")
    axes[1 + i].set_ylabel("energy (nats)")
    gaps[t] = float((E_t - mse_target).max())
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
print({t: round(v, 3) for t, v in gaps.items()}, "= largest Jensen gap at each t")
check(gaps[0.3] > gaps[0.05] > 0, 'gaps[0.3] > gaps[0.05] > 0')  # the gap grows as the posterior widens

# %% [markdown]
# ## 3. Closed form: a Gaussian behaviour
#
# Let $\mu = \mathcal N(m, S)$. Then $\mu_t = \mathcal N(\alpha m, \alpha^2 S + \sigma^2 I)$ (drop the
# subscript $t$ on $\alpha,\sigma$) and the posterior is Gaussian too. Multiply the prior by the
# likelihood and complete the square in $a_0$:
#
# $$
# \log \mu_{0t}(a_0|a_t) = -\tfrac12 (a_0 - m)^\top S^{-1} (a_0 - m) - \tfrac{1}{2\sigma^2}\| a_t - \alpha a_0\|^2 + \text{const}
# $$
#
# has precision $S^{-1} + \tfrac{\alpha^2}{\sigma^2} I$ and linear term $S^{-1} m + \tfrac{\alpha}{\sigma^2} a_t$, so
#
# $$
# \tilde S = \Big(S^{-1} + \tfrac{\alpha^2}{\sigma^2} I\Big)^{-1} = S - \alpha^2 S(\alpha^2 S + \sigma^2 I)^{-1} S,
# \qquad
# \tilde m = \tilde S\Big(S^{-1} m + \tfrac{\alpha}{\sigma^2} a_t\Big) = m + \alpha S (\alpha^2 S + \sigma^2 I)^{-1}(a_t - \alpha m).
# $$
#
# (The second forms follow from the Woodbury identity, and never invert $S$.) The course's running
# example is a 2D behaviour with a concave quadratic critic, from `aepo_lite.course.demo.gaussian_problem`.

# %%
P = gaussian_problem()
m, S, c, g, H, beta = P["m"], P["S"], P["c"], P["g"], P["H"], P["beta"]
print("m =", m.tolist(), "\nS =", S.tolist(), "\ng =", g.tolist(), "\nH =", H.tolist(), "\nbeta =", beta)

# %% [markdown]
# **Check 1: the posterior by brute force.** Bayes' rule on a fine 2D grid of $a_0$ (prior times
# likelihood, normalised), its mean and covariance by quadrature, against `gaussian_posterior`.

# %%
u = torch.linspace(-3.0, 3.0, 801)
A0 = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)  # grid of a_0, (801^2, 2)
worst_bayes = 0.0
for t, a_t_point in [(0.05, [0.3, -0.2]), (0.3, [-0.5, 0.8])]:
    a, s = alpha_sigma(t)
    a_t = torch.tensor([a_t_point])
    logw = G.mvn_log_prob(A0, m, S) - 0.5 * ((a_t - a * A0) ** 2).sum(1) / s**2
    w = torch.softmax(logw, 0)
    mean_grid = w @ A0
    cov_grid = (A0 - mean_grid).T @ ((A0 - mean_grid) * w[:, None])
    m_t, S_t = G.gaussian_posterior(a_t, m, S, a, s)
    err = max(float((mean_grid - m_t[0]).abs().max()), float((cov_grid - S_t).abs().max()))
    worst_bayes = max(worst_bayes, err)
    print(f"t={t}: m~ = {m_t[0].numpy().round(5)}, grid {mean_grid.numpy().round(5)}; max error {err:.1e}")
check(worst_bayes < 1e-8, 'worst_bayes < 1e-8')

# %% [markdown]
# **Check 2: the posterior by Monte Carlo of the joint.** Draw $(a_0, a_t)$ pairs from the forward
# process and regress $a_0$ on $a_t$. Because the joint is Gaussian, the regression is exactly linear:
# slope $K = \alpha S(\alpha^2 S + \sigma^2 I)^{-1}$, intercept $m - K\alpha m$, residual covariance
# $\tilde S$. We compare the least-squares estimates with the closed form in standard errors.

# %%
t = 0.3
a, s = alpha_sigma(t)
a0 = m + torch.randn(N_MC, 2, generator=gen) @ torch.linalg.cholesky(S).T
a_t, _ = sch.diffuse(a0, torch.full((N_MC,), t), generator=gen)
X = torch.cat([torch.ones(N_MC, 1), a_t], 1)  # design matrix [1, a_t]
coef = torch.linalg.lstsq(X, a0).solution  # (3, 2): intercept row, then K^T
resid = a0 - X @ coef
S_tilde_mc = resid.T @ resid / (N_MC - 3)
_, S_t = G.gaussian_posterior(a_t[:1], m, S, a, s)
K = a * S @ torch.linalg.inv(a**2 * S + s**2 * torch.eye(2))
se_coef = torch.sqrt(torch.diag(torch.linalg.inv(X.T @ X))[:, None] * torch.diag(S_tilde_mc)[None, :])
z_K = ((coef[1:] - K.T) / se_coef[1:]).abs().max()
z_b = ((coef[0] - (m - a * K @ m)) / se_coef[0]).abs().max()
dg = torch.diag(S_t)
z_S = ((S_tilde_mc - S_t) / torch.sqrt((dg[:, None] * dg[None, :] + S_t**2) / N_MC)).abs().max()
print(f"slope K: max error {float(z_K):.2f} SE; intercept {float(z_b):.2f} SE; S~ {float(z_S):.2f} SE")
check(max(z_K, z_b, z_S) < 4.5, 'max(z_K, z_b, z_S) < 4.5')

# %% [markdown]
# **Picture: the posterior.** One noisy action $a_t = (0.5, 0.4)$ seen at three times. At small $t$
# the posterior $\mu_{0t}(a_0|a_t)$ is a narrow bump at $a_t/\alpha_t$ (the noise was small, so $a_t$
# says almost exactly where $a_0$ was); at large $t$ it relaxes to the prior $\mu$ (dashed), because
# $a_t$ is almost pure noise. Its mean $\tilde m$ (the cross) is Tweedie's estimate $\hat a_0$ (section 4).
# Actions are in the units of the action box $[-1, 1]^2$; the colour is a probability density per unit area.

# %%
a_t_pic = torch.tensor([[0.5, 0.4]])
u_pic = torch.linspace(-1.2, 1.2, 241)
PX, PY = torch.meshgrid(u_pic, u_pic, indexing="xy")
grid_pic = torch.stack([PX.reshape(-1), PY.reshape(-1)], 1)
prior_pic = G.mvn_log_prob(grid_pic, m, S).exp().reshape(PX.shape)
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
post_means = {}
for ax, t in zip(axes, (0.05, 0.3, 0.7)):
    a, s = alpha_sigma(t)
    m_t, S_t = G.gaussian_posterior(a_t_pic, m, S, a, s)
    post_means[t] = m_t[0]
    dens = G.mvn_log_prob(grid_pic, m_t[0], S_t).exp().reshape(PX.shape)
    im = ax.imshow(dens.numpy(), origin="lower", extent=(-1.2, 1.2, -1.2, 1.2), cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.85, label="density (per unit area)")
    ax.contour(PX, PY, prior_pic, levels=4, colors="0.4", linewidths=0.8, linestyles="dashed")
    ax.plot(*(a_t_pic[0] / a), "r+", ms=12, mew=2, label=r"$a_t / \alpha_t$")
    ax.plot(*m_t[0], "kx", ms=9, mew=2, label=r"$\tilde m$ (Tweedie)")
    ax.set_title(f"t = {t}: alpha = {a:.2f}, sigma = {s:.2f}", fontsize=9)
    ax.set_xlabel("$a_{0,1}$")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
axes[0].set_ylabel("$a_{0,2}$")
axes[0].legend(fontsize=8, loc="lower left")
fig.suptitle(r"The posterior $\mu_{0t}(a_0 \mid a_t)$ for one $a_t$; dashed: the prior $\mu$", fontsize=10)
plt.show()
# the two limits the picture shows: the posterior mean tends to a_t / alpha as t -> 0 and to m as t -> 1
a_lo, s_lo = alpha_sigma(sch.t_min)
a_hi, s_hi = alpha_sigma(1.0)
lim_lo = float((G.gaussian_posterior(a_t_pic, m, S, a_lo, s_lo)[0][0] - a_t_pic[0] / a_lo).norm())
lim_hi = float((G.gaussian_posterior(a_t_pic, m, S, a_hi, s_hi)[0][0] - m).norm())
print(f"|m~ - a_t/alpha| at t_min: {lim_lo:.1e};  |m~ - m| at t = 1: {lim_hi:.1e}")
check(lim_lo < 1e-3 and lim_hi < 1e-3, f"posterior-mean limits: {lim_lo:.2e}, {lim_hi:.2e}")

# %% [markdown]
# ### 3a. Linear critic $Q(a) = c + g^\top a$
#
# For $x \sim \mathcal N(\tilde m, \tilde S)$, $\log \mathbb E\, e^{b^\top x} = b^\top \tilde m + \tfrac12 b^\top \tilde S b$
# (the Gaussian moment generating function). With $b = \beta g$:
#
# $$
# E_t(a_t) = \beta c + \beta g^\top \tilde m + \tfrac{\beta^2}{2}\, g^\top \tilde S g ,
# \qquad
# \nabla_{a_t} E_t = \beta\, \tfrac{\partial \tilde m}{\partial a_t}^{\!\top} g = \beta\alpha\, S(\alpha^2 S + \sigma^2 I)^{-1} g .
# $$
#
# $\tilde S$ does not depend on $a_t$, so the variance term is a constant per $t$, and the **gradient
# field is constant in $a_t$**: a linear critic pushes every noisy action the same way. At the end,
# $\pi \propto \mathcal N(m,S)e^{\beta g^\top a} = \mathcal N(m + \beta S g,\, S)$: a pure shift.
# Note also that the MSE target $\mathbb E[\beta Q|a_t] = \beta c + \beta g^\top\tilde m$ misses exactly the
# term $\tfrac{\beta^2}{2} g^\top\tilde S g$; here it is constant in $a_t$, so the two give the same
# guidance. For a curved critic they do not (3b).

# %%
a_pts = 1.5 * torch.randn(1000, 2, generator=gen)
worst_lin, worst_grad = 0.0, 0.0
for t in (sch.t_min, 0.1, 0.5, 1.0):
    a, s = alpha_sigma(t)
    E_lin = G.linear_intermediate_energy(a_pts, m, S, c, g, beta, a, s)
    E_gen = G.gaussian_intermediate_energy(a_pts, m, S, c, g, torch.zeros(2, 2), beta, a, s)  # H = 0
    E_marg = G.gaussian_intermediate_energy_marginal(a_pts, m, S, c, g, torch.zeros(2, 2), beta, a, s)
    worst_lin = max(worst_lin, float((E_lin - E_gen).abs().max()), float((E_lin - E_marg).abs().max()))
    x = a_pts.clone().requires_grad_(True)
    auto, = torch.autograd.grad(G.linear_intermediate_energy(x, m, S, c, g, beta, a, s).sum(), x)
    grad = G.linear_intermediate_energy_grad(a_pts, m, S, c, g, beta, a, s)
    worst_grad = max(worst_grad, float((auto - grad).abs().max()), float((grad - grad[0]).abs().max()))
m_pi_lin, S_pi_lin = G.gaussian_target_policy(m, S, g, None, beta)
print(f"3a formula vs general closed form and marginal route: {worst_lin:.1e}")
print(f"grad: closed form vs autograd, and spread over a_t:    {worst_grad:.1e}")
print(f"pi = N(m + beta S g, S): m_pi = {m_pi_lin.numpy().round(4)}")
check(worst_lin < 1e-9 and worst_grad < 1e-9, 'worst_lin < 1e-9 and worst_grad < 1e-9')
check(torch.allclose(m_pi_lin, m + beta * S @ g) and torch.equal(S_pi_lin, S), 'torch.allclose(m_pi_lin, m + beta * S @ g) and torch.equal(S_pi_lin, S)')

# %%
ts_plot = torch.linspace(sch.t_min, 1.0, 200)
norms = [float(G.linear_intermediate_energy_grad(m[None], m, S, c, g, beta, *alpha_sigma(t)).norm())
         for t in ts_plot]
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(ts_plot, norms)
ax.axhline(float(beta * g.norm()), ls="--", c="k", lw=1, label=r"$\beta\|g\|$ ($t \to 0$)")
ax.set_xlabel("t")
ax.set_ylabel(r"$\|\nabla_{a_t} E_t\|$")
ax.set_title("Linear critic: the guidance is a constant field per t")
ax.legend()
plt.show()
check(abs(norms[0] - float(beta * g.norm())) < 1e-2 and norms[-1] < 1e-2, 'abs(norms[0] - float(beta * g.norm())) < 1e-2 and norms[-1] < 1e-2')  # full push at t=0, none at t=1

# %% [markdown]
# ### 3b. Concave quadratic critic $Q(a) = c + g^\top a - \tfrac12 a^\top H a$, $H \succeq 0$
#
# Now $\mu e^{\beta Q}$ is still Gaussian: adding precisions and linear terms,
#
# $$
# \pi = \mathcal N(m_\pi, S_\pi), \qquad S_\pi = (S^{-1} + \beta H)^{-1}, \qquad m_\pi = S_\pi (S^{-1} m + \beta g),
# \qquad \pi_t = \mathcal N(\alpha m_\pi,\; \alpha^2 S_\pi + \sigma^2 I).
# $$
#
# **Route 1 (marginals).** From section 2, $E_t = \log \pi_t(a_t) - \log \mu_t(a_t) + \log Z$, with
# $\log Z = \log \mathbb E_{\mu} e^{\beta Q}$.
#
# **Route 2 (posterior integral).** For $x \sim \mathcal N(\tilde m, \tilde S)$, $b = \beta g$, $A = \beta H$,
# complete the square once more:
#
# $$
# \mathbb E\big[e^{b^\top x - \frac12 x^\top A x}\big] = \det(I + \tilde S A)^{-1/2}
# \exp\Big(\tfrac12 (\tilde S^{-1}\tilde m + b)^\top(\tilde S^{-1} + A)^{-1}(\tilde S^{-1}\tilde m + b) - \tfrac12 \tilde m^\top \tilde S^{-1}\tilde m\Big),
# $$
#
# and $E_t = \beta c + \log(\cdot)$. The library computes route 2 in an equivalent form that never
# inverts $\tilde S$ (which becomes singular as $t \to 0$): `gaussian_log_expectation`.
#
# **Check 3: the two routes agree to float64 precision**, on many points and times.

# %%
a_pts = 1.5 * torch.randn(4000, 2, generator=gen)
route_err = {}
for t in (sch.t_min, 0.01, 0.05, 0.2, 0.5, 1.0):
    a, s = alpha_sigma(t)
    e1 = G.gaussian_intermediate_energy(a_pts, m, S, c, g, H, beta, a, s)
    e2 = G.gaussian_intermediate_energy_marginal(a_pts, m, S, c, g, H, beta, a, s)
    route_err[t] = float((e1 - e2).abs().max())
print("max |route 2 - route 1| by t:", {t: f"{v:.1e}" for t, v in route_err.items()})
check(max(route_err.values()) < 1e-9, 'max(route_err.values()) < 1e-9')

# %% [markdown]
# **Check 4: Monte Carlo over the posterior.** Draw $10^6$ samples from $\mathcal N(\tilde m, \tilde S)$,
# average $e^{\beta Q}$ and take the log. The standard error of $\log \bar w$ is
# $\operatorname{sd}(w) / (\bar w \sqrt n)$ (delta method). The closed form must sit within a few of them.

# %%
mc_rows = []
for t, point in [(0.05, [0.1, -0.3]), (0.3, [0.5, 0.4]), (0.7, [-0.8, 0.2]), (1.0, [0.0, 0.0])]:
    a, s = alpha_sigma(t)
    a_t = torch.tensor([point])
    exact = float(G.gaussian_intermediate_energy(a_t, m, S, c, g, H, beta, a, s)[0])
    m_t, S_t = G.gaussian_posterior(a_t, m, S, a, s)
    x = m_t + torch.randn(N_MC, 2, generator=gen) @ torch.linalg.cholesky(S_t).T
    w = torch.exp(beta * (c + x @ g - 0.5 * ((x @ H) * x).sum(1)))  # exp(beta Q(x))
    mc, se = float(torch.log(w.mean())), float(w.std() / (w.mean() * math.sqrt(N_MC)))
    mean_bq = float(beta * (c + x @ g - 0.5 * ((x @ H) * x).sum(1)).mean())  # MSE target, for comparison
    mc_rows.append((t, exact, mc, se, abs(mc - exact) / se, mean_bq))
display(Markdown(markdown_table(
    ["t", "$E_t$, closed form", "$E_t$, Monte Carlo", "standard error", "abs. error / SE", r"$\mathbb{E}[\beta Q \mid a_t]$"],
    [[f"{t:.2f}", f"{ex:.5f}", f"{mc:.5f}", f"{se:.1e}", f"{z:.2f}", f"{bq:.5f}"] for t, ex, mc, se, z, bq in mc_rows])))
check(all(r[4] < 4.5 for r in mc_rows), 'all(r[4] < 4.5 for r in mc_rows)')
check(all(r[5] < r[1] for r in mc_rows), 'all(r[5] < r[1] for r in mc_rows)')  # Jensen again: the MSE target is below E_t

# %% [markdown]
# **Check 5: the gradient.** `gaussian_intermediate_energy_grad` is
# $\nabla\log\pi_t - \nabla\log\mu_t = -(\alpha^2 S_\pi+\sigma^2 I)^{-1}(a_t-\alpha m_\pi) + (\alpha^2 S+\sigma^2 I)^{-1}(a_t - \alpha m)$;
# it must match autograd through route 2. It is affine in $a_t$ (a linear critic gave a constant).

# %%
worst = 0.0
for t in (sch.t_min, 0.05, 0.3, 1.0):
    a, s = alpha_sigma(t)
    x = a_pts[:500].clone().requires_grad_(True)
    auto, = torch.autograd.grad(G.gaussian_intermediate_energy(x, m, S, c, g, H, beta, a, s).sum(), x)
    worst = max(worst, float((auto - G.gaussian_intermediate_energy_grad(a_pts[:500], m, S, c, g, H, beta, a, s))
                             .abs().max()))
print(f"max |closed-form grad - autograd| = {worst:.1e}")
check(worst < 1e-8, 'worst < 1e-8')

# %% [markdown]
# **Picture: the guidance field.** The colour is $E_t(a_t)$ (in nats: it is a log-expectation), the
# arrows are $\nabla_{a_t} E_t$, the push the guided sampler adds to the behaviour's score. For this
# concave critic the field is affine in $a_t$: it points towards where $\pi_t$ has more mass than
# $\mu_t$. It is strong at small $t$ and fades as $t \to 1$, where $a_t$ carries almost no information
# about $a_0$ (its length scales with $\alpha_t$).

# %%
u_f = torch.linspace(-1.5, 1.5, 121)
FX, FY = torch.meshgrid(u_f, u_f, indexing="xy")
grid_f = torch.stack([FX.reshape(-1), FY.reshape(-1)], 1)
q_idx = torch.arange(0, 121, 12)
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
field_norms = {}
for ax, t in zip(axes, (0.05, 0.3, 0.7)):
    a, s = alpha_sigma(t)
    E_map = G.gaussian_intermediate_energy(grid_f, m, S, c, g, H, beta, a, s).reshape(FX.shape)
    grad_map = G.gaussian_intermediate_energy_grad(grid_f, m, S, c, g, H, beta, a, s).reshape(*FX.shape, 2)
    field_norms[t] = float(grad_map.norm(dim=-1).mean())
    im = ax.imshow(E_map.numpy(), origin="lower", extent=(-1.5, 1.5, -1.5, 1.5), cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.85, label=r"$E_t(a_t)$ (nats)")
    sub = grad_map[q_idx][:, q_idx]
    ax.quiver(FX[q_idx][:, q_idx], FY[q_idx][:, q_idx], sub[..., 0], sub[..., 1], color="w", width=0.005)
    ax.set_title(f"t = {t}: mean length {field_norms[t]:.2f} nats per unit of $a_t$", fontsize=9)
    ax.set_xlabel("$a_{t,1}$")
axes[0].set_ylabel("$a_{t,2}$")
fig.suptitle(r"The exact guidance field $\nabla_{a_t} E_t$ (arrows, relative lengths) over $E_t$ (colour)", fontsize=10)
plt.show()
check(field_norms[0.05] > field_norms[0.3] > field_norms[0.7], f"the field fades with t: {field_norms}")

# %% [markdown]
# ### Sampling with the exact guidance
#
# Give a sampler the exact noise prediction of the Gaussian behaviour (`gaussian_eps`) and the exact
# $\nabla E_t$ at guidance scale $w=1$. The only error left is the ODE solver's. The sampler stops at
# $t_{\min} = 10^{-3}$, so the exact law of its output is $\pi_{t_{\min}}$ (which differs from $\pi$
# by $\sigma_{t_{\min}}^2 I \approx 10^{-4} I$ in covariance; we compare with $\pi_{t_{\min}}$).
#
# **Check 6:** DPM-Solver++ 3M with 50 steps: the mean within 3 standard errors, and the covariance
# entries within a few. (Why 50 and not 15, QGPO's setting? See the convergence table just after.)

# %%
eps_fn = lambda x, t, s: G.gaussian_eps(x, t, m, S, sch)  # noqa: E731  exact eps of N(m, S)


def exact_guidance(x, t, s):
    """grad_{a_t} E_t in the sampler's (a_t, t, cond) -> (B, d) interface (t is one time, repeated)."""
    a, sg = alpha_sigma(float(t[0]))
    return G.gaussian_intermediate_energy_grad(x, m, S, c, g, H, beta, a, sg)


def moment_errors(x, mean, cov):
    """Largest |sample mean - mean| and |sample cov - cov| entries in standard errors, and relative cov error."""
    n = x.shape[0]
    z_mean = float(((x.mean(0) - mean) / (torch.diag(cov) / n).sqrt()).abs().max())
    dg = torch.diag(cov)
    z_cov = float(((torch.cov(x.T) - cov) / ((dg[:, None] * dg[None, :] + cov**2) / n).sqrt()).abs().max())
    return z_mean, z_cov, float(torch.linalg.norm(torch.cov(x.T) - cov) / torch.linalg.norm(cov))


m_pi, S_pi = G.gaussian_target_policy(m, S, g, H, beta)
mean_end, cov_end = G.gaussian_marginal(m_pi, S_pi, *alpha_sigma(sch.t_min))
x_T = torch.randn(N_SAMPLER, 2, generator=gen)
t0 = time.time()
x_pi = sample(eps_fn, x_T, schedule=sch, n_steps=50, solver="dpmpp3m", guidance=exact_guidance, guidance_scale=1.0)
z_mean, z_cov, rel_cov = moment_errors(x_pi, mean_end, cov_end)
print(f"dpmpp3m, 50 steps, {N_SAMPLER:,} samples ({time.time() - t0:.1f} s): mean {z_mean:.2f} SE, "
      f"covariance {z_cov:.2f} SE (relative {100 * rel_cov:.2f}%)")
print("m_pi =", m_pi.numpy().round(4), " sample mean =", x_pi.mean(0).numpy().round(4))
check(z_mean < 3.0 and z_cov < 4.0, 'z_mean < 3.0 and z_cov < 4.0')

# %% [markdown]
# ### Guidance is exact; the solver is not: a convergence table
#
# With 15 steps (QGPO's setting), the same experiment leaves a covariance error of a few percent,
# about 10-13 standard errors at $2\times10^5$ samples: clearly visible, and *not* a guidance error.
# To measure it without Monte Carlo noise, use a fact about this problem: the exact $\epsilon$ of a
# Gaussian and the exact $\nabla E_t$ of a quadratic critic are both **affine** in $a_t$, so every
# solver step is an affine map and the whole sampler is $x_T \mapsto A x_T + b$. Push $0$ and the
# basis vectors through it to read off $A$ and $b$; the output law for $x_T\sim\mathcal N(0,I)$ is then
# exactly $\mathcal N(b, AA^\top)$. (Only that $x_T \sim \mathcal N(0, I)$ rather than $\pi_1$ is left, a
# relative error of order $\alpha_1^2 \approx 4\times10^{-5}$.)

# %%
def sampler_law(solver, n_steps):
    """Exact output law N(b, A A^T) of a deterministic sampler on this affine problem."""
    pts = torch.cat([torch.zeros(1, 2), torch.eye(2)])  # 0, e_1, e_2
    out = sample(eps_fn, pts, schedule=sch, n_steps=n_steps, solver=solver, guidance=exact_guidance,
                 guidance_scale=1.0)
    b = out[0]
    A = (out[1:] - b).T
    return b, A @ A.T, A


# the sampler really is affine: random inputs land on A x + b
b, _, A = sampler_law("dpmpp2m", 15)
x_chk = torch.randn(100, 2, generator=gen)
affine_err = float((sample(eps_fn, x_chk, schedule=sch, n_steps=15, solver="dpmpp2m", guidance=exact_guidance,
                           guidance_scale=1.0) - (x_chk @ A.T + b)).abs().max())
check(affine_err < 1e-12, affine_err)

STEPS = [10, 15, 20, 30, 50, 100]
SOLVERS = ["ddim", "dpmpp2m", "dpmpp3m"]
dg = torch.diag(cov_end)
se_2e5 = ((dg[:, None] * dg[None, :] + cov_end**2) / 2e5).sqrt()
table = {}
for solver in SOLVERS:
    for n in STEPS:
        b, C, _ = sampler_law(solver, n)
        table[solver, n] = dict(rel_cov=float(torch.linalg.norm(C - cov_end) / torch.linalg.norm(cov_end)),
                                se_2e5=float(((C - cov_end) / se_2e5).abs().max()),
                                mean_err=float((b - mean_end).abs().max()))
display(Markdown("**Relative covariance error of the sampler's exact output law** (in brackets: in standard "
                 "errors of a $2\\times10^5$-sample estimate)\n\n" + markdown_table(
    ["steps"] + SOLVERS,
    [[n] + [f"{100 * table[s, n]['rel_cov']:.3f}% ({table[s, n]['se_2e5']:.1f})" for s in SOLVERS] for n in STEPS])))

fig, ax = plt.subplots(figsize=(5.5, 3.4))
for s in SOLVERS:
    ax.loglog(STEPS, [100 * table[s, n]["rel_cov"] for n in STEPS], "o-", label=s)
ax.axhline(100 * math.sqrt(2 / 2e5), c="k", ls=":", lw=1, label="MC noise, 2e5 samples")
ax.axvline(15, c="0.6", lw=0.8)
ax.set_xlabel("network evaluations (steps)")
ax.set_ylabel("relative covariance error (%)")
ax.set_title("Exact guidance, inexact solver")
ax.legend(fontsize=8)
plt.show()

# %%
# What the table says, asserted:
for s in ("dpmpp2m", "dpmpp3m"):
    check(0.02 < table[s, 15]["rel_cov"] < 0.06, "higher-order solvers: a few % off at 15 steps")
    check(table[s, 15]["se_2e5"] > 8, "... which is many standard errors at 2e5 samples")
    check(table[s, 50]["rel_cov"] < 0.005, "... below 0.5% by 50 steps")
    check(table[s, 100]["rel_cov"] < 0.002, "... and below 0.2% by 100")
check(table["ddim", 100]["rel_cov"] > 0.02, "first order: still a few % off at 100 steps")
r = [table["ddim", n]["rel_cov"] for n in STEPS]
check(all(r1 > r2 for r1, r2 in zip(r, r[1:])), 'all(r1 > r2 for r1, r2 in zip(r, r[1:]))')
slope = math.log(r[-1] / r[-2]) / math.log(STEPS[-1] / STEPS[-2])
print(f"ddim error ~ steps^{slope:.2f} (first order: -1)")
check(-1.3 < slope < -0.7, '-1.3 < slope < -0.7')

# %% [markdown]
# Read the table: at 15 steps, both DPM-Solver++ variants are 3.5-4% off in covariance (11-13 standard
# errors of a $2\times10^5$-sample estimate), and DDIM is 27% off; DPM-Solver++ needs 30-50 steps to
# fall to the 0.2-1% level, while DDIM's error only halves when the steps double (first order): about 5%
# at 100 steps, so a few hundred steps to reach 1%. The 15-step bias stays at a few percent when $S$ is
# scaled by 0.01 to 10 (we measured 1.8-5.7%; try it). The lesson for the rest of the course: when a
# guided sampler misses its target, first ask whether the *solver* converged (double the steps)
# before blaming the energy.
#
# ## 4. AEPO's target for a diffusion behaviour
#
# With a learned diffusion model the posterior $\mu_{0t}(\cdot|a_t)$ is not Gaussian and not known.
# AEPO approximates it by a Gaussian $\mathcal N(\hat a_0, \hat S)$ built from the noise network, and
# applies section 3 to a local expansion of $Q$ at $\hat a_0$:
#
# * **Tweedie mean:** $\hat a_0 = (a_t - \sigma_t \epsilon_\theta(a_t,t))/\alpha_t$ (exact posterior
#   mean when $\epsilon_\theta$ is exact).
# * **Tweedie covariance:** $\hat S = \tfrac{\sigma^2}{\alpha^2}(I - \sigma J)$, $J = \partial\epsilon_\theta/\partial a_t$
#   (exact posterior covariance for any behaviour when $\epsilon_\theta$ is exact; here $J = \sigma(\alpha^2S+\sigma^2I)^{-1}$,
#   and $\tfrac{\sigma^2}{\alpha^2}(I - \sigma^2(\alpha^2 S + \sigma^2 I)^{-1}) = \sigma^2 S(\alpha^2 S+\sigma^2 I)^{-1} = \tilde S$).
# * **Expansion of $Q$**, $g = \nabla Q(\hat a_0)$: first order
#   $y_t = \beta Q(\hat a_0) + \tfrac{\beta^2}{2} g^\top \hat S g$ (3a around $\hat a_0$);
#   second order: 3b with $H = -\nabla^2 Q(\hat a_0)$; sampled: $\operatorname{logmeanexp}_k \beta Q(\hat a_0 + \hat S^{1/2} z_k)$.
#
# On a Gaussian behaviour with the exact $\epsilon$, each expansion is exact for the critic it
# matches. **Check 7:** the Tweedie mean and covariance equal $\tilde m$ and $\tilde S$.

# %%
N_PTS = 200
a_pts = 1.2 * torch.randn(N_PTS, 2, generator=gen)
t_pts = sch.t_min + (1.0 - sch.t_min) * torch.rand(N_PTS, generator=gen)
a0_hat, S_hat = posterior_estimate(a_pts, t_pts, None, eps_fn, sch, covariance="tweedie", clip=None)
al_pts, si_pts = sch.alpha_sigma(t_pts)
post = [G.gaussian_posterior(a_pts[i:i + 1], m, S, float(al_pts[i]), float(si_pts[i])) for i in range(N_PTS)]
m_tilde = torch.cat([p[0] for p in post])
S_tilde = torch.stack([p[1] for p in post])
err_mean = float((a0_hat - m_tilde).abs().max())
err_cov = float((S_hat - S_tilde).abs().max())
print(f"Tweedie mean vs m~: {err_mean:.1e};  Tweedie covariance vs S~: {err_cov:.1e}")
check(err_mean < 1e-10 and err_cov < 1e-10, 'err_mean < 1e-10 and err_cov < 1e-10')

# %% [markdown]
# **Picture: Tweedie's estimate.** Each arrow goes from a noisy action $a_t$ to its Tweedie estimate
# $\hat a_0 = (a_t - \sigma_t \epsilon(a_t, t))/\alpha_t$, computed from the noise prediction alone (here the
# exact $\epsilon$ of $\mathcal N(m, S)$). The colour is the noisy behaviour's density $\mu_t(a_t)$. At small
# $t$ the arrows are short where the behaviour has mass (denoising barely moves $a_t$) and long only
# from places the behaviour never goes; at large $t$ every $a_t$ is sent close to the behaviour's mean
# $m$ (the star): the estimate knows little more than the prior there, which is why AEPO also needs
# the covariance $\hat S$ (the spread around $\hat a_0$).

# %%
u_tw = torch.linspace(-1.2, 1.2, 9)
TX, TY = torch.meshgrid(u_tw, u_tw, indexing="xy")
pts_tw = torch.stack([TX.reshape(-1), TY.reshape(-1)], 1)
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
spread = {}
for ax, t in zip(axes, (0.05, 0.3, 0.7)):
    a, s = alpha_sigma(t)
    a0_tw, _ = posterior_estimate(pts_tw, torch.full((pts_tw.shape[0],), t), None, eps_fn, sch,
                                  covariance="tweedie", clip=None)
    spread[t] = float(a0_tw.std(0).mean())  # how much the estimates still depend on a_t
    dens_t = G.mvn_log_prob(grid_pic, a * m, a**2 * S + s**2 * torch.eye(2)).exp().reshape(PX.shape)
    im = ax.imshow(dens_t.numpy(), origin="lower", extent=(-1.2, 1.2, -1.2, 1.2), cmap="Greys")
    fig.colorbar(im, ax=ax, shrink=0.85, label=r"$\mu_t(a_t)$ (per unit area)")
    d = a0_tw - pts_tw
    ax.quiver(pts_tw[:, 0], pts_tw[:, 1], d[:, 0], d[:, 1], angles="xy", scale_units="xy", scale=1,
              color="C3", width=0.004)
    ax.plot(*m, "y*", ms=14, mec="k")
    ax.set_title(f"t = {t}: spread of the estimates {spread[t]:.2f}", fontsize=9)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_xlabel("$a_{t,1}$ (arrow tips: $\\hat a_0$)")
axes[0].set_ylabel("$a_{t,2}$")
fig.suptitle(r"Tweedie's estimate: $a_t \to \hat a_0$ (arrows); star: the behaviour's mean $m$", fontsize=10)
plt.show()
check(spread[0.05] > spread[0.3] > spread[0.7], f"the estimates collapse towards m as t grows: {spread}")

# %% [markdown]
# **Check 8: first order is exact for a linear critic; second order is exact for a quadratic one.**
# `aepo_target` takes the noise prediction `eps_fn(a_t, t, s)` and the critic `q_fn(s, a)`; we turn off
# the action-box clipping (`clip=None`) because the Gaussian is not confined to $[-1,1]^2$.

# %%
q_lin = lambda s, a: c + a @ g  # noqa: E731
q_quad = lambda s, a: c + a @ g - 0.5 * ((a @ H) * a).sum(-1)  # noqa: E731
E_lin = torch.stack([G.linear_intermediate_energy(a_pts[i:i + 1], m, S, c, g, beta, float(al_pts[i]),
                                                  float(si_pts[i]))[0] for i in range(N_PTS)])
E_quad = torch.stack([G.gaussian_intermediate_energy(a_pts[i:i + 1], m, S, c, g, H, beta, float(al_pts[i]),
                                                     float(si_pts[i]))[0] for i in range(N_PTS)])
common = dict(eps_fn=eps_fn, schedule=sch, beta=beta, clip=None)
y_first_lin = aepo_target(a_pts, t_pts, None, q_fn=q_lin, covariance="tweedie", expansion="first", **common)
y_second_quad = aepo_target(a_pts, t_pts, None, q_fn=q_quad, covariance="tweedie", expansion="second", **common)
y_first_quad = aepo_target(a_pts, t_pts, None, q_fn=q_quad, covariance="tweedie", expansion="first", **common)
err_first = float((y_first_lin - E_lin).abs().max())
err_second = float((y_second_quad - E_quad).abs().max())
print(f"first order,  linear Q:    max |y - E_t| = {err_first:.1e}")
print(f"second order, quadratic Q: max |y - E_t| = {err_second:.1e}")
print(f"first order,  quadratic Q: max |y - E_t| = {float((y_first_quad - E_quad).abs().max()):.3f}  (not exact)")
check(err_first < 1e-10 and err_second < 1e-10, 'err_first < 1e-10 and err_second < 1e-10')

# %% [markdown]
# **Check 9: dropping the covariance.** With `covariance="none"`, $\hat S = 0$ and $y_t = \beta Q(\hat a_0)$.
# For a linear critic this is exactly the MSE target $\mathbb E[\beta Q|a_t]$: it falls short of $E_t$ by
# $\tfrac{\beta^2}{2}g^\top\tilde S g$, Jensen's gap. For a concave critic it is not even a bound. Completing
# the square with $\nabla Q(\tilde m) = g - H\tilde m$,
#
# $$
# E_t - \beta Q(\tilde m) = \tfrac{\beta^2}{2}\nabla Q(\tilde m)^\top(\tilde S^{-1} + \beta H)^{-1}\nabla Q(\tilde m)
#   - \tfrac12\log\det(I + \beta\tilde S H),
# $$
#
# a variance bonus where $Q$ slopes, and a curvature penalty that wins near the critic's maximum: there
# $\beta Q(\hat a_0)$ sits *above* $E_t$. (The MSE target stays below $E_t$ everywhere.)

# %%
y_none_lin = aepo_target(a_pts, t_pts, None, q_fn=q_lin, covariance="none", expansion="first", **common)
y_none_quad = aepo_target(a_pts, t_pts, None, q_fn=q_quad, covariance="none", expansion="first", **common)
gap_lin = 0.5 * beta**2 * torch.einsum("i,bij,j->b", g, S_tilde, g)
err_none_lin = float((E_lin - y_none_lin - gap_lin).abs().max())
print(f"linear: max |(E_t - y_none) - beta^2/2 g'S~g| = {err_none_lin:.1e}")
check(err_none_lin < 1e-10 and bool((y_none_lin < E_lin).all()), 'err_none_lin < 1e-10 and bool((y_none_lin < E_lin).all())')
dQ = g - m_tilde @ H  # grad Q at m~, (B, d)
bonus = 0.5 * beta**2 * torch.einsum("bi,bij,bj->b", dQ, torch.linalg.inv(torch.linalg.inv(S_tilde) + beta * H), dQ)
penalty = 0.5 * torch.logdet(torch.eye(2) + beta * S_tilde @ H)
err_none_quad = float((E_quad - y_none_quad - (bonus - penalty)).abs().max())
print(f"quadratic: max |(E_t - y_none) - (bonus - penalty)| = {err_none_quad:.1e}; "
      f"y_none above E_t at {int((y_none_quad > E_quad).sum())} of {N_PTS} points")
check(err_none_quad < 1e-9, 'err_none_quad < 1e-9')
check(bool((y_none_quad > E_quad).any()) and bool((y_none_quad < E_quad).any()), 'bool((y_none_quad > E_quad).any()) and bool((y_none_quad < E_quad).any())')  # no bound either way

# %% [markdown]
# **Check 10: the sampled estimator converges, from below.** $\operatorname{logmeanexp}$ of $K$ samples is
# itself a log of a mean, so by Jensen it is biased *low* for small $K$; the bias shrinks like $1/K$.

# %%
Ks = [1, 4, 16, 64, 256, 1024]
REP = 8  # each point repeated, to average the estimator's own noise
bias = {}
for K in Ks:
    y_K = aepo_target(a_pts.repeat(REP, 1), t_pts.repeat(REP), None, q_fn=q_quad, covariance="tweedie",
                      expansion="sampled", n_samples=K, generator=gen, **common)
    bias[K] = float((y_K - E_quad.repeat(REP)).mean())
display(Markdown(f"Mean of $y_K - E_t$ over {N_PTS} points, each {REP} times\n\n"
                 + markdown_table(["K (samples)"] + [str(K) for K in Ks], [["bias"] + [f"{bias[K]:+.4f}" for K in Ks]])))
check(bias[1] < bias[16] < bias[256] < 0, 'bias[1] < bias[16] < bias[256] < 0')  # biased low, less so with more samples
check(abs(bias[1024]) < 0.01 and abs(bias[1024]) < abs(bias[4]) / 20, 'abs(bias[1024]) < 0.01 and abs(bias[1024]) < abs(bias[4]) / 20')

# %% [markdown]
# ### The targets side by side
#
# Along a line through the behaviour's mean at $t = 0.3$: the exact $E_t$, the MSE target
# $\mathbb E[\beta Q|a_t] = \beta Q(\tilde m) - \tfrac\beta2\operatorname{tr}(H\tilde S)$, AEPO's first order
# (exact only for linear $Q$), AEPO's second order (exact here) and the `none` covariance.

# %%
t_slice = 0.3
a, s = alpha_sigma(t_slice)
direction = torch.tensor([1.0, 0.5]) / math.sqrt(1.25)
line = torch.linspace(-2.0, 2.0, 201)
pts = a * m + line[:, None] * direction
tt = torch.full((201,), t_slice)
curves = {
    r"$E_t$ (exact)": G.gaussian_intermediate_energy(pts, m, S, c, g, H, beta, a, s),
    r"AEPO 2nd order": aepo_target(pts, tt, None, q_fn=q_quad, covariance="tweedie", expansion="second", **common),
    r"AEPO 1st order": aepo_target(pts, tt, None, q_fn=q_quad, covariance="tweedie", expansion="first", **common),
    r"AEPO, covariance none": aepo_target(pts, tt, None, q_fn=q_quad, covariance="none", expansion="first", **common),
}
m_sl, S_sl = G.gaussian_posterior(pts, m, S, a, s)
curves[r"MSE target $\mathbb{E}[\beta Q|a_t]$"] = beta * q_quad(None, m_sl) - 0.5 * beta * torch.trace(H @ S_sl)
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for (name, y), ls in zip(curves.items(), ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]):
    ax.plot(line, y, ls=ls, lw=2 if name.startswith("$E") else 1.3, label=name)
ax.set_xlabel("position along the slice")
ax.set_ylabel("energy (nats)")
ax.set_title(f"Targets for the energy at t = {t_slice} (beta = {beta:g})")
ax.legend(fontsize=8)
plt.show()
E_sl = curves[r"$E_t$ (exact)"]
check(float((curves[r"AEPO 2nd order"] - E_sl).abs().max()) < 1e-10, 'float((curves[r"AEPO 2nd order"] - E_sl).abs().max()) < 1e-10')
check(bool((curves[r"MSE target $\mathbb{E}[\beta Q|a_t]$"] < E_sl).all()), 'bool((curves[r"MSE target $\\mathbb{E}[\\beta Q|a_t]$"] < E_sl).all())')

# %% [markdown]
# ### The baselines' losses, as library calls
#
# * **MSE:** `mse_energy_loss(f, q, beta)` $= \operatorname{mean}(f - \beta Q(a_0))^2$. At a fixed $a_t$, its
#   minimiser over the value $f$ is the posterior mean of $\beta Q$: the Jensen-biased target.
# * **CEP (QGPO):** `cep_loss(f, q, beta)` over $K$ support actions per state,
#   $-\sum_i \operatorname{softmax}_i(\beta Q_i)\log\operatorname{softmax}_i(f_i)$. It is minimised when
#   $\operatorname{softmax}(f) = \operatorname{softmax}(\beta Q)$, i.e. $f_i = \beta Q_i + \text{const}$ on the support;
#   with the $f$ evaluated at noisy actions and many support sets, QGPO shows its population minimiser is $E_t$.
#
# We check both stationarity conditions with autograd.

# %%
a, s = alpha_sigma(0.3)
a_t = torch.tensor([[0.5, 0.4]])
m_t, S_t = G.gaussian_posterior(a_t, m, S, a, s)
a0_post = m_t + torch.randn(N_MC, 2, generator=gen) @ torch.linalg.cholesky(S_t).T
q_post = q_quad(None, a0_post)
E_here = float(G.gaussian_intermediate_energy(a_t, m, S, c, g, H, beta, a, s)[0])
grads = {}
for name, value in [("E[beta Q | a_t]", float(beta * q_post.mean())), ("E_t", E_here)]:
    f = torch.full((N_MC,), value, requires_grad=True)
    (dfl,) = torch.autograd.grad(G.mse_energy_loss(f, q_post, beta), f)
    grads[name] = float(dfl.sum())  # derivative of the loss along a constant shift of f
print("d MSE loss / d f at:", {k: f"{v:+.2e}" for k, v in grads.items()})
check(abs(grads["E[beta Q | a_t]"]) < 1e-9 and grads["E_t"] > 0.01, 'abs(grads["E[beta Q | a_t]"]) < 1e-9 and grads["E_t"] > 0.01')  # E_t is not the MSE minimiser

K_SUP = 16
support = m + torch.randn(8, K_SUP, 2, generator=gen) @ torch.linalg.cholesky(S).T  # 8 states x 16 actions
q_sup = q_quad(None, support.reshape(-1, 2)).reshape(8, K_SUP)
f_opt = (beta * q_sup + torch.randn(8, 1, generator=gen)).requires_grad_(True)  # beta Q + a per-state constant
(g_opt,) = torch.autograd.grad(G.cep_loss(f_opt, q_sup, beta), f_opt)
f_half = (0.5 * beta * q_sup).requires_grad_(True)  # a "cooler" energy: not optimal
(g_half,) = torch.autograd.grad(G.cep_loss(f_half, q_sup, beta), f_half)
print(f"CEP: |grad| at f = beta Q + const: {float(g_opt.abs().max()):.1e}; at f = beta Q / 2: "
      f"{float(g_half.abs().max()):.1e}")
check(float(g_opt.abs().max()) < 1e-12 and float(g_half.abs().max()) > 1e-3, 'float(g_opt.abs().max()) < 1e-12 and float(g_half.abs().max()) > 1e-3')

# %% [markdown]
# ## Exploring $\beta$: a slider over precomputed guided samples
#
# For a grid of $\beta$ we precompute, once, the exact $\pi_\beta$ density on a grid and guided
# samples (exact $\nabla E_t$, DPM-Solver++ 3M, 30 steps). The slider only redraws. Where should the mean
# go? Differentiating $m_\pi = (I + \beta S H)^{-1}(m + \beta S g)$ at $\beta = 0$:
# $\tfrac{d m_\pi}{d\beta} = S(g - Hm) = S\nabla Q(m)$, the critic's gradient preconditioned by the
# behaviour's covariance; and $\tfrac{d}{d\beta}\mathbb E_{\pi_\beta}[Q] = \operatorname{Var}_{\pi_\beta}[Q] \ge 0$,
# so the mean reward must rise with $\beta$.

# %%
BETAS = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
u = torch.linspace(-1.2, 1.0, 121)
GX, GY = torch.meshgrid(u, u, indexing="xy")
grid_pts = torch.stack([GX.reshape(-1), GY.reshape(-1)], 1)
x_T_w = torch.randn(N_WIDGET, 2, generator=gen)
pre = {}
for b_ in BETAS:
    m_b, S_b = G.gaussian_target_policy(m, S, g, H, b_)

    def guid_b(x, t, s, b_=b_):
        a_, s_ = alpha_sigma(float(t[0]))
        return G.gaussian_intermediate_energy_grad(x, m, S, c, g, H, b_, a_, s_)

    xs = sample(eps_fn, x_T_w, schedule=sch, n_steps=30, solver="dpmpp3m", guidance=guid_b, guidance_scale=1.0)
    pre[b_] = dict(density=G.mvn_log_prob(grid_pts, m_b, S_b).exp().reshape(GX.shape).numpy(),
                   samples=xs.numpy(), m_pi=m_b, S_pi=S_b, mean_q=float(q_quad(None, xs).mean()),
                   z_mean=moment_errors(xs, m_b, S_b)[0])


def draw(b_, ax):
    """Plot the precomputed exact pi_beta (contours) and guided samples for one beta."""
    r = pre[b_]
    ax.scatter(*pre[0.0]["samples"][:1500].T, s=2, c="0.8", rasterized=True)
    ax.scatter(*r["samples"][:1500].T, s=2, c="C1", alpha=0.5, rasterized=True)
    ax.contour(GX, GY, r["density"], levels=4, colors="k", linewidths=0.8)
    q_star = torch.linalg.solve(H, g)  # the critic's maximiser
    ax.plot(*q_star, "k*", ms=10)
    ax.set_title(f"beta = {b_:g}: mean Q = {r['mean_q']:.3f}", fontsize=9)
    ax.set_xlim(-1.2, 1.0)
    ax.set_ylim(-1.2, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("$a_1$")
    ax.set_ylabel("$a_2$")


# the static figure: a rendered page shows this even without a kernel
fig, axes = plt.subplots(1, 3, figsize=(11, 3.9), layout="constrained")
for b_, ax in zip([0.0, 1.0, 4.0], axes):
    draw(b_, ax)
fig.suptitle("grey: behaviour samples; orange: guided samples; contours: exact pi; star: argmax Q", fontsize=9)
plt.show()


# %%
def show(beta_value):
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    draw(beta_value, ax)
    plt.show()


widgets.interact(show, beta_value=widgets.SelectionSlider(options=BETAS, value=2.0, description="beta"));

# %%
# The trend the slider shows, asserted.
mean_q = [pre[b_]["mean_q"] for b_ in BETAS]
print("beta:", BETAS, "\nmean Q of guided samples:", [round(v, 3) for v in mean_q])
print("guided mean vs m_pi, max over beta (SE):", round(max(pre[b_]["z_mean"] for b_ in BETAS), 2))
check(all(q1 < q2 for q1, q2 in zip(mean_q, mean_q[1:])), "mean reward rises with beta")
check(max(pre[b_]["z_mean"] for b_ in BETAS) < 4.0, "the guided mean is the exact m_pi at every beta")
step = pre[0.5]["m_pi"] - m
direction = S @ (g - H @ m)
cosine = float(step @ direction / (step.norm() * direction.norm()))
print(f"cosine between m_pi(0.5) - m and S grad Q(m): {cosine:.3f}")
check(cosine > 0.95, 'cosine > 0.95')

# %% [markdown]
# ## The library's demo
#
# The main checks of this chapter also run as one command, which prints a PASS/FAIL table and writes
# `figures/closed_form_guidance.png` (guided samples for several guidance scales against the exact
# $\pi$) and `figures/closed_form_checks.json` (the numbers):
#
# ```bash
# aepo-lite demo --out figures --scale full    # or, in Python: aepo_lite.course.demo.run_demo("figures")
# ```
#
# ## Exercises
#
# Each exercise has a cell for your answer (it starts as `None`), a solution you can unfold, and a
# cell that checks your answer against an exact reference and raises an error if it is off. An
# unanswered exercise is reported, not failed.
#
# ### Exercise 1. Guidance scale vs temperature
#
# For the *linear* critic, show on paper that $w\,\nabla E_t^{(\beta)} = \nabla E_t^{(w\beta)}$, so the
# guidance scale is exactly a rescaled $\beta$. Then, for the quadratic critic, sample with
# `guidance_scale=2` at $\beta = 3$ (use `exact_guidance`, `x_T` and 50 `dpmpp3m` steps as in Check 6) and
# compare the sample mean with the mean of `gaussian_target_policy(m, S, g, H, 6.0)`. Is $w = 2$ the
# same as $\beta = 6$? (Hint: is $\nabla E_t$ linear in $\beta$ when $H \neq 0$?)
#
# <details><summary><b>Solution</b> (click to unfold)</summary>
#
# For a linear critic, $\nabla E_t = \beta\alpha S(\alpha^2 S + \sigma^2 I)^{-1} g$ is linear in $\beta$, so
# $w\nabla E_t^{(\beta)} = \nabla E_t^{(w\beta)}$. For the quadratic critic it is not: $\beta$ enters
# $S_\pi = (S^{-1} + \beta H)^{-1}$ nonlinearly, so doubling the guidance is not doubling $\beta$. Here
# the $w = 2$ samples overshoot: their mean is about 0.09 away from $m_\pi(\beta = 6)$, further along
# the critic's slope.
#
# ```python
# x_w2 = sample(eps_fn, x_T, schedule=sch, n_steps=50, solver="dpmpp3m", guidance=exact_guidance,
#               guidance_scale=2.0)
# mean_w2 = x_w2.mean(0)
# m_beta6, _ = G.gaussian_target_policy(m, S, g, H, 6.0)
# w2_same_as_beta6 = bool((mean_w2 - m_beta6).norm() < 0.01)  # False
# ```
# </details>

# %%
# Exercise 1: your answer
mean_w2 = None  # the sample mean of guided samples at beta = 3, guidance_scale = 2: a tensor of shape (2,)
w2_same_as_beta6 = None  # True or False

# %%
# Exercise 1: the check. Reference: the sampler's exact output law at w = 2 (the affine trick above).
if mean_w2 is None or w2_same_as_beta6 is None:
    print("Exercise 1 is not answered yet (fill in the cell above; the solution is folded above it).")
else:
    pts3 = torch.cat([torch.zeros(1, 2), torch.eye(2)])
    out3 = sample(eps_fn, pts3, schedule=sch, n_steps=50, solver="dpmpp3m", guidance=exact_guidance,
                  guidance_scale=2.0)
    A3 = (out3[1:] - out3[0]).T
    se3 = (torch.diag(A3 @ A3.T) / x_T.shape[0]).sqrt()  # standard error of a sample mean of x_T.shape[0] draws
    z3 = float(((torch.as_tensor(mean_w2) - out3[0]) / se3).abs().max())
    gap6 = float((out3[0] - G.gaussian_target_policy(m, S, g, H, 6.0)[0]).norm())
    check(z3 < 4.5, f"your mean_w2 is {z3:.1f} standard errors from the exact w = 2 mean {out3[0].numpy().round(4)}")
    check(w2_same_as_beta6 == (gap6 < 0.01), f"w = 2 and beta = 6 give means {gap6:.3f} apart: are they the same?")
    print(f"Exercise 1: correct (w = 2 lands {gap6:.3f} away from m_pi(beta = 6)).")

# %% [markdown]
# ### Exercise 2. The MSE energy's policy
#
# The MSE target for the quadratic critic is $\beta Q(\tilde m) - \tfrac\beta2\operatorname{tr}(H\tilde S)$. Write its
# gradient in $a_t$ (or let autograd do it) and sample with it instead of $\nabla E_t$ ($w = 1$, `x_T`, 50
# `dpmpp3m` steps). Which way is the sample mean off from $m_\pi$, and by how much?
#
# <details><summary><b>Solution</b> (click to unfold)</summary>
#
# $\tilde S$ does not depend on $a_t$, so the trace term is a constant and the gradient is
# $\beta\, \big(\partial\tilde m/\partial a_t\big)^\top \nabla Q(\tilde m) = \beta\alpha S(\alpha^2 S + \sigma^2 I)^{-1}(g - H\tilde m)$. It lacks
# the curvature correction that $E_t$ has (the $\det$ and the $(\tilde S^{-1} + \beta H)^{-1}$ of 3b): the MSE
# energy keeps pushing up the critic's slope, and its samples **overshoot** $m_\pi$, by about 0.1 here,
# with a smaller covariance than $S_\pi$.
#
# ```python
# def mse_guidance(x, t, s):
#     a, sg = alpha_sigma(float(t[0]))
#     x = x.detach().requires_grad_(True)
#     with torch.enable_grad():
#         m_t, _ = G.gaussian_posterior(x, m, S, a, sg)
#         (grad,) = torch.autograd.grad(beta * q_quad(None, m_t).sum(), x)
#     return grad
#
# x_mse = sample(eps_fn, x_T, schedule=sch, n_steps=50, solver="dpmpp3m", guidance=mse_guidance, guidance_scale=1.0)
# mean_mse = x_mse.mean(0)
# mse_overshoots = bool(((mean_mse - m) @ (m_pi - m)) > ((m_pi - m) @ (m_pi - m)))  # True
# ```
# </details>

# %%
# Exercise 2: your answer
mean_mse = None  # the sample mean with the MSE energy's guidance: a tensor of shape (2,)
mse_overshoots = None  # True if the mean lands beyond m_pi (further from m along m_pi - m), else False

# %%
# Exercise 2: the check. Reference: the closed-form gradient of the MSE target (not autograd) and the
# sampler's exact output law (it is affine in x_T here too).
if mean_mse is None or mse_overshoots is None:
    print("Exercise 2 is not answered yet (fill in the cell above; the solution is folded above it).")
else:
    def _mse_guidance_closed_form(x, t, s):
        a, sg = alpha_sigma(float(t[0]))
        K = a * S @ torch.linalg.inv(a**2 * S + sg**2 * torch.eye(2))  # d m~ / d a_t (symmetric)
        m_t, _ = G.gaussian_posterior(x, m, S, a, sg)
        return beta * (g - m_t @ H) @ K

    pts3 = torch.cat([torch.zeros(1, 2), torch.eye(2)])
    out3 = sample(eps_fn, pts3, schedule=sch, n_steps=50, solver="dpmpp3m", guidance=_mse_guidance_closed_form,
                  guidance_scale=1.0)
    A3 = (out3[1:] - out3[0]).T
    se3 = (torch.diag(A3 @ A3.T) / x_T.shape[0]).sqrt()
    z3 = float(((torch.as_tensor(mean_mse) - out3[0]) / se3).abs().max())
    d = m_pi - m
    truth = bool(((out3[0] - m) @ d) > (d @ d))
    check(z3 < 4.5, f"your mean_mse is {z3:.1f} standard errors from the exact mean {out3[0].numpy().round(4)}")
    check(mse_overshoots == truth, "look again at where the mean lands along m_pi - m")
    print(f"Exercise 2: correct (the MSE energy's mean is {float((out3[0] - m_pi).norm()):.3f} from m_pi).")

# %% [markdown]
# ### Exercise 3. Another solver
#
# Add `dpm2` (QGPO's singlestep second-order solver) to the convergence table: its relative covariance
# error at 15 steps, with `sampler_law`. Where does it sit between `ddim` and `dpmpp2m`?
#
# <details><summary><b>Solution</b> (click to unfold)</summary>
#
# ```python
# b, C, _ = sampler_law("dpm2", 15)
# rel_cov_dpm2_15 = float(torch.linalg.norm(C - cov_end) / torch.linalg.norm(cov_end))  # about 0.21
# dpm2_between = table["dpmpp2m", 15]["rel_cov"] < rel_cov_dpm2_15 < table["ddim", 15]["rel_cov"]  # True
# ```
# About 21% at 15 steps: better than DDIM's 27%, far worse than DPM-Solver++ 2M's 4%. A singlestep
# second-order solver spends two network evaluations per step, so at a fixed budget of 15 it takes
# fewer, larger steps; by 50 it is near 2%.
# </details>

# %%
# Exercise 3: your answer
rel_cov_dpm2_15 = None  # relative covariance error of dpm2 at 15 steps (a fraction, not %)
dpm2_between = None  # True if it lies between dpmpp2m's and ddim's at 15 steps

# %%
# Exercise 3: the check. Reference: a Monte Carlo estimate (200k samples), which cannot be as exact
# as the affine trick but must agree with it to a few percent of the error itself.
if rel_cov_dpm2_15 is None or dpm2_between is None:
    print("Exercise 3 is not answered yet (fill in the cell above; the solution is folded above it).")
else:
    x_chk3 = sample(eps_fn, torch.randn(200_000, 2, generator=torch.Generator().manual_seed(3)), schedule=sch,
                    n_steps=15, solver="dpm2", guidance=exact_guidance, guidance_scale=1.0)
    rel_mc = float(torch.linalg.norm(torch.cov(x_chk3.T) - cov_end) / torch.linalg.norm(cov_end))
    check(abs(rel_cov_dpm2_15 - rel_mc) < 0.1 * rel_mc,
          f"your error {rel_cov_dpm2_15:.4f} vs {rel_mc:.4f} measured by Monte Carlo (is it a fraction, at 15 steps?)")
    truth = table["dpmpp2m", 15]["rel_cov"] < rel_mc < table["ddim", 15]["rel_cov"]
    check(dpm2_between == truth, "compare with the dpmpp2m and ddim rows of the table at 15 steps")
    print(f"Exercise 3: correct (dpm2 at 15 steps: {100 * rel_mc:.1f}% by Monte Carlo).")

# %% [markdown]
# ## Summary
#
# * The exact guidance for $\pi \propto \mu e^{\beta Q}$ is $\nabla_{a_t} E_t$ with
#   $E_t = \log\mathbb E_{\mu_{0t}}[e^{\beta Q}]$; it holds for any behaviour (checked on a finite data set).
# * Regressing on $\beta Q$ learns $\mathbb E[\beta Q|a_t] \le E_t$ (Jensen), an $a_t$-dependent error.
# * For a Gaussian behaviour the posterior is Gaussian and $E_t$ has a closed form: a constant gradient
#   field for a linear critic; for a quadratic one, two routes that agree to $\sim10^{-12}$, and Monte Carlo
#   agrees within its error.
# * A sampler with the exact guidance returns $\pi$ up to **solver** error: a few percent in covariance at
#   15 steps for every solver here; DPM-Solver++ gets below 0.5% by 50 steps, first-order solvers need hundreds.
# * AEPO's target uses Tweedie's mean and covariance and a Taylor expansion of $Q$: with an exact noise
#   model it is exact to first order for linear critics and to second order for quadratic ones; without
#   the covariance it is the Jensen-biased MSE target (linear critic), or no bound at all (curved critic).
#
# ## Questionnaire
#
# 1. Why does $Z(s)$ not matter for guidance?
# 2. What is $E_0$? What is $E_t$ as $t \to 1$, and why?
# 3. Which term of the linear-critic $E_t$ does the MSE target miss, and why does it not change the guidance there?
# 4. Why does the library compute route 2 without inverting $\tilde S$?
# 5. How were we able to measure the sampler's covariance error with no Monte Carlo noise at all?
# 6. What does `covariance="none"` reduce AEPO to? Why can it land above $E_t$ for a concave critic?
# 7. Why is the sampled estimator biased low for small $K$?
# 8. What is the minimiser of the CEP loss on one support set, and why is the additive constant harmless?

# %%
print(f"chapter executed in {time.time() - T_START:.1f} s at scale {SCALE}")
