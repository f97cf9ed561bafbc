"""Networks: time embedding, MLP blocks, the state-conditional noise network, critics, the
value network and the intermediate-energy network. Smooth activations (SiLU/Mish) by default:
AEPO's first- and second-order expansions differentiate the critic in the action, and a ReLU
critic has no curvature (its Hessian is zero almost everywhere). ReLU is offered for critics whose
Q is only evaluated (AEPO's ``sampled`` expansion, QGPO/CEP, MSE); the RL config checks this.

Under ``torch.no_grad`` the MLP blocks apply their activations in place (no new activation
tensor per layer): a target network evaluated on B x K rows is the critic step's largest cost."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "GaussianFourierEmbedding", "MLP", "ResidualMLP", "NoiseNet", "TwinQ", "ValueNet", "EnergyNet",
    "make_activation", "SMOOTH_ACTIVATIONS",
]



class Mish(nn.Mish):
    """``nn.Mish``; on the CPU computed as x tanh(softplus(x)), the same formula, because torch's fused
    CPU kernel is slower (forward + backward about 2.4x, measured on (4096, 896)). CUDA keeps the
    fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return x * torch.tanh(nn.functional.softplus(x))
        return nn.functional.mish(x)


_ACTIVATIONS = {"silu": nn.SiLU, "mish": Mish, "gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}
SMOOTH_ACTIVATIONS = ("silu", "mish", "gelu", "tanh")


def make_activation(name: str) -> nn.Module:
    """``silu|mish|gelu|tanh|relu``. ReLU has no curvature: only for critics whose gradient and
    Hessian in the action are never used (see the module docstring)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def _act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, overwriting x where the activation allows it (call only without autograd)."""
    if isinstance(act, nn.SiLU):
        return nn.functional.silu(x, inplace=True)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, nn.Tanh):
        return x.tanh_()
    if isinstance(act, Mish) and x.device.type == "cpu":
        return x.mul_(nn.functional.softplus(x).tanh_())
    return act(x)


def _linear_act(linear: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = linear(x)
    return _act_(act, y) if not torch.is_grad_enabled() else act(y)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of the diffusion time: t (B,) -> (B, dim).

    The frequencies are a fixed buffer drawn from a seeded generator, so two models built
    with the same arguments are identical.
    """

    def __init__(self, dim: int = 32, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: expected an even embedding size, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = 2 * math.pi * t[:, None] * self.freqs[None, :].to(t.dtype)
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class MLP(nn.Sequential):
    """Plain MLP: in_dim -> [hidden] * depth -> out_dim, smooth activation, optional LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, depth: int = 2,
                 activation: str = "mish", layer_norm: bool = False):
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers.append(nn.Linear(d, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(make_activation(activation))
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self._inplace_ok = not layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self._inplace_ok:
            return super().forward(x)
        layers = list(self)
        for lin, act in zip(layers[:-1:2], layers[1::2]):  # (Linear, activation) pairs, then the output Linear
            x = _act_(act, lin(x))
        return layers[-1](x)


class _ResBlock(nn.Module):
    def __init__(self, hidden: int, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden * 2)
        self.fc2 = nn.Linear(hidden * 2, hidden)
        self.act = make_activation(activation)

    def forward(self, x):
        return x + self.fc2(_linear_act(self.fc1, self.act, self.norm(x)))


class ResidualMLP(nn.Module):
    """in_dim -> hidden -> n_blocks pre-norm residual blocks -> out_dim (IDQL-style)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, n_blocks: int = 2,
                 activation: str = "mish"):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.Sequential(*[_ResBlock(hidden, activation) for _ in range(n_blocks)])
        self.out = nn.Sequential(make_activation(activation), nn.Linear(hidden, out_dim))

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


class NoiseNet(nn.Module):
    """State-conditional noise prediction eps_theta(a_t, t, s).

    a_t (B, d), t (B,), s (B, state_dim) or None when ``state_dim == 0`` -> (B, d).
    """

    def __init__(self, action_dim: int, state_dim: int = 0, hidden: int = 256, n_blocks: int = 3,
                 time_dim: int = 32, activation: str = "mish"):
        super().__init__()
        self.action_dim, self.state_dim = action_dim, state_dim
        self.time_embed = nn.Sequential(GaussianFourierEmbedding(time_dim), nn.Linear(time_dim, time_dim),
                                        make_activation(activation))
        self.body = ResidualMLP(action_dim + state_dim + time_dim, action_dim, hidden, n_blocks, activation)

    def forward(self, a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        parts = [a_t, self.time_embed(t)]
        if self.state_dim:
            parts.append(s)
        return self.body(torch.cat(parts, dim=-1))


class TwinQ(nn.Module):
    """Two Q heads. ``forward(s, a) -> (q1 (B,), q2 (B,))``; :meth:`q_min` is their minimum.

    Both heads are one batched network: layer l holds ``weights[l]`` (2, in, out) and ``biases[l]``
    (2, 1, out), and each layer is one ``baddbmm`` for both heads, so a step launches half the kernels
    of two separate MLPs (what a launch-bound GPU step pays for). Head h computes what
    ``MLP(state_dim + action_dim, 1, hidden, depth, activation, layer_norm)`` computes (Linear,
    optional LayerNorm, activation per hidden layer), initialised the way ``nn.Linear`` is. A state
    dict of the earlier layout (two MLPs: ``q1.0.weight`` (out, in), ...) is converted on loading.
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, depth: int = 2,
                 activation: str = "mish", layer_norm: bool = False):
        super().__init__()
        dims = [state_dim + action_dim] + [hidden] * depth + [1]
        bounds = [1 / math.sqrt(i) for i in dims[:-1]]  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(2, i, o).uniform_(-b, b))
                                         for i, o, b in zip(dims[:-1], dims[1:], bounds)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(2, 1, o).uniform_(-b, b))
                                        for o, b in zip(dims[1:], bounds)])
        n_norm = depth if layer_norm else 0  # LayerNorm's affine weight and bias per hidden layer
        self.norm_weights = nn.ParameterList([nn.Parameter(torch.ones(2, 1, hidden)) for _ in range(n_norm)])
        self.norm_biases = nn.ParameterList([nn.Parameter(torch.zeros(2, 1, hidden)) for _ in range(n_norm)])
        self.act = make_activation(activation)
        self.depth, self.layer_norm = depth, layer_norm

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) -> (2, B): both heads' Q."""
        h = x.unsqueeze(0).expand(2, *x.shape)
        inplace = not torch.is_grad_enabled()  # a target network's no-grad call: activations in place
        for i in range(self.depth):
            h = torch.baddbmm(self.biases[i], h, self.weights[i])
            if self.layer_norm:
                h = nn.functional.layer_norm(h, h.shape[-1:]) * self.norm_weights[i] + self.norm_biases[i]
            h = _act_(self.act, h) if inplace else self.act(h)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1]).squeeze(-1)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.heads(torch.cat([s, a], dim=-1))
        return q[0], q[1]

    def q_min(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.heads(torch.cat([s, a], dim=-1)).amin(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _twin_from_two_mlps(state_dict, prefix, self.depth, self.layer_norm)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _twin_from_two_mlps(sd: dict, prefix: str, depth: int, layer_norm: bool) -> None:
    """Rewrite, in ``sd``, an earlier TwinQ's keys as the batched layout's. The earlier TwinQ held two ``MLP``s
    (``nn.Sequential``s): ``{prefix}q1.{k}.weight`` with k the index of Linear (out, in), LayerNorm (hidden,) and
    activation in each hidden layer, then the output Linear. Keys it does not know are left for strict loading
    to report."""
    if f"{prefix}q1.0.weight" not in sd:
        return
    per = 3 if layer_norm else 2  # Sequential entries per hidden layer

    def move(new: str, k: int, name: str) -> None:
        old = [f"{prefix}q{h}.{k}.{name}" for h in (1, 2)]
        if all(o in sd for o in old):
            sd[prefix + new] = torch.stack([v.T if v.ndim == 2 else v[None] for v in map(sd.pop, old)])

    for i in range(depth + 1):
        move(f"weights.{i}", per * i, "weight")
        move(f"biases.{i}", per * i, "bias")
        if layer_norm and i < depth:
            move(f"norm_weights.{i}", per * i + 1, "weight")
            move(f"norm_biases.{i}", per * i + 1, "bias")


class ValueNet(nn.Module):
    """V(s): (B, state_dim) -> (B,)."""

    def __init__(self, state_dim: int, hidden: int = 256, depth: int = 2, activation: str = "mish",
                 layer_norm: bool = False):
        super().__init__()
        self.net = MLP(state_dim, 1, hidden, depth, activation, layer_norm)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s).squeeze(-1)


class EnergyNet(nn.Module):
    """Intermediate energy f_phi(s, a_t, t): s (B, state_dim) or None, a_t (B, d), t (B,) -> (B,).

    At t = t_min it should match beta Q(s, a); its gradient in a_t is the guidance.
    """

    def __init__(self, action_dim: int, state_dim: int = 0, hidden: int = 256, depth: int = 3,
                 time_dim: int = 32, activation: str = "silu"):
        super().__init__()
        self.action_dim, self.state_dim = action_dim, state_dim
        self.time_embed = GaussianFourierEmbedding(time_dim)
        self.net = MLP(action_dim + state_dim + time_dim, 1, hidden, depth, activation)

    def forward(self, s: torch.Tensor | None, a_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = [a_t, self.time_embed(t)]
        if self.state_dim:
            parts.append(s)
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)
