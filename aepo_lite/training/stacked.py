"""Several seeds in one process: N behaviour models, critics or energy networks trained as one stacked model.

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

:class:`StackedCritic` does the same for N critics of one kind: IQL's (twin Q, its Polyak target, the
expectile V) or QGPO's in-support one (each seed's batch carries its own support actions), with the critic's
step written over the stacked networks. A critic draws no noise, so its N batch generators are its only
random state. :meth:`StackedCritic.unstacked` gives critic i back with its Adams.

:class:`StackedEnergyLearner` does it for N energy learners (any method and target): each seed's own
:class:`~aepo_lite.core.aepo.EnergyLearner` draws its noise and computes its targets
(:meth:`~aepo_lite.core.aepo.EnergyLearner.loss_parts`, reading its own behaviour model and critic), then the
N energy networks run as one vmapped call and one Adam steps them. Where the loss is row-wise and its targets
read only the batch (QGPO's CEP, the particle target on precomputed ``support_q``), the N seeds' targets and
losses are computed as one batch of N * B rows too; other targets (the Gaussian posterior's, MSE's, the mixture's:
each reads that seed's behaviour model or critic) are computed seed by seed.

:class:`StackedSupportSampler` draws the support actions of N seeds (K actions of each seed's behaviour model
for every observation row) as one sampling pass: each seed's starting noise comes from its own generator, as
its own support stage draws it, and the N behaviour networks run as one vmapped call at every solver step.

The stacked learners are :class:`~aepo_lite.training.Learner` s: ``run_stage`` trains them, checkpoints them
(every generator included) and resumes them.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from aepo_lite.core.aepo import EnergyLearner
from aepo_lite.core.critics import InSupportCritic, IQLCritic, insupport_target
from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.device import adam, cosine_schedule
from aepo_lite.training.learners import BehaviourLearner

__all__ = ["StackedBatches", "StackedBehaviourLearner", "StackedCritic", "StackedEnergyLearner", "StackedQ",
           "StackedSupportSampler"]


class StackedBatches:
    """One batch per model, each drawn by ``draw(generator)`` from the model's own generator; stacked.

    ``draw(g)`` (one for every model, or a list of one per model: each seed's energy batches read its own
    support actions and critic) returns ``{"a": (B, d), "s": (B, k)}`` (as a single run's batch source does);
    ``__call__`` returns ``{"a": (N, B, d), "s": (N, B, k)}``, passed through ``after`` when given (a step of
    the whole stacked batch, such as :class:`StackedQ`'s values at the support actions). The stage loop's own
    generator is not used: the N generators here are the stacked run's batch state (saved in the learner's
    state_dict).
    """

    def __init__(self, draw: Callable[[torch.Generator], dict] | list[Callable[[torch.Generator], dict]],
                 generators: list[torch.Generator], *, after: Callable[[dict], dict] | None = None):
        if not generators:
            raise ValueError("seeds: a stacked run needs at least one seed")
        draws = list(draw) if isinstance(draw, (list, tuple)) else [draw] * len(generators)
        if len(draws) != len(generators):
            raise ValueError(f"draw: expected one batch source per seed ({len(generators)}), got {len(draws)}")
        self.draws, self.generators, self.after = draws, list(generators), after

    def __call__(self, _unused: torch.Generator | None = None) -> dict:
        batches = [draw(g) for draw, g in zip(self.draws, self.generators)]
        out = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
        return out if self.after is None else self.after(out)

    def state_dict(self) -> list:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, state: list) -> None:
        if len(state) != len(self.generators):
            raise ValueError(f"seeds: the checkpoint holds {len(state)} batch generators, this run has "
                             f"{len(self.generators)}")
        for g, s in zip(self.generators, state):
            g.set_state(s)


class _StackedState:
    """``state_dict`` / ``load_state_dict`` of a stacked learner with one network per model: ``params`` and
    ``buffers`` (stacked), one Adam ``opt``, an optional ``lr_schedule``, the N noise ``generators`` and the
    :class:`StackedBatches` ``batches``; ``what`` names the models in errors."""

    what = "models"

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
            raise ValueError(f"seeds: the checkpoint holds {len(state['generators'])} {self.what}, this run has "
                             f"{self.n}")
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        self.opt.load_state_dict(state["opt"])
        if self.lr_schedule is not None:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        for g, st in zip(self.generators, state["generators"]):
            g.set_state(st)
        if self.batches is not None and "batches" in state:
            self.batches.load_state_dict(state["batches"])


class StackedBehaviourLearner(_StackedState):
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

    def _noised(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, a_t, eps), each (N, B, ...): model i's draws from its own generator, in the order of
        :meth:`DiffusionModel.loss` (u for t, then eps), then the schedule's arithmetic once for all N (elementwise:
        the values :meth:`VPSchedule.sample_t` and :meth:`VPSchedule.diffuse` give each model alone)."""
        sch, (_, B, d) = self.schedule, a.shape
        u, eps = [], []
        for g in self.generators:
            u.append(torch.rand(B, generator=g, dtype=a.dtype, device=g.device))
            eps.append(torch.randn((B, d), generator=g, dtype=a.dtype, device=g.device))
        t = (sch.t_min + (sch.t_max - sch.t_min) * torch.stack(u)).to(a.device)
        eps = torch.stack(eps).to(a.device)
        alpha, sigma = sch.alpha_sigma(t)
        return t, alpha[..., None] * a + sigma[..., None] * eps, eps

    def _loss(self, params, buffers, a_t, t, s, eps):
        from torch.func import functional_call
        eps_hat = functional_call(self.base, (params, buffers), (a_t, t, s))
        return ((eps_hat - eps) ** 2).sum(-1).mean()

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        from torch.func import vmap
        a, s = batch["a"], batch.get("s")
        if a.shape[0] != self.n:
            raise ValueError(f"batch: expected {self.n} stacked batches (one per model), got {a.shape[0]}")
        t, a_t, eps = self._noised(a)
        in_dims = (0, 0, 0, 0, None if s is None else 0, 0)
        losses = vmap(self._loss, in_dims=in_dims)(self.params, self.buffers, a_t, t, s, eps)  # (N,)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # model i's parameters get model i's gradient only
        self.opt.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        losses = losses.detach()
        return {"loss": losses.mean(), "loss_max": losses.max()}

    def unstacked(self, i: int, model: DiffusionModel) -> BehaviourLearner:
        """Model i as an ordinary :class:`BehaviourLearner` on ``model`` (its parameters are overwritten):
        parameters, buffers, Adam moments, step count and learning-rate schedule; what a single run of that
        seed holds after the same steps."""
        if not 0 <= i < self.n:
            raise ValueError(f"i: expected a model index in [0, {self.n}), got {i}")
        with torch.no_grad():
            model.net.load_state_dict({k: v[i].detach() for k, v in {**self.params, **self.buffers}.items()})
        learner = BehaviourLearner(model, self.lr, decay_steps=self.decay_steps)
        learner.opt.load_state_dict(_unstack_adam(self.opt, i))
        if self.lr_schedule is not None:
            learner.lr_schedule.load_state_dict(self.lr_schedule.state_dict())
        return learner


def _stack(modules) -> tuple[dict, dict]:
    from torch.func import stack_module_state
    return stack_module_state(list(modules))


def _unstack_adam(opt: torch.optim.Optimizer, i: int) -> dict:
    """Model i's share of an Adam over stacked tensors, as the state of an Adam over that model's parameters."""
    sd = opt.state_dict()
    per = {j: {k: (v.clone() if k == "step" else v[i].clone()) for k, v in st.items()} for j, st in sd["state"].items()}
    return {"state": per, "param_groups": sd["param_groups"]}


class StackedCritic:
    """N critics of one kind and config (different seeds) trained together: :class:`IQLCritic` (twin Q, its
    Polyak target, the expectile V) or QGPO's :class:`InSupportCritic` (twin Q and target; each seed's batch
    carries its own support actions ``support2``).

    ``critics``: the N critics (their initial networks are each seed's own; none has stepped yet);
    ``batches``: the :class:`StackedBatches` whose generators this learner saves. ``step(batch)`` takes the
    critic batch with a leading seed axis (``s`` (N, B, k), ``a``, ``r``, ``s2``, ``done``, and ``support2``
    (N, B, K, d) for the in-support critic) and returns the metrics of the critic's ``step``, each the mean
    over the N critics.
    """

    def __init__(self, critics: list, *, batches: StackedBatches | None = None):
        if not critics:
            raise ValueError("seeds: a stacked run needs at least one critic")
        kinds = {type(c) for c in critics}
        if len(kinds) > 1 or next(iter(kinds)) not in (IQLCritic, InSupportCritic):  # not subclasses (mc)
            raise ValueError(f"critic: a stacked run needs critics of one kind (IQLCritic or InSupportCritic), got "
                             f"{sorted(k.__name__ for k in kinds)}")
        cfg = critics[0].cfg
        if any(c.cfg != cfg for c in critics):
            raise ValueError("critics: a stacked run needs one critic config; the critics' configs differ")
        if any(c.q_opt is not None for c in critics):
            raise ValueError("critics: stack critics before their first step (their optimisers exist already)")
        self.n, self.cfg, self.batches = len(critics), cfg, batches
        self.iql = isinstance(critics[0], IQLCritic)
        self.parts = ("q", "q_buffers", "q_target") + (("v", "v_buffers") if self.iql else ())
        self.q, self.q_buffers = _stack(c.q for c in critics)
        self.q_target = {k: v.detach().clone() for k, v in _stack(c.q_target for c in critics)[0].items()}
        self.q_base = copy.deepcopy(critics[0].q).to("meta")
        self.q_opt = adam(self.q.values(), cfg.lr)
        if self.iql:
            self.v, self.v_buffers = _stack(c.v for c in critics)
            self.v_base = copy.deepcopy(critics[0].v).to("meta")
            self.v_opt = adam(self.v.values(), cfg.lr)

    def _twin(self, params, buffers, s, a):
        from torch.func import functional_call
        return functional_call(self.q_base, (params, buffers), (s, a))

    def _value(self, params, buffers, s):
        from torch.func import functional_call
        return functional_call(self.v_base, (params, buffers), (s,))

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        from torch.func import vmap
        s, a, r, s2, done = batch["s"], batch["a"], batch["r"], batch["s2"], batch["done"]
        if s.shape[0] != self.n:
            raise ValueError(f"batch: expected {self.n} stacked batches (one per critic), got {s.shape[0]}")
        twin, out = vmap(self._twin), {}
        if self.iql:
            value = vmap(self._value)
            with torch.no_grad():
                q_t = torch.minimum(*twin(self.q_target, self.q_buffers, s, a))  # (N, B)
            v = value(self.v, self.v_buffers, s)
            u, tau = q_t - v, self.cfg.expectile
            v_loss = (torch.where(u < 0, 1.0 - tau, tau) * u**2).mean(-1)  # (N,): expectile_loss per critic
            self.v_opt.zero_grad(set_to_none=True)
            v_loss.sum().backward()
            self.v_opt.step()
            with torch.no_grad():
                y = r + self.cfg.gamma * (1.0 - done) * value(self.v, self.v_buffers, s2)
            out.update(v_loss=v_loss.detach().mean(), v_mean=v.detach().mean())
        else:  # QGPO's softmax over each seed's own K support actions at s'
            sup = batch["support2"]
            N, B, K, d = sup.shape
            with torch.no_grad():
                q_next = torch.minimum(*twin(self.q_target, self.q_buffers, s2.repeat_interleave(K, 1),
                                             sup.reshape(N, B * K, d))).reshape(N, B, K)
                y = insupport_target(r, done, q_next, self.cfg.gamma, self.cfg.beta_q)
        q1, q2 = twin(self.q, self.q_buffers, s, a)
        q_loss = ((q1 - y) ** 2).mean(-1) + ((q2 - y) ** 2).mean(-1)
        self.q_opt.zero_grad(set_to_none=True)
        q_loss.sum().backward()
        self.q_opt.step()
        with torch.no_grad():  # the Polyak update of every critic's target at once
            torch._foreach_lerp_(list(self.q_target.values()), list(self.q.values()), self.cfg.tau_target)
        out.update(q_loss=q_loss.detach().mean(), q_mean=q1.detach().mean())
        if not self.iql:
            out["target_mean"] = y.mean()
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        out = {part: {k: v.detach().clone() for k, v in getattr(self, part).items()} for part in self.parts}
        out.update(q_opt=self.q_opt.state_dict(), n=self.n)
        if self.iql:
            out["v_opt"] = self.v_opt.state_dict()
        if self.batches is not None:
            out["batches"] = self.batches.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n:
            raise ValueError(f"seeds: the checkpoint holds {state.get('n')} critics, this run has {self.n}")
        with torch.no_grad():
            for part in self.parts:
                for k, v in state[part].items():
                    getattr(self, part)[k].copy_(v)
        self.q_opt.load_state_dict(state["q_opt"])
        if self.iql:
            self.v_opt.load_state_dict(state["v_opt"])
        if self.batches is not None and "batches" in state:
            self.batches.load_state_dict(state["batches"])

    def unstacked(self, i: int, critic):
        """Critic i written into ``critic`` (networks, target, Adams): what a run of that seed alone holds after
        the same steps."""
        if not 0 <= i < self.n:
            raise ValueError(f"i: expected a critic index in [0, {self.n}), got {i}")
        with torch.no_grad():
            critic.q.load_state_dict({k: v[i] for k, v in {**self.q, **self.q_buffers}.items()})
            critic.q_target.load_state_dict({k: v[i] for k, v in {**self.q_target, **self.q_buffers}.items()})
            if self.iql:
                critic.v.load_state_dict({k: v[i] for k, v in {**self.v, **self.v_buffers}.items()})
        critic._optimizers()
        critic.q_opt.load_state_dict(_unstack_adam(self.q_opt, i))
        if self.iql:
            critic.v_opt.load_state_dict(_unstack_adam(self.v_opt, i))
        return critic


def _clip_per_model(grads: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` of each model's gradient (the leading axis of every tensor) on its own."""
    n = grads[0].shape[0]
    norm = torch.sqrt(sum(g.reshape(n, -1).pow(2).sum(1) for g in grads))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.reshape(n, *([1] * (g.ndim - 1))))


class StackedEnergyLearner(_StackedState):
    """N :class:`EnergyLearner` (same config and method, different seeds) trained together.

    ``learners``: each seed's energy learner (its energy network's initial parameters, its own behaviour model
    and critic; not stepped yet); ``generators``: N noise generators, given to the learners (each draws its t,
    a_t and target samples from its own); ``batches``: a :class:`StackedBatches` with one batch source per seed.
    ``step(batch)`` takes the stacked energy batch and returns the metrics of :meth:`EnergyLearner.step`, each
    the mean over the N learners. With ``fuse_targets`` (default) a row-wise loss (QGPO's CEP, the particle
    target on ``support_q``: :meth:`EnergyLearner.rowwise`) is computed for the N seeds as one batch: each seed
    draws its own noise, then the targets and the loss are one pass over N * B rows (on a GPU, one seed's
    launches instead of N times them). Otherwise each seed's targets are computed on its own.
    """

    what = "energy networks"

    def __init__(self, learners: list[EnergyLearner], *, generators: list[torch.Generator],
                 batches: StackedBatches | None = None, fuse_targets: bool = True):
        if not learners:
            raise ValueError("seeds: a stacked run needs at least one energy learner")
        if len(generators) != len(learners):
            raise ValueError(f"generators: expected one per learner ({len(learners)}), got {len(generators)}")
        first = learners[0]
        if any(l.cfg != first.cfg or l.method != first.method for l in learners):
            raise ValueError("energy: a stacked run needs one energy config and method; the learners' differ")
        if any(l.opt.state for l in learners):
            raise ValueError("energy: stack the learners before their first step (their optimisers hold state)")
        self.learners, self.n, self.cfg, self.batches = list(learners), len(learners), first.cfg, batches
        self.fuse_targets = fuse_targets
        self.generators = list(generators)
        for l, g in zip(self.learners, self.generators):
            l.generator = g
        self.params, self.buffers = _stack(l.energy for l in learners)
        self.base = copy.deepcopy(first.energy).to("meta")
        self.decay_steps = None if first.lr_schedule is None else first.lr_schedule.T_max
        self.opt = adam(self.params.values(), self.cfg.lr)
        self.lr_schedule = cosine_schedule(self.opt, self.decay_steps)

    def _energy(self, params, buffers, s, a_t, t):
        from torch.func import functional_call
        return functional_call(self.base, (params, buffers), (s, a_t, t))

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        from torch.func import vmap
        first = next(iter(batch.values()))
        if first.shape[0] != self.n:
            raise ValueError(f"batch: expected {self.n} stacked batches (one per learner), got {first.shape[0]}")
        per = [{k: v[i] for k, v in batch.items()} for i in range(self.n)]
        if self.fuse_targets and all(l.rowwise(b) for l, b in zip(self.learners, per)):
            return self._fused_step(batch, per)
        parts = [l.loss_parts(b) for l, b in zip(self.learners, per)]
        args = [None if a[0] is None else torch.stack(a) for a in zip(*(p[0] for p in parts))]
        in_dims = (0, 0, *(None if a is None else 0 for a in args))
        f = vmap(self._energy, in_dims=in_dims)(self.params, self.buffers, *args)
        done = [finish(f[i]) for i, (_, finish) in enumerate(parts)]
        losses = torch.stack([loss for loss, _ in done])
        return self._update(losses.sum(), losses.detach().mean(),
                            {k: torch.stack([torch.as_tensor(extra[k]).detach() for _, extra in done]).mean()
                             for k in done[0][1]})

    def _fused_step(self, batch: dict, per: list[dict]) -> dict[str, torch.Tensor]:
        """A row-wise loss (QGPO's CEP, the particle target on ``support_q``): each seed draws its noise from its
        own generator, then the N batches are computed as one batch of N * B rows, the targets and the loss
        included. Every seed's loss is a mean over its B rows, so N times the mean over all rows has, for seed
        i's network, the gradient of seed i's loss; and the mean over the seeds is the mean over all rows."""
        from torch.func import vmap
        n = self.n
        draws = [l.noise_draws(b) for l, b in zip(self.learners, per)]
        merged = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
        args, finish = self.learners[0].loss_parts(merged, draws=tuple(torch.cat(x) for x in zip(*draws)))
        args = [None if a is None else a.reshape(n, -1, *a.shape[1:]) for a in args]
        in_dims = (0, 0, *(None if a is None else 0 for a in args))
        f = vmap(self._energy, in_dims=in_dims)(self.params, self.buffers, *args)
        loss, extra = finish(f.reshape(-1))
        return self._update(loss * n, loss.detach(), {k: torch.as_tensor(v).detach() for k, v in extra.items()})

    def _update(self, total: torch.Tensor, loss: torch.Tensor, extra: dict) -> dict[str, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip:
            _clip_per_model([p.grad for p in self.params.values() if p.grad is not None], self.cfg.grad_clip)
        self.opt.step()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        return {"energy_loss": loss, **extra}

    def unstacked(self, i: int, learner: EnergyLearner | None = None) -> EnergyLearner:
        """Learner i (or ``learner``, another of that seed's) with energy network i, its Adam moments and its
        learning-rate schedule: what a run of that seed alone holds after the same steps. Its generator is reset
        to None (torch's global one), as a run's energy learner has it."""
        if not 0 <= i < self.n:
            raise ValueError(f"i: expected a learner index in [0, {self.n}), got {i}")
        learner = self.learners[i] if learner is None else learner
        with torch.no_grad():
            learner.energy.load_state_dict({k: v[i] for k, v in {**self.params, **self.buffers}.items()})
        learner.opt.load_state_dict(_unstack_adam(self.opt, i))
        if self.lr_schedule is not None:
            learner.lr_schedule.load_state_dict(self.lr_schedule.state_dict())
        learner.generator = None
        return learner


class StackedSupportSampler:
    """N seeds' ``support`` stages as one: each step draws K actions of every seed's behaviour model for the
    next chunk of observation rows, in one sampling pass whose network call is the N behaviour networks vmapped.

    ``samplers``: each seed's support sampler (``aepo_lite.rl.agent.SupportSampler``: its finished behaviour
    model, the observation rows and the support config; none has stepped yet); ``generators``: N CPU generators,
    seeded as each seed's support stage seeds its own (the starting noise of seed i is drawn from generator i,
    as :meth:`DiffusionModel.sample` draws it). The solver must draw no noise after the start (not ``ddpm``),
    so that the N seeds' samples are those of N separate passes up to floating-point rounding.
    :meth:`unstacked` gives seed i's actions back in its own sampler.
    """

    what = "support samplers"

    def __init__(self, samplers: list, *, generators: list[torch.Generator]):
        from aepo_lite.core.diffusion import SOLVERS
        if not samplers:
            raise ValueError("seeds: a stacked run needs at least one support sampler")
        if len(generators) != len(samplers):
            raise ValueError(f"generators: expected one per sampler ({len(samplers)}), got {len(generators)}")
        first = samplers[0]
        if any(x.cfg != first.cfg or x.per != first.per or x.obs.shape != first.obs.shape for x in samplers):
            raise ValueError("support: a stacked run needs one support config and one set of observation rows; "
                             "the samplers' differ")
        if first.cfg.solver not in SOLVERS or first.cfg.solver == "ddpm":
            raise ValueError(f"support.solver: stacked support sampling needs a solver that draws no noise after "
                             f"the start, got {first.cfg.solver!r}")
        if any(x.chunks or x.done for x in samplers):
            raise ValueError("support: stack the samplers before their first step (they hold actions already)")
        shapes = [[tuple(p.shape) for p in x.behaviour.net.parameters()] for x in samplers]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError("models: a stacked run needs one architecture; the behaviour models' shapes differ")
        self.samplers, self.n, self.generators = list(samplers), len(samplers), list(generators)
        self.obs, self.cfg, self.per, self.schedule = first.obs, first.cfg, first.per, first.behaviour.schedule
        self.params, self.buffers = _stack(x.behaviour.net for x in samplers)
        self.base = copy.deepcopy(first.behaviour.net).to("meta")
        self.action_dim = first.behaviour.net.action_dim
        self.chunks: list[list[torch.Tensor]] = [[] for _ in samplers]

    def _net(self, params, buffers, a_t, t, s):
        from torch.func import functional_call
        return functional_call(self.base, (params, buffers), (a_t, t, s))

    def _eps(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The N networks on (N * m) rows, seed i's m rows i-th: one vmapped call."""
        from torch.func import vmap
        n = self.n
        out = vmap(self._net)(self.params, self.buffers, x.reshape(n, -1, x.shape[-1]), t.reshape(n, -1),
                              s.reshape(n, -1, s.shape[-1]))
        return out.reshape(x.shape)

    @torch.no_grad()
    def step(self, batch: dict | None = None) -> dict:
        from aepo_lite.core.diffusion import sample
        i, K, d = len(self.chunks[0]) * self.per, self.cfg.k, self.action_dim
        s = self.obs[i:i + self.per].repeat_interleave(K, 0)
        p = self.params[next(iter(self.params))]
        x_T = torch.cat([torch.randn((s.shape[0], d), generator=g, dtype=p.dtype, device=g.device)
                         for g in self.generators]).to(p.device)  # seed i's noise, as its own pass draws it
        a = sample(self._eps, x_T, schedule=self.schedule, cond=s.repeat(self.n, 1), n_steps=self.cfg.steps,
                   solver=self.cfg.solver).clamp(-1.0, 1.0)
        for chunks, ai in zip(self.chunks, a.reshape(self.n, -1, K, d)):
            chunks.append(ai)
        return {}

    def state_dict(self) -> dict:
        return {"chunks": [[c.cpu() for c in ch] for ch in self.chunks],
                "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["generators"]) != self.n:
            raise ValueError(f"seeds: the checkpoint holds {len(state['generators'])} {self.what}, this run has "
                             f"{self.n}")
        self.chunks = [[c.to(self.obs.device) for c in ch] for ch in state["chunks"]]
        for g, st in zip(self.generators, state["generators"]):
            g.set_state(st)

    def unstacked(self, i: int, sampler=None):
        """Seed i's support actions in its own sampler (or ``sampler``, another of that seed's): what its
        support stage alone holds after the same steps."""
        if not 0 <= i < self.n:
            raise ValueError(f"i: expected a sampler index in [0, {self.n}), got {i}")
        sampler = self.samplers[i] if sampler is None else sampler
        sampler.chunks, sampler.done = list(self.chunks[i]), len(self.chunks[i])
        return sampler


class StackedQ:
    """N trained critics' Q(s, a) in one vmapped call: each critic's ``q_fn`` (the minimum of its two target
    heads, :class:`IQLCritic` and :class:`InSupportCritic` alike), no gradient.

    ``__call__(s (N, R, k), a (N, R, d)) -> (N, R)``: row block i through critic i. :meth:`support_q` fills a
    stacked energy batch's ``support_q`` (N, B, K), Q at each seed's support actions, as each seed's own batch
    source computes it (an ``after`` of :class:`StackedBatches`).
    """

    def __init__(self, critics: list):
        if not critics:
            raise ValueError("seeds: a stacked run needs at least one critic")
        shapes = [[tuple(p.shape) for p in c.q_target.parameters()] for c in critics]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError("critics: a stacked Q needs one architecture; the critics' shapes differ")
        self.n = len(critics)
        with torch.no_grad():
            self.params, self.buffers = (({k: v.detach() for k, v in d.items()})
                                         for d in _stack(c.q_target for c in critics))
        self.base = copy.deepcopy(critics[0].q_target).to("meta")

    def _q(self, params, buffers, s, a):
        from torch.func import functional_call
        return torch.minimum(*functional_call(self.base, (params, buffers), (s, a)))

    @torch.no_grad()
    def __call__(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        from torch.func import vmap
        if s.shape[0] != self.n or a.shape[0] != self.n:
            raise ValueError(f"s, a: expected {self.n} stacked blocks (one per critic), got {s.shape[0]} and "
                             f"{a.shape[0]}")
        return vmap(self._q)(self.params, self.buffers, s, a)

    def support_q(self, batch: dict) -> dict:
        """``batch`` (stacked: ``s`` (N, B, k), ``support`` (N, B, K, d)) with ``support_q`` (N, B, K)."""
        sup, s = batch["support"], batch["s"]
        N, B, K, d = sup.shape
        q = self(s.repeat_interleave(K, dim=1), sup.reshape(N, B * K, d)).reshape(N, B, K)
        return dict(batch, support_q=q)
