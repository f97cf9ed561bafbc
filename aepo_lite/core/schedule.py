"""The linear VP-SDE noise schedule of docs/derivation.md section 1 (QGPO's schedule).

    log alpha_t = -(t^2 / 4) (b1 - b0) - (t / 2) b0,   sigma_t = sqrt(1 - alpha_t^2),
    a_t = alpha_t a_0 + sigma_t eps,   t in [t_min, 1].

The half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` is what DPM-Solver steps in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aepo_lite._checks import check_scalar, check_time, check_tensor

__all__ = ["VPSchedule"]


@dataclass(frozen=True)
class VPSchedule:
    """Linear VP-SDE schedule. All methods take and return tensors of any shape."""

    b0: float = 0.1  # beta_min of the linear VP-SDE
    b1: float = 20.0  # beta_max of the linear VP-SDE
    t_min: float = 1e-3  # smallest diffusion time used for training and sampling
    t_max: float = 1.0  # largest diffusion time

    def __post_init__(self):
        check_scalar("b0", self.b0, low=0.0, low_open=True)
        check_scalar("b1", self.b1, low=self.b0, low_open=True)
        check_scalar("t_min", self.t_min, low=0.0, low_open=True)
        check_scalar("t_max", self.t_max, low=self.t_min, low_open=True)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t, same shape as ``t``."""
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # sqrt(1 - alpha^2) computed as sqrt(-expm1(2 log alpha)) to stay accurate near t = 0
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in one call."""
        la = self.log_alpha(t)
        return torch.exp(la), torch.sqrt(-torch.expm1(2.0 * la))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR lambda_t = log alpha_t - log sigma_t (decreasing in t)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`lambda_`: the time with half log-SNR ``lam`` (closed form)."""
        # log alpha = -0.5 log(1 + exp(-2 lam)); solve the quadratic in t.
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam)
        db = self.b1 - self.b0
        return (-self.b0 + torch.sqrt(self.b0**2 - 4.0 * db * log_alpha)) / db

    def check_t(self, t: torch.Tensor, name: str = "t") -> torch.Tensor:
        """Raise a ValueError if any time is outside [t_min, t_max]."""
        return check_time(name, t, self.t_min, self.t_max)

    def sample_t(self, n: int, *, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """Times uniform on [t_min, t_max], shape (n,)."""
        u = torch.rand(n, generator=generator, dtype=dtype,
                       device=generator.device if generator is not None else device)  # the generator's device
        return (self.t_min + (self.t_max - self.t_min) * u).to(device)

    def diffuse(self, a0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward process. a0 (B, d), t (B,) -> (a_t (B, d), eps (B, d))."""
        check_tensor("a0", a0, ndim=2)
        check_tensor("t", t, shape=(a0.shape[0],))
        if eps is None:
            eps = torch.randn(a0.shape, generator=generator, dtype=a0.dtype,
                              device=generator.device if generator is not None else a0.device).to(a0.device)
        alpha, sigma = self.alpha_sigma(t)
        return alpha[:, None] * a0 + sigma[:, None] * eps, eps

    def lambda_grid(self, n_steps: int, t_start: float | None = None, t_end: float | None = None,
                    *, device=None, dtype=torch.float64) -> torch.Tensor:
        """Times from t_start (default t_max) to t_end (default t_min), uniform in lambda, shape (n_steps + 1,)."""
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps: expected a positive integer, got {n_steps!r}")
        t_start = self.t_max if t_start is None else t_start
        t_end = self.t_min if t_end is None else t_end
        ends = torch.tensor([t_start, t_end], dtype=torch.float64)
        lam = self.lambda_(ends)
        grid = torch.linspace(float(lam[0]), float(lam[1]), n_steps + 1, dtype=torch.float64)
        t = self.t_of_lambda(grid)
        t[0], t[-1] = t_start, t_end
        return t.to(device=device, dtype=dtype)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"VPSchedule(b0={self.b0}, b1={self.b1}, t_min={self.t_min}, t_max={self.t_max})"
