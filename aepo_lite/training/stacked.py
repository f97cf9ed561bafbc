"""Several seeds in one process: N behaviour models trained as one stacked model.

:class:`StackedBehaviourLearner` holds N behaviour models of one architecture (one per seed). Their parameters
are stacked along a leading axis (``torch.func.stack_module_state``). One ``vmap`` of ``functional_call``
computes the N denoising losses, and one Adam steps the stacked tensors. Adam is elementwise, so this is N
Adams: on a GPU, one step of N seeds launches the kernels of one seed's step, each N times wider.

**The same draws as N separate runs.** Model i draws its batch indices from its own batch generator and its
diffusion times and noise from its own noise generator. Seeded as :func:`aepo_lite.training.run_stage` seeds a
single run (``torch.manual_seed(stage.seed)`` for the noise, a batch generator seeded ``stage.seed``), the N
stacked models end at the parameters of N separate runs up to floating-point rounding (the tests check
this). :meth:`StackedBehaviourLearner.unstacked` writes model i back, with its Adam moments and learning-rate
schedule, into an ordinary :class:`~aepo_lite.training.BehaviourLearner`, so its checkpoint is the one a
single run would have written.

The stacked learner is a :class:`~aepo_lite.training.Learner`: ``run_stage`` trains it, checkpoints it
(every generator included) and resumes it.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.device import adam, cosine_schedule
from aepo_lite.training.learners import BehaviourLearner

__all__ = ["StackedBatches", "StackedBehaviourLearner"]


class StackedBatches:
    """One batch per model, each drawn by ``draw(generator)`` from the model's own generator; stacked.

    ``draw(g)`` returns ``{"a": (B, d), "s": (B, k)}`` (as a single run's batch source does);
    ``__call__`` returns ``{"a": (N, B, d), "s": (N, B, k)}``. The stage loop's own generator is not used:
    the N generators here are the stacked run's batch state (saved in the learner's state_dict).
    """

    def __init__(self, draw: Callable[[torch.Generator], dict], generators: list[torch.Generator]):
        if not generators:
            raise ValueError("seeds: a stacked run needs at least one seed")
        self.draw, self.generators = draw, list(generators)

    def __call__(self, _unused: torch.Generator | None = None) -> dict:
        batches = [self.draw(g) for g in self.generators]
        return {k: torch.stack([b[k] for b in batches]) for k in batches[0]}

    def state_dict(self) -> list:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, state: list) -> None:
        if len(state) != len(self.generators):
            raise ValueError(f"seeds: the checkpoint holds {len(state)} batch generators, this run has "
                             f"{len(self.generators)}")
        for g, s in zip(self.generators, state):
            g.set_state(s)


class StackedBehaviourLearner:
    """N behaviour models (same architecture, different seeds) trained together.

    ``models``: the N :class:`DiffusionModel` (their initial parameters are each seed's own);
    ``generators``: N noise generators (model i's diffusion times and noise), ``lr`` and ``decay_steps`` as for
    :class:`BehaviourLearner`; ``batches``: the :class:`StackedBatches` whose generators this learner saves.
    ``step(batch)`` takes ``{"a": (N, B, d), "s": (N, B, k)}`` and returns ``{"loss": mean over models,
    "loss_max": the largest}``.
    """

    def __init__(self, models: list[DiffusionModel], lr: float, *, generators: list[torch.Generator],
                 decay_steps: int | None = None, batches: StackedBatches | None = None):
        from torch.func import stack_module_state
        if not models:
            raise ValueError("seeds: a stacked run needs at least one model")
        if len(generators) != len(models):
            raise ValueError(f"generators: expected one per model ({len(models)}), got {len(generators)}")
        shapes = [[tuple(p.shape) for p in m.net.parameters()] for m in models]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("models: a stacked run needs one architecture; the models' parameter shapes differ")
        self.n, self.lr, self.decay_steps = len(models), lr, decay_steps
        self.schedule, self.generators, self.batches = models[0].schedule, list(generators), batches
        self.params, self.buffers = stack_module_state([m.net for m in models])
        self.base = copy.deepcopy(models[0].net).to("meta")  # the architecture, without storage
        self.opt = adam(self.params.values(), lr)
        self.lr_schedule = cosine_schedule(self.opt, decay_steps)

    def _loss(self, params, buffers, a_t, t, s, eps):
        from torch.func import functional_call
        eps_hat = functional_call(self.base, (params, buffers), (a_t, t, s))
        return ((eps_hat - eps) ** 2).sum(-1).mean()

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        from torch.func import vmap
        a, s = batch["a"], batch.get("s")
        if a.shape[0] != self.n:
            raise ValueError(f"batch: expected {self.n} stacked batches (one per model), got {a.shape[0]}")
        t, a_t, eps = [], [], []
        for i, g in enumerate(self.generators):  # model i's draws, in the order of DiffusionModel.loss
            ti = self.schedule.sample_t(a.shape[1], device=a.device, dtype=a.dtype, generator=g)
            ai, ei = self.schedule.diffuse(a[i], ti, generator=g)
            t.append(ti), a_t.append(ai), eps.append(ei)
        t, a_t, eps = torch.stack(t), torch.stack(a_t), torch.stack(eps)
        in_dims = (0, 0, 0, 0, None if s is None else 0, 0)
        losses = vmap(self._loss, in_dims=in_dims)(self.params, self.buffers, a_t, t, s, eps)  # (N,)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # model i's parameters get model i's gradient only
        self.opt.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        losses = losses.detach()
        return {"loss": losses.mean(), "loss_max": losses.max()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        out = {"params": {k: v.detach().clone() for k, v in self.params.items()},
               "buffers": {k: v.clone() for k, v in self.buffers.items()}, "opt": self.opt.state_dict(),
               "generators": [g.get_state() for g in self.generators]}
        if self.lr_schedule is not None:
            out["lr_schedule"] = self.lr_schedule.state_dict()
        if self.batches is not None:
            out["batches"] = self.batches.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        if len(state["generators"]) != self.n:
            raise ValueError(f"seeds: the checkpoint holds {len(state['generators'])} models, this run has {self.n}")
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        self.opt.load_state_dict(state["opt"])
        if self.lr_schedule is not None:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        if self.batches is not None and "batches" in state:
            self.batches.load_state_dict(state["batches"])

    def unstacked(self, i: int, model: DiffusionModel) -> BehaviourLearner:
        """Model i as an ordinary :class:`BehaviourLearner` on ``model`` (its parameters are overwritten):
        parameters, buffers, Adam moments, step count and learning-rate schedule; what a single run of that
        seed holds after the same steps."""
        if not 0 <= i < self.n:
            raise ValueError(f"i: expected a model index in [0, {self.n}), got {i}")
        with torch.no_grad():
            model.net.load_state_dict({k: v[i].detach() for k, v in {**self.params, **self.buffers}.items()})
        learner = BehaviourLearner(model, self.lr, decay_steps=self.decay_steps)
        sd = self.opt.state_dict()
        per = {j: {k: (v.clone() if k == "step" else v[i].clone()) for k, v in st.items()} for j, st in sd["state"].items()}
        learner.opt.load_state_dict({"state": per, "param_groups": sd["param_groups"]})
        if self.lr_schedule is not None:
            learner.lr_schedule.load_state_dict(self.lr_schedule.state_dict())
        return learner
