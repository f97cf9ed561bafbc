"""Toy 2D energy tasks and their exact references (docs/derivation.md section 6).

The six tasks of the QGPO paper's 2D experiments: ``swissroll``, ``8gaussians``, ``moons``,
``rings``, ``checkerboard``, ``2spirals``. Each is a sampler of behaviour points x ~ mu (2D) and
an energy-like reward e(x) in [0, 1]. The point sets and reward labels follow the published
definitions (the FFJORD toy generators with QGPO's energies); our code rescales every task by
1/4 so that the data lie in the action box [-1, 1]^2, and writes each reward as a function of x
(where the published code attaches a label to the generating component, e.g. which ring or which
moon, we give the label of the nearest component). A user adds a task with :func:`register_task`.

Exact references, for data x^j ~ mu (N points) and beta >= 0:

- target samples of pi ∝ mu exp(beta e): resample the data with weights softmax_j(beta e(x^j));
- the intermediate energy on any points x_t, batched and chunked,
      E_t(x_t) = log sum_j softmax_j(-||x_t - alpha_t x^j||^2 / (2 sigma_t^2)) exp(beta e(x^j));
- a distance between point sets (sliced Wasserstein-2) and its noise floor;
- the error of a learned f against E_t on a grid, up to an additive constant per t.

Everything takes an explicit ``torch.Generator`` or seed and works on any device.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from aepo_lite._checks import check_finite, check_scalar, check_tensor
from aepo_lite.core.schedule import VPSchedule

__all__ = [
    "ToyTask", "register_task", "get_task", "task_names", "TOY_TASKS", "SCALE",
    "target_samples", "exact_intermediate_energy", "exact_posterior_average", "exact_energy_gradient", "make_grid", "sliced_wasserstein", "distance_floor", "expected_floor", "FLOOR_PAIRS",
    "energy_error", "energy_error_cross", "gradient_error", "check_count", "check_beta", "memory_budget_bytes",
]

SCALE = 0.25  # every built-in task is the published point set times SCALE (so it fits in [-1, 1]^2)
Sampler = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> (n, 2) float64 on the CPU
Reward = Callable[[torch.Tensor], torch.Tensor]  # x (B, 2) -> e(x) (B,) in [0, 1]


# ----------------------------------------------------------------------------- memory guards
def memory_budget_bytes() -> int:
    """Half of the machine's physical memory: the most one toy array may take."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 * 2**30
    return int(total) // 2


def check_count(name: str, n, *, bytes_per_item: int = 8 * 2, low: int = 1) -> int:
    """A positive integer count whose array (n * bytes_per_item bytes) fits in memory, else a ValueError."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            if float(n) != int(n):
                raise ValueError
            n = int(n)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name}: expected an integer, got {n!r}") from None
    if n < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {n}")
    need, budget = n * bytes_per_item, memory_budget_bytes()
    if need > budget:
        raise ValueError(f"{name}: {n} needs about {need / 2**30:.1f} GiB, more than the "
                         f"{budget / 2**30:.1f} GiB this machine allows; use a smaller {name}")
    return n


def check_beta(beta) -> float:
    """beta >= 0 and finite."""
    return check_scalar("beta", beta, low=0.0)


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class ToyTask:
    """A 2D task: ``sample(n)`` draws behaviour points, ``reward(x)`` is e(x) in [0, 1]."""

    name: str
    sampler: Sampler
    reward_fn: Reward
    description: str = ""

    def sample(self, n: int, *, generator: torch.Generator | None = None, seed: int | None = None,
               device=None, dtype=torch.float32) -> torch.Tensor:
        """n behaviour points (n, 2). Seeded by ``generator`` or ``seed`` (default seed 0)."""
        n = check_count("n", n, bytes_per_item=2 * 8 * 4)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        x = self.sampler(n, generator)
        check_tensor(f"{self.name} sampler output", x, shape=(n, 2))
        return x.to(device=device, dtype=dtype)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """e(x): (B, 2) -> (B,) in [0, 1], same device and dtype as x."""
        check_tensor("x", x, ndim=2)
        if x.shape[1] != 2:
            raise ValueError(f"x: expected points of shape (B, 2), got {tuple(x.shape)}")
        e = self.reward_fn(x)
        check_tensor(f"{self.name} reward output", e, shape=(x.shape[0],))
        return e.to(dtype=x.dtype)


TOY_TASKS: dict[str, ToyTask] = {}


def register_task(name: str, sampler: Sampler, reward: Reward, description: str = "",
                  overwrite: bool = False) -> ToyTask:
    """Add a task: ``sampler(n, generator) -> (n, 2)`` and ``reward(x (B, 2)) -> (B,)`` in [0, 1].

    The reward is checked on a few sampled points.
    """
    if not isinstance(name, str) or not name or any(c in name for c in " ,/\\"):
        raise ValueError(f"name: expected a non-empty task name without spaces, commas or slashes, got {name!r}")
    if name in TOY_TASKS and not overwrite:
        raise ValueError(f"name: task {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(sampler) or not callable(reward):
        raise ValueError("sampler, reward: expected two callables")
    task = ToyTask(name, sampler, reward, description)
    x = task.sample(64, seed=0, dtype=torch.float64)
    e = task.reward(x)
    check_finite(f"{name} reward", e)
    if bool((e < 0).any()) or bool((e > 1).any()):
        raise ValueError(f"reward: expected values in [0, 1], got values in [{float(e.min()):.3g}, {float(e.max()):.3g}]")
    TOY_TASKS[name] = task
    return task


def task_names() -> list[str]:
    return list(TOY_TASKS)


def get_task(name: str | ToyTask) -> ToyTask:
    """The registered task called ``name``; an unknown name lists the known ones."""
    if isinstance(name, ToyTask):
        return name
    try:
        return TOY_TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"task: unknown toy task {name!r}; known tasks: {', '.join(task_names())}") from None


def _u(n, g, *shape):
    return torch.rand((n, *shape), generator=g, dtype=torch.float64)


def _n(n, g, *shape):
    return torch.randn((n, *shape), generator=g, dtype=torch.float64)


def _swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * _u(n, g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], -1) + _n(n, g, 2)  # noise 1.0, as sklearn
    return x / 5 * SCALE


def _swissroll_reward(x):  # published: ||x||^2 / 9 in the /5 units, clipped to [0, 1] here
    return ((x / SCALE) ** 2).sum(-1).div(9.0).clamp(0, 1)


_8G_ANGLES = math.pi / 2 + math.pi / 4 * torch.arange(8, dtype=torch.float64)  # counter-clockwise from (0, 1)


def _8gaussians(n, g):
    idx = torch.randint(0, 8, (n,), generator=g)
    c = 4.0 * torch.stack([torch.cos(_8G_ANGLES), torch.sin(_8G_ANGLES)], -1)[idx]
    return (c + 0.5 * _n(n, g, 2)) / 1.414 * SCALE


def _8gaussians_reward(x):  # published: index of the generating centre / 7; here: of the nearest centre
    ang = torch.atan2(x[:, 1], x[:, 0]) - math.pi / 2
    k = torch.round(ang / (math.pi / 4)).remainder(8)
    return k / 7.0


def _moon_arcs(m: int = 256):
    th = torch.linspace(0, math.pi, m, dtype=torch.float64)
    outer = torch.stack([torch.cos(th), torch.sin(th)], -1)
    inner = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], -1)
    shift = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    return (outer * 2 + shift) * SCALE, (inner * 2 + shift) * SCALE


def _moons(n, g):
    lab = torch.randint(0, 2, (n,), generator=g)
    th = math.pi * _u(n, g)
    outer = torch.stack([torch.cos(th), torch.sin(th)], -1)
    inner = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], -1)
    x = torch.where(lab[:, None] == 1, inner, outer) + 0.1 * _n(n, g, 2)
    return (x * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)) * SCALE


_MOON_ARCS = _moon_arcs()  # (outer, inner), each 256 points evenly spaced on a half circle
_MOON_CIRCLES = (((-1.0, -0.2), 0.0), ((1.0, 0.8), math.pi))  # (centre, angle of the arc's first point), radius 2


def _arc_distance(x: torch.Tensor, arc: torch.Tensor, centre, start: float) -> torch.Tensor:
    """Distance from each row of ``x`` to the nearest of ``arc``'s points, which lie evenly spaced on a half circle
    (``centre``, radius 2, times SCALE) from the angle ``start``: the distance to a point of the circle grows with
    the angle between them, so the point nearest in angle is the nearest; O(n) where all m distances cost O(n m)."""
    m = arc.shape[0]
    v = x / SCALE - torch.tensor(centre, dtype=x.dtype, device=x.device)
    psi = torch.remainder(torch.atan2(v[:, 1], v[:, 0]) - start + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    # beyond the ends: the nearer end by angle (the arc spans pi, so the split is at -pi/2)
    psi = torch.where(psi < -math.pi / 2, torch.full_like(psi, math.pi), psi.clamp(min=0.0))
    k = torch.round(psi / (math.pi / (m - 1))).long()  # psi in [0, pi] here
    return (x - arc[k]).norm(dim=-1)


def _moons_reward(x):  # published: 1 on the inner moon; here: 1 where the inner arc (256 points) is the nearer one
    (outer, inner), ((c_out, s_out), (c_in, s_in)) = (tuple(a.to(x) for a in _MOON_ARCS), _MOON_CIRCLES)
    return (_arc_distance(x, inner, c_in, s_in) < _arc_distance(x, outer, c_out, s_out)).to(x.dtype)


_RING_RADII = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)  # published: (1, .75, .5, .25) * 3
_RING_REWARD = torch.tensor([0.667, 0.333, 1.0, 0.0], dtype=torch.float64)


def _rings(n, g):
    ring = torch.randint(0, 4, (n,), generator=g)
    th = 2 * math.pi * _u(n, g)
    r = _RING_RADII[ring]
    x = torch.stack([r * torch.cos(th), r * torch.sin(th)], -1) + 0.08 * _n(n, g, 2)
    return x * SCALE


def _rings_reward(x):  # published labels per ring; the boundaries are the midpoints between rings
    r = (x / SCALE).norm(dim=-1)
    ring = torch.bucketize(-r, -torch.tensor([2.625, 1.875, 1.125], dtype=x.dtype, device=x.device))
    return _RING_REWARD.to(x)[ring]


def _checkerboard(n, g):
    x1 = _u(n, g) * 4 - 2
    x2 = _u(n, g) - torch.randint(0, 2, (n,), generator=g).double() * 2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], -1) * 2 * SCALE


def _checkerboard_reward(x):  # published: 1 on the columns 0 < x <= 2 and x <= -2 (in the *2 units)
    u = x[:, 0] / SCALE
    return (((u > 0) & (u <= 2)) | (u <= -2)).to(x.dtype)


def _2spirals(n, g):
    h = n // 2
    t = torch.sqrt(_u(n - h, g)) * 3 * math.pi  # 540 degrees
    p = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], -1) + 0.5 * _u(n - h, g, 2)
    x = torch.cat([p, -p[:h]], 0)[torch.randperm(n, generator=g)] / 3 + 0.1 * _n(n, g, 2)
    return x * SCALE


def _2spirals_reward(x):  # published: clip(1 - t / 10) for spiral parameter t; here t ≈ 3 ||x|| (its radius)
    return (1 - 3 * (x / SCALE).norm(dim=-1) / 10).clamp(0, 1)


for _name, _s, _r, _d in [
    ("swissroll", _swissroll, _swissroll_reward, "Swiss roll; reward grows with the squared radius"),
    ("8gaussians", _8gaussians, _8gaussians_reward, "8 Gaussians on a circle; reward = centre index / 7"),
    ("moons", _moons, _moons_reward, "two moons; reward 1 on the lower (inner) moon, 0 on the other"),
    ("rings", _rings, _rings_reward, "4 concentric rings; rewards 0.667, 0.333, 1, 0 from the outside in"),
    ("checkerboard", _checkerboard, _checkerboard_reward, "checkerboard; reward 1 on two of the four columns"),
    ("2spirals", _2spirals, _2spirals_reward, "two spirals; reward falls linearly with the radius"),
]:
    register_task(_name, _s, _r, _d)


# ----------------------------------------------------------------------------- exact references
def target_samples(task: str | ToyTask, beta: float, n: int, *, pool: torch.Tensor | None = None,
                   pool_size: int = 100_000, generator: torch.Generator | None = None, seed: int | None = None,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """n exact samples of pi ∝ mu exp(beta e): resample a pool x^j ~ mu with weights softmax_j(beta e(x^j)).

    The pool is ``pool`` (M, 2) if given, else ``pool_size`` fresh behaviour points. Returns (n, 2).
    """
    task = get_task(task)
    beta = check_beta(beta)
    n = check_count("n", n, bytes_per_item=2 * 8 * 2)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if pool is None:
        pool_size = check_count("pool_size", pool_size, bytes_per_item=2 * 8 * 4)
        pool = task.sample(pool_size, generator=generator, dtype=torch.float64)
    check_tensor("pool", pool, ndim=2)
    w = torch.softmax(beta * task.reward(pool.double()).cpu(), 0)
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    return pool.cpu()[idx].to(device=device, dtype=dtype)


def _rows_per_chunk(n_data: int, max_bytes: int) -> int:
    return max(1, max_bytes // (4 * max(n_data, 1)))


def exact_intermediate_energy(x_t: torch.Tensor, t: float, data: torch.Tensor, rewards: torch.Tensor, beta: float,
                              schedule: VPSchedule | None = None, *, chunk_bytes: int = 8 * 2**20,
                              return_log_density: bool = False):
    """E_t(x_t) = log sum_j softmax_j(-||x_t - alpha_t x^j||^2 / (2 sigma_t^2)) exp(beta e(x^j)).

    x_t (M, 2) query points, data (N, 2), rewards (N,) = e(x^j). The N x M kernel is formed in
    chunks of rows (at most ``chunk_bytes`` each) with one exp per entry: for each row the logits
    are shifted by their max, then E_t = log(w @ exp(beta e - max)) - log(sum w) + max(beta e).
    The kernel is computed in float32 unless x_t is float64 (exact checks).
    Returns E_t (M,) in the dtype of x_t; with ``return_log_density`` also log mu_t(x_t) (M,), the
    density of the empirical behaviour diffused to time t.
    """
    schedule = schedule or VPSchedule()
    check_tensor("x_t", x_t, ndim=2)
    check_tensor("data", data, ndim=2)
    check_tensor("rewards", rewards, shape=(data.shape[0],))
    if x_t.shape[1] != data.shape[1]:
        raise ValueError(f"x_t: expected {data.shape[1]} columns to match data, got {x_t.shape[1]}")
    beta = check_beta(beta)
    t = check_scalar("t", t, low=schedule.t_min - 1e-12, high=schedule.t_max + 1e-12)
    check_count("x_t rows", x_t.shape[0], bytes_per_item=8 * 4)
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(tt))
    dev, out_dtype = x_t.device, x_t.dtype
    wd = torch.float64 if x_t.dtype == torch.float64 else torch.float32  # the kernel's working dtype
    X = data.to(device=dev, dtype=torch.float64) * alpha
    be = beta * rewards.to(device=dev, dtype=torch.float64)
    be_max = float(be.max())
    # logits_j(q) = -||q - X_j||^2 / (2 s^2) = (q . X_j - ||X_j||^2 / 2) / s^2 - ||q||^2 / (2 s^2);
    # the last term is one constant per row: it cancels in E_t and is added back for log mu_t.
    Xs = (X / sigma**2).to(wd)  # (N, d)
    bias = (-(X**2).sum(-1) / (2 * sigma**2)).to(wd)  # (N,)
    V = torch.stack([torch.exp(be - be_max), torch.ones_like(be)], -1).to(wd)  # (N, 2): [exp(beta e - max), 1]
    N, d = X.shape
    rows = _rows_per_chunk(N, chunk_bytes)
    E, logp = [], []
    for q in x_t.to(wd).split(rows):
        logits = torch.addmm(bias, q, Xs.T)  # (rows, N)
        m = logits.max(1, keepdim=True).values
        nv = logits.sub_(m).exp_() @ V  # (rows, 2): [sum_j w_j exp(beta e_j - max), sum_j w_j]
        nv = nv.double()
        E.append(torch.log(nv[:, 0]) - torch.log(nv[:, 1]) + be_max)
        if return_log_density:
            q2 = (q.double() ** 2).sum(-1) / (2 * sigma**2)
            logp.append(m.squeeze(1).double() - q2 + torch.log(nv[:, 1]) - math.log(N)
                        - 0.5 * d * math.log(2 * math.pi * sigma**2))
    E = torch.cat(E).to(out_dtype)
    if return_log_density:
        return E, torch.cat(logp).to(out_dtype)
    return E


def exact_posterior_average(x_t: torch.Tensor, t: float, data: torch.Tensor, values: torch.Tensor,
                            schedule: VPSchedule | None = None, *, log_tilt: torch.Tensor | None = None,
                            both: bool = False, chunk_bytes: int = 8 * 2**20):
    """sum_j p_j(x_t) values_j with p_j ∝ exp(log_tilt_j - ||x_t - alpha_t x^j||^2 / (2 sigma_t^2)): the exact
    posterior mean of ``values`` (N, k) given x_t (M, d) under the empirical behaviour (``log_tilt`` None) or
    under the tilted target pi ∝ mu exp(log_tilt) (e.g. log_tilt = beta e(x^j)). -> (M, k) in x_t's dtype;
    with ``both`` (and a tilt): (tilted, untilted) from one kernel."""
    schedule = schedule or VPSchedule()
    check_tensor("x_t", x_t, ndim=2)
    check_tensor("data", data, shape=(None, x_t.shape[1]))
    check_tensor("values", values, shape=(data.shape[0], None))
    t = check_scalar("t", t, low=schedule.t_min - 1e-12, high=schedule.t_max + 1e-12)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    X = data.to(device=x_t.device, dtype=torch.float64) * alpha
    bias = -(X**2).sum(-1) / (2 * sigma**2)
    tilt = None
    if log_tilt is not None:
        check_tensor("log_tilt", log_tilt, shape=(data.shape[0],))
        tilt = log_tilt.to(bias)
    V = values.to(X)
    out, plain = [], []
    for q in x_t.double().split(_rows_per_chunk(X.shape[0], chunk_bytes)):
        logits = torch.addmm(bias, q, X.T / sigma**2)
        out.append(torch.softmax(logits if tilt is None else logits + tilt, dim=1) @ V)
        if both:
            plain.append(torch.softmax(logits, dim=1) @ V)
    if both:
        return torch.cat(out).to(x_t.dtype), torch.cat(plain).to(x_t.dtype)
    return torch.cat(out).to(x_t.dtype)


def exact_energy_gradient(x_t: torch.Tensor, t: float, data: torch.Tensor, rewards: torch.Tensor, beta: float,
                          schedule: VPSchedule | None = None) -> torch.Tensor:
    """grad_x E_t(x_t) of :func:`exact_intermediate_energy`, in closed form: (alpha_t / sigma_t^2) times the
    difference of the posterior means of x_0 under the target and under the behaviour. (M, d) -> (M, d)."""
    schedule = schedule or VPSchedule()
    beta = check_beta(beta)
    check_tensor("rewards", rewards, shape=(data.shape[0],))
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    tilted, plain = exact_posterior_average(x_t, t, data, data, schedule, log_tilt=beta * rewards.double(), both=True)
    return (alpha / sigma**2) * (tilted - plain)


def make_grid(n: int, lim: float = 1.2, *, device=None, dtype=torch.float32):
    """An n x n grid on [-lim, lim]^2: returns (points (n*n, 2), xs (n,)); points[i*n + j] = (xs[j], xs[i])."""
    n = check_count("grid_size", n, bytes_per_item=1, low=2)
    check_count("grid points", n * n, bytes_per_item=2 * 8 * 8)
    lim = check_scalar("lim", lim, low=0.0, low_open=True)
    xs = torch.linspace(-lim, lim, n, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1), xs


def _projections(n_projections: int, d: int, seed: int) -> torch.Tensor:
    if d == 2:  # evenly spaced directions on the half circle: a deterministic, low-variance quadrature
        th = (torch.arange(n_projections, dtype=torch.float64) + 0.5) * math.pi / n_projections
        return torch.stack([torch.cos(th), torch.sin(th)], -1)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_projections, d, generator=g, dtype=torch.float64)
    return p / p.norm(dim=-1, keepdim=True)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two point sets of the same size, (n, d) and (n, d).

    SW_2 = sqrt(mean_theta W_2^2(theta^T x, theta^T y)); in 1D W_2 is the L2 distance between the
    sorted projections. In 2D the directions are evenly spaced on the half circle.
    """
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if x.shape != y.shape:
        raise ValueError(f"x, y: expected point sets of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_finite("x", x)
    check_finite("y", y)
    n_projections = check_count("n_projections", n_projections, bytes_per_item=1)
    check_count("n * n_projections", x.shape[0] * n_projections, bytes_per_item=8 * 4)
    P = _projections(n_projections, x.shape[1], seed).to(x.device)
    px = torch.sort(x.double() @ P.T, dim=0).values
    py = torch.sort(y.double() @ P.T, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def distance_floor(task: str | ToyTask, beta: float, n: int, *, seed: int = 0, pool_size: int = 100_000,
                   n_projections: int = 128) -> float:
    """The noise floor: the sliced Wasserstein distance between two independent exact target sets of size n."""
    a = target_samples(task, beta, n, pool_size=pool_size, seed=10_000 + 2 * seed, dtype=torch.float64)
    b = target_samples(task, beta, n, pool_size=pool_size, seed=10_001 + 2 * seed, dtype=torch.float64)
    return sliced_wasserstein(a, b, n_projections)


FLOOR_PAIRS = 32  # independent pairs averaged by expected_floor


def expected_floor(task: str | ToyTask, beta: float, n: int, *, pool_size: int = 100_000, n_projections: int = 128,
                   pairs: int = FLOOR_PAIRS) -> float:
    """The noise floor every toy table reports: the expected sliced-W2 distance between two independent exact
    target sets of size n, the mean of :func:`distance_floor` over ``pairs`` pairs (seeds 0 .. pairs-1).

    One pair is a noisy draw: at beta = 10 and n = 2000 it varies by 15-40% (std / mean) from seed to seed on
    the six tasks (``scripts/floor_spread.py``), so a ratio to one seed's draw is off by as much. Cached: a
    task, beta and size cost ``pairs`` pairs once per process."""
    return _expected_floor(get_task(task).name, float(beta), int(n), int(pool_size), int(n_projections), int(pairs))


@functools.lru_cache(maxsize=256)
def _expected_floor(name: str, beta: float, n: int, pool_size: int, n_projections: int, pairs: int) -> float:
    pairs = check_count("pairs", pairs, bytes_per_item=1)
    return math.fsum(distance_floor(name, beta, n, seed=s, pool_size=pool_size, n_projections=n_projections)
                     for s in range(pairs)) / pairs


def energy_error(f: torch.Tensor, E: torch.Tensor, log_weight: torch.Tensor | None = None) -> float:
    """RMS error of a learned energy f against the exact E_t, up to an additive constant.

    f, E (M,) on the same points; ``log_weight`` (M,) (e.g. log mu_t) weights the points by
    softmax(log_weight), so that regions the sampler never visits do not count. The constant
    c = E_w[f - E] is removed before the RMS is taken.
    """
    check_tensor("f", f, ndim=1)
    check_tensor("E", E, shape=(f.shape[0],))
    diff = (f - E).double()
    w = torch.full_like(diff, 1.0 / diff.numel()) if log_weight is None else torch.softmax(log_weight.double(), 0)
    c = (w * diff).sum()
    return float((w * (diff - c) ** 2).sum().sqrt())


def gradient_error(grad_f: torch.Tensor, grad_E: torch.Tensor, log_weight: torch.Tensor | None = None) -> float:
    """Relative error of a learned energy's gradient: RMS ||grad f - grad E_t|| / RMS ||grad E_t||, both RMS
    weighted by softmax(``log_weight``) (e.g. log mu_t) as in :func:`energy_error`.

    Guided sampling moves points along grad f, not by f's values: an energy can read its values to within a
    small RMS and still point its gradient wrong where the values' weight is small or where the error varies
    fast. 0 is the exact gradient, 1 the error of guiding with no energy at all (grad f = 0). (M, d), (M, d).
    """
    check_tensor("grad_f", grad_f, ndim=2)
    check_tensor("grad_E", grad_E, shape=tuple(grad_f.shape))
    n = grad_f.shape[0]
    if log_weight is not None:
        check_tensor("log_weight", log_weight, shape=(n,))
    w = (torch.full((n,), 1.0 / n, dtype=torch.float64, device=grad_f.device) if log_weight is None
         else torch.softmax(log_weight.double(), 0))
    ref = float((w * grad_E.double().pow(2).sum(1)).sum().sqrt())
    if ref == 0.0:
        raise ValueError("grad_E: zero everywhere the weights hold (no guidance to compare with)")
    return float((w * (grad_f.double() - grad_E.double()).pow(2).sum(1)).sum().sqrt()) / ref


def energy_error_cross(a: torch.Tensor, b: torch.Tensor, E: torch.Tensor,
                       log_weight: torch.Tensor | None = None) -> float:
    """:func:`energy_error` of the mean of a noisy estimate, without the estimate's noise.

    ``a`` and ``b`` (M,) are two independent estimates of one function ybar (e.g. the means of two disjoint
    halves of a target's random draws). ``energy_error(a, E)`` is inflated by a's variance: its square is, in
    expectation, RMS(ybar - E)^2 + the weighted variance of a. The cross product of the two centered errors,
    sum_w (a - E - c_a)(b - E - c_b), has expectation RMS(ybar - E)^2 exactly (a and b independent), so its square
    root (0 where noise makes it negative) estimates the error of ybar itself, from any number of draws.
    """
    check_tensor("a", a, ndim=1)
    check_tensor("b", b, shape=(a.shape[0],))
    check_tensor("E", E, shape=(a.shape[0],))
    da, db = (a - E).double(), (b - E).double()
    w = torch.full_like(da, 1.0 / da.numel()) if log_weight is None else torch.softmax(log_weight.double(), 0)
    cross = (w * (da - (w * da).sum()) * (db - (w * db).sum())).sum()
    return float(cross.clamp(min=0.0).sqrt())
