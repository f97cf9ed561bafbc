"""Learners: whatever trains implements ``step(batch) -> dict[str, Tensor]`` and a resumable state.

``step`` returns 0-d tensors and never reads a number back to the host (no synchronisation on a
GPU); the stage loop reads them only at logged steps. ``state_dict()`` holds everything a run
needs to continue bit-for-bit: the networks, the optimiser (and its learning-rate schedule) and
any generator the learner draws noise from. The critics (:mod:`aepo_lite.core.critics`) and the
energy learner (:class:`aepo_lite.core.aepo.EnergyLearner`) follow the same interface.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.device import TrainingState, adam, cosine_schedule

__all__ = ["Learner", "BehaviourLearner", "RegressionLearner"]


@runtime_checkable
class Learner(Protocol):
    """The one interface of everything that trains."""

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One gradient step on ``batch``; metrics as 0-d tensors (no host synchronisation)."""

    def state_dict(self) -> dict:
        """Networks, optimiser, schedule and generator states: enough to resume exactly."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class _OptimisedLearner(TrainingState):
    """Shared by the learners below: one module, one Adam, an optional cosine schedule, a generator."""

    def __init__(self, module: nn.Module, lr: float, decay_steps: int | None, generator: torch.Generator | None):
        self.module, self.generator = module, generator
        self.opt = adam(module.parameters(), lr)  # fused on CUDA: the parameters already sit on their device
        self.lr_schedule = cosine_schedule(self.opt, decay_steps)

    def _apply(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()


class BehaviourLearner(_OptimisedLearner):
    """Denoising score matching of the behaviour model eps_theta(a_t, t, s).

    batch: ``a`` (B, d) clean actions, ``s`` (B, k) states or None (unconditional, the toy tasks).
    Returns ``{"loss"}``.
    """

    def __init__(self, model: DiffusionModel, lr: float, *, decay_steps: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(model, lr, decay_steps, generator)
        self.model = model

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = self.model.loss(batch["a"], batch.get("s"), generator=self.generator)
        self._apply(loss)
        return {"loss": loss.detach()}


class RegressionLearner(_OptimisedLearner):
    """Least squares of a network on targets: ``net(x) (B, 1) ~ y (B,)``; the toy tasks' smooth critic.

    batch: ``x`` (B, k), ``y`` (B,). Returns ``{"loss"}``.
    """

    def __init__(self, net: nn.Module, lr: float, *, decay_steps: int | None = None):
        super().__init__(net, lr, decay_steps, None)

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = ((self.module(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        self._apply(loss)
        return {"loss": loss.detach()}
