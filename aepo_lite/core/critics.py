"""Critics (docs/derivation.md section 5), each a learner with ``update(batch) -> dict[str, float]``.

IQL (Kostrikov et al.): an expectile value V and twin Q,

    L_V = E |tau - 1(u < 0)| u^2,          u = min_i Q'_i(s, a) - V(s)
    L_Q = E sum_i (Q_i(s, a) - r - gamma (1 - done) V(s'))^2

QGPO's in-support softmax Q (Lu et al.), with K actions a'_j ~ mu(.|s') from the behaviour model:

    y = r + gamma (1 - done) sum_j softmax_j(beta_Q Q'(s', a'_j)) Q'(s', a'_j)

The Monte-Carlo critic (``mc``; ours, a check on the two above): Q and V of the policy that made the data,
regressed on the discounted return of the rest of each transition's episode, G (no bootstrapping),

    L_Q = E sum_i (Q_i(s, a) - G)^2,       L_V = E (V(s) - G)^2

Q' is the Polyak-averaged target network (rate ``tau_target``). Networks use smooth
activations by default: AEPO's first- and second-order expansions differentiate Q in the action
(``activation="relu"`` is allowed for the uses that only evaluate Q). ``q_fn(s, a) -> (B,)`` is
what guidance uses.

``step(batch)`` returns the metrics as 0-d tensors (no host synchronisation: what a GPU training
loop calls); ``update(batch)`` is the same step with the numbers read back as floats.

batch keys: ``s`` (B, k), ``a`` (B, d), ``r`` (B,), ``s2`` (B, k), ``done`` (B,);
the in-support critic also needs ``support2`` (B, K, d), actions from mu(.|s'); the Monte-Carlo critic needs
only ``s``, ``a`` and ``g`` (B,), the return to go (:func:`aepo_lite.rl.data.returns_to_go`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from aepo_lite._checks import check_scalar
from aepo_lite.config import CriticConfig
from aepo_lite.device import adam
from aepo_lite.core.nets import TwinQ, ValueNet, _twin_from_two_mlps

__all__ = ["expectile_loss", "insupport_target", "IQLCritic", "InSupportCritic", "MCCritic", "make_critic",
           "CRITICS"]

CRITICS = ("iql", "insupport", "mc")


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """E |tau - 1(u < 0)| u^2 for residuals u (B,) -> scalar."""
    w = torch.where(u < 0, 1.0 - tau, tau)
    return (w * u**2).mean()


def insupport_target(r: torch.Tensor, done: torch.Tensor, q_next: torch.Tensor, gamma: float,
                     beta_q: float) -> torch.Tensor:
    """r (B,), done (B,), q_next (B, K) = Q'(s', a'_j) -> r + gamma (1 - done) sum_j softmax_j(beta_Q q) q."""
    w = torch.softmax(beta_q * q_next, dim=-1)
    return r + gamma * (1.0 - done) * (w * q_next).sum(-1)


def _soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- target + tau (online - target), every parameter in one foreach call."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


class _TwinQLearner(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, cfg: CriticConfig):
        super().__init__()
        check_scalar("gamma", cfg.gamma, 0.0, 1.0)
        check_scalar("tau_target", cfg.tau_target, 0.0, 1.0, low_open=True)
        self.cfg = cfg
        self.q = TwinQ(state_dim, action_dim, cfg.hidden, cfg.depth, cfg.activation, cfg.layer_norm)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)

    def update(self, batch: dict) -> dict[str, float]:
        """:meth:`step`, then the metrics as floats (one host synchronisation)."""
        return {k: float(v) for k, v in self.step(batch).items()}

    def _optimizers(self) -> None:
        # made at the first step, when the parameters sit on their device (fused Adam on CUDA)
        if self.q_opt is None:
            self._make_optimizers()

    def q_fn(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q(s, a) (B,): the minimum of the two target heads (what guidance and ranking use)."""
        return self.q_target.q_min(s, a)

    def _q_loss(self, q1: torch.Tensor, q2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The twin heads' loss against their target ``y`` (squared error; a subclass may add terms)."""
        return ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

    def _q_step(self, s, a, y) -> torch.Tensor:
        q1, q2 = self.q(s, a)
        loss = self._q_loss(q1, q2, y)
        self.q_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.q_opt.step()
        _soft_update(self.q_target, self.q, self.cfg.tau_target)
        return loss.detach(), q1.detach()

    def _make_optimizers(self) -> None:
        raise NotImplementedError

    def _named_optimizers(self) -> dict:
        return {k: v for k, v in vars(self).items() if k.endswith("_opt") and v is not None}

    def state_dict(self, *args, **kwargs):
        """The networks and, once made, the optimisers: a learner's state, enough to resume training.

        Called with arguments (``prefix=...``, as a parent module does), the plain module state.
        """
        sd = super().state_dict(*args, **kwargs)
        if not args and not kwargs:
            sd["_optimizers"] = {k: o.state_dict() for k, o in self._named_optimizers().items()}
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        opts = state_dict.pop("_optimizers", {})
        if "q.q1.0.weight" in state_dict and "q_opt" in opts:  # saved before TwinQ was one batched network
            opts = dict(opts, q_opt=_twin_optimizer_state(opts["q_opt"], state_dict, self.q))
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if opts:
            self._optimizers()
            for k, o in self._named_optimizers().items():
                o.load_state_dict(opts[k])
        return out


def _twin_optimizer_state(opt_state: dict, state_dict: dict, q: TwinQ) -> dict:
    """An Adam state saved for the earlier TwinQ (two MLPs; its parameters in the order of ``state_dict``'s ``q.``
    keys) rewritten for the batched TwinQ ``q``: each moment converted as its parameter is."""
    old_names = [k[2:] for k in state_dict if k.startswith("q.")]
    new_names = [n for n, _ in q.named_parameters()]
    state = opt_state["state"]
    new_state: dict = {}
    if state:
        fields = {f: {n: state[i][f] for i, n in enumerate(old_names)} for f in ("exp_avg", "exp_avg_sq")}
        for sd in fields.values():
            _twin_from_two_mlps(sd, "", q.depth, q.layer_norm)
        step = state[0]["step"]
        new_state = {i: {"step": step.clone(), **{f: fields[f][n] for f in fields}} for i, n in enumerate(new_names)}
    (group,) = opt_state["param_groups"]
    return {"state": new_state, "param_groups": [dict(group, params=list(range(len(new_names))))]}


class IQLCritic(_TwinQLearner):
    """IQL's expectile V and twin Q. ``update(batch) -> {"v_loss", "q_loss", "q_mean", "v_mean"}``."""

    def __init__(self, state_dim: int, action_dim: int, cfg: CriticConfig):
        super().__init__(state_dim, action_dim, cfg)
        check_scalar("expectile", cfg.expectile, 0.0, 1.0, low_open=True)
        self.v = ValueNet(state_dim, cfg.hidden, cfg.depth, cfg.activation, cfg.layer_norm)
        self.q_opt = self.v_opt = None

    def _make_optimizers(self) -> None:
        self.q_opt, self.v_opt = adam(self.q.parameters(), self.cfg.lr), adam(self.v.parameters(), self.cfg.lr)

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        self._optimizers()
        s, a, r, s2, done = batch["s"], batch["a"], batch["r"], batch["s2"], batch["done"]
        with torch.no_grad():
            q_t = self.q_target.q_min(s, a)
        v = self.v(s)
        v_loss = expectile_loss(q_t - v, self.cfg.expectile)
        self.v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        self.v_opt.step()
        with torch.no_grad():
            y = r + self.cfg.gamma * (1.0 - done) * self.v(s2)
        q_loss, q1 = self._q_step(s, a, y)
        return {"v_loss": v_loss.detach(), "q_loss": q_loss, "q_mean": q1.mean(), "v_mean": v.detach().mean()}


class InSupportCritic(_TwinQLearner):
    """QGPO's in-support softmax Q. ``update(batch) -> {"q_loss", "q_mean", "target_mean"}``."""

    def __init__(self, state_dim: int, action_dim: int, cfg: CriticConfig):
        super().__init__(state_dim, action_dim, cfg)
        check_scalar("beta_q", cfg.beta_q, low=0.0)
        self.q_opt = None

    def _make_optimizers(self) -> None:
        self.q_opt = adam(self.q.parameters(), self.cfg.lr)

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        self._optimizers()
        s, a, r, s2, done, sup = batch["s"], batch["a"], batch["r"], batch["s2"], batch["done"], batch["support2"]
        B, K, d = sup.shape
        with torch.no_grad():
            q_next = self.q_target.q_min(s2.repeat_interleave(K, 0), sup.reshape(B * K, d)).reshape(B, K)
            y = insupport_target(r, done, q_next, self.cfg.gamma, self.cfg.beta_q)
        q_loss, q1 = self._q_step(s, a, y)
        return {"q_loss": q_loss, "q_mean": q1.mean(), "target_mean": y.mean()}


class MCCritic(IQLCritic):
    """The data policy's twin Q and V regressed on the return to go ``g`` (no bootstrapping; ``gamma`` is the
    discount ``g`` was computed with). ``update(batch) -> {"v_loss", "q_loss", "q_mean", "v_mean"}``."""

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        self._optimizers()
        s, a, g = batch["s"], batch["a"], batch["g"]
        v = self.v(s)
        v_loss = ((v - g) ** 2).mean()
        self.v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        self.v_opt.step()
        q_loss, q1 = self._q_step(s, a, g)
        return {"v_loss": v_loss.detach(), "q_loss": q_loss, "q_mean": q1.mean(), "v_mean": v.detach().mean()}


def make_critic(state_dim: int, action_dim: int, cfg: CriticConfig) -> _TwinQLearner:
    """The critic named by ``cfg.kind``."""
    if cfg.kind == "iql":
        return IQLCritic(state_dim, action_dim, cfg)
    if cfg.kind == "insupport":
        return InSupportCritic(state_dim, action_dim, cfg)
    if cfg.kind == "mc":
        return MCCritic(state_dim, action_dim, cfg)
    raise ValueError(f"critic: expected one of {CRITICS}, got {cfg.kind!r}")
