"""A learner's whole training step replayed as one CUDA graph: forward, backward, optimiser step and target
update, with the batch drawn on the device, so a step of a small network costs one graph launch instead of
hundreds of kernel launches (docs/gpu.md).

:class:`CapturedStep` wraps any learner with ``step(batch) -> dict`` (the behaviour, critic and energy
learners). Two ways to feed it:

- ``step(batch)``: the batch is copied into static buffers (made from an ``example`` batch) and the graph
  of ``learner.step(buffers)`` is replayed. It is a :class:`~aepo_lite.training.learners.Learner`, so a
  :class:`~aepo_lite.training.stages.Stage` can train it. A batch of another shape is refused.
- ``run()``: with a ``source`` (a call that makes a batch on the device, e.g. :class:`DeviceBatches`, which
  gathers rows of device-resident data at indices drawn by a seeded device generator), the graph holds
  ``steps_per_replay`` whole steps, batch draws included; nothing crosses from the host.

On CUDA the first call captures: the optimisers are made capturable (Adam with ``capturable=True``), a few
warm-up steps run on a side stream (cuBLAS workspaces, lazily made optimisers and their state), the step is
captured, and then every value the warm-up changed is put back (parameters, buffers, optimiser moments,
random-number states), so the n-th replay computes the n-th step of a plain eager run. On the CPU the same
happens except the capture: the warm-up runs and is undone, then every call runs the step eagerly; the
tests check this bookkeeping there (N steps through the buffers == N plain steps, bit for bit).

Outputs of a replay are static tensors that the next replay overwrites: read (or clone) them before it.
A learner's learning-rate schedule (``lr_schedule``) is stepped between replays, outside the graph; on CUDA
the optimiser then reads its rate from a device tensor that the schedule fills (one step per replay). A step
that synchronises with the host cannot be captured (``.item()``, ``torch.linalg.eigh``, the error check of
``linalg.solve``): it raises :class:`CaptureError`, or runs eagerly with ``fallback=True``. AEPO's Gaussian
posterior avoids them where the energy learner skips its checks, on CUDA (Jacobi sweeps for ``eigh``, unchecked
solves: :func:`aepo_lite.core.guidance.jacobi_eigh`).

That can be seen without a GPU: on the CPU one warm-up step runs as CUDA would run it (no NaN checks, optimiser
steps aside) under :func:`host_syncs`, and ``host_syncs`` lists the operators of :data:`SYNC_OPS` it met (empty:
none of those known to synchronise; the capture on a GPU remains the test).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.optim import optimizer as _opt_hooks
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from aepo_lite.training.stages import Stage

__all__ = ["CapturedStep", "CaptureError", "DeviceBatches", "CapturedLearner", "captured_stage", "host_syncs",
           "SYNC_OPS"]


# The operators this library can meet that read a device value back to the host on CUDA, which a CUDA graph
# cannot hold (a known list, not every operator torch has): name -> what calls it.
SYNC_OPS = {
    "aten._local_scalar_dense": ".item(), bool(), float() or int() of a tensor (e.g. an if on a tensor)",
    "aten._linalg_check_errors": "a torch.linalg error check (linalg.solve, cholesky, inv; the *_ex forms skip it)",
    "aten._linalg_eigh": "torch.linalg.eigh (its CUDA kernel checks the solver's flag on the host)",
    "aten.nonzero": "nonzero or where(cond) (an output whose size depends on the values)",
    "aten.masked_select": "masked_select (an output whose size depends on the values)",
    "aten.index.Tensor[bool]": "indexing with a boolean mask (nonzero underneath)",
    "aten.repeat_interleave.Tensor": "repeat_interleave with tensor repeats and no output_size",
    "aten._unique2": "unique (an output whose size depends on the values)",
    "aten.equal": "torch.equal (a Python bool)",
}


class _SyncRecorder(TorchDispatchMode):
    """Records the :data:`SYNC_OPS` that the operators called under it would run on CUDA."""

    def __init__(self, skip_optimisers: bool = False):
        super().__init__()
        self.found: list[str] = []
        self.skip_optimisers, self.paused, self._hooks = skip_optimisers, False, []

    def _pause(self, on: bool) -> None:
        self.paused = on

    def __enter__(self):
        if self.skip_optimisers:  # a CapturedStep makes them capturable on CUDA: their step then reads nothing back
            self._hooks = [_opt_hooks.register_optimizer_step_pre_hook(lambda *_: self._pause(True)),
                           _opt_hooks.register_optimizer_step_post_hook(lambda *_: self._pause(False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 else ())):
            name = "aten.index.Tensor[bool]"
        elif str(func) == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size") is None:
            name = "aten.repeat_interleave.Tensor"  # the other overloads come here as this one
        if name in SYNC_OPS and name not in self.found:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable, *args, skip_optimisers: bool = False, **kwargs) -> list[str]:
    """The :data:`SYNC_OPS` that ``fn(*args, **kwargs)`` calls, in the order first met (each once): the
    operators that would synchronise with the host on CUDA, so that a CUDA graph of ``fn`` could not be captured.
    ``skip_optimisers``: optimiser steps are not recorded (on CUDA the library's Adam is fused, or capturable in a
    captured step, and reads nothing back; the CPU's reads its step count).
    It runs ``fn`` once, on any device (the CPU included: a check that needs no GPU). An empty list says that none
    of the known operators ran, not that capture will succeed (docs/gpu.md). On the CPU it cannot tell a tensor
    that a CUDA run keeps on the device from one it keeps on the host (e.g. a time grid made on the CPU), whose
    reads cost no synchronisation: a name found there is a place to look, not a proof."""
    with _SyncRecorder(skip_optimisers) as rec:
        fn(*args, **kwargs)
    return rec.found


class CaptureError(ValueError):
    """A learner's step could not be captured as a CUDA graph (the message names the learner and the cause)."""


class DeviceBatches:
    """Batches of device-resident data: ``batch_of(i)`` gathers rows ``i`` (B,), drawn uniformly from ``range(n)``
    by a generator on ``device`` seeded with ``seed`` (the same seed draws the same indices)."""

    def __init__(self, batch_of: Callable[[torch.Tensor], dict], n: int, batch: int, device, seed: int = 0):
        for name, v in (("n", n), ("batch", batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.batch_of, self.n, self.batch, self.device = batch_of, n, batch, torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def draw(self) -> torch.Tensor:
        """(batch,) int64 indices in [0, n), on the device."""
        return torch.randint(0, self.n, (self.batch,), device=self.device, generator=self.generator)

    def __call__(self) -> dict:
        return self.batch_of(self.draw())


def _check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} was asked for a captured step but CUDA is not available here; "
                         "use the CPU (the step then runs eagerly)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: a captured step runs on CUDA (or eagerly on the CPU), got {str(device)!r}")
    return device


def _parts(learner) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """The learner's networks and optimisers (attributes; a learner that is itself a module counts)."""
    attrs = list(vars(learner).values())
    modules = ([learner] if isinstance(learner, nn.Module) else []) + [v for v in attrs if isinstance(v, nn.Module)]
    return modules, [v for v in attrs if isinstance(v, torch.optim.Optimizer)]


def _capturable(opts, device: torch.device) -> None:
    """Adam with ``capturable=True``: its step counts live on the device, and step() reads no host value."""
    for opt in opts:
        for group in opt.param_groups:
            group["capturable"] = True
        for st in opt.state.values():
            if isinstance(st.get("step"), torch.Tensor) and st["step"].device != device:
                st["step"] = st["step"].to(device)


def _tensor_lr(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 0-d tensor on the device (a schedule then ``fill_`` s it in place)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


class CapturedStep:
    """``learner.step`` as one CUDA graph on CUDA, eagerly on the CPU (see the module docstring).

    Exactly one of ``example`` (a batch dict: :meth:`step` copies batches of its shapes into static buffers)
    or ``source`` (a call returning a batch made on the device: :meth:`run`). ``steps_per_replay`` steps per
    :meth:`run` (source only). ``graph=False`` runs the same bookkeeping without capturing (the eager
    reference on CUDA). ``warmup``: steps run, then undone, before the capture. A step that cannot be captured
    (it synchronises with the host: ``torch.linalg.eigh``, ``.item()``) raises :class:`CaptureError` naming the
    learner and the error, after the warm-up is undone; with ``fallback=True`` it runs eagerly instead and says
    why in ``capture_error`` (the bench records it).
    """

    def __init__(self, learner, *, device, example: dict | None = None, source: Callable[[], dict] | None = None,
                 steps_per_replay: int = 1, warmup: int = 3, graph: bool = True, fallback: bool = False):
        self.device = _check_device(device)
        if (example is None) == (source is None):
            raise ValueError("example/source: give exactly one (an example batch for step(batch), or a source of "
                             "device batches for run())")
        if isinstance(steps_per_replay, bool) or not isinstance(steps_per_replay, int) or steps_per_replay < 1:
            raise ValueError(f"steps_per_replay: expected a positive integer, got {steps_per_replay!r}")
        if example is not None and steps_per_replay != 1:
            raise ValueError("steps_per_replay: static buffers hold one batch; use a source for several steps per "
                             f"replay, got {steps_per_replay}")
        if getattr(learner, "lr_scheduler", None) is not None:
            raise ValueError("lr_decay: a captured step steps only a learner's lr_schedule between replays; this "
                             "learner's lr_scheduler would be replayed at its first rate")
        self._schedule = getattr(learner, "lr_schedule", None)
        if self._schedule is not None and steps_per_replay != 1:
            raise ValueError(f"steps_per_replay: a decaying learning rate changes after every step, so a replay "
                             f"holds one step; got {steps_per_replay} (or train with lr_decay off)")
        self.learner, self.source, self.steps_per_replay = learner, source, steps_per_replay
        self.warmup, self.graph_on = int(warmup), graph and self.device.type == "cuda"
        self.buffers = None if example is None else {k: None if v is None else v.detach().to(self.device, copy=True)
                                                     for k, v in example.items()}  # on the device, whatever example's
        self.fallback, self.capture_error, self.host_syncs = fallback, None, None
        self._graph, self._out, self._ready = None, None, False

    @property
    def ready(self) -> bool:
        """Whether the first call has prepared the step (warmed up, captured or fallen back)."""
        return self._ready

    @property
    def captured(self) -> bool:
        """Whether calls replay a CUDA graph (False before the first call, on the CPU, and after a fallback)."""
        return self._graph is not None

    # ------------------------------------------------------------------ the learner interface
    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Copy ``batch`` into the static buffers and run one step (a replay on CUDA); metrics as 0-d tensors."""
        if self.buffers is None:
            raise ValueError("batch: this captured step draws its own batches (source); call run()")
        self._check_batch(batch)
        with torch.no_grad():
            for k, buf in self.buffers.items():
                if buf is not None:
                    buf.copy_(batch[k])
        return self.run()

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load into the learner; the next call captures again (loading replaces optimiser state tensors)."""
        self.learner.load_state_dict(state)
        self._graph, self._out, self._ready = None, None, False

    def run(self) -> dict[str, torch.Tensor]:
        """``steps_per_replay`` steps (one replay on CUDA); the last step's metrics (static: read before the next).
        A learner's ``lr_schedule`` is stepped after the step, outside the graph (on CUDA the optimiser reads its
        learning rate from a device tensor that the schedule fills)."""
        if not self._ready:
            self._prepare()
        if self._graph is None:
            out = self._body()
        else:
            self._graph.replay()
            out = self._out
        if self._schedule is not None:
            self._schedule.step()
        return out

    # ------------------------------------------------------------------ capture
    def _body(self) -> dict[str, torch.Tensor]:
        """The learner's steps without its schedule (stepped by :meth:`run`, between replays)."""
        out = None
        if self._schedule is not None:
            self.learner.lr_schedule = None
        try:
            for _ in range(self.steps_per_replay):
                out = self.learner.step(self.buffers if self.source is None else self.source())
        finally:
            if self._schedule is not None:
                self.learner.lr_schedule = self._schedule
        return out

    def _check_batch(self, batch: dict) -> None:
        if set(batch) != set(self.buffers):
            raise ValueError(f"batch: keys {sorted(batch)} differ from the captured buffers' {sorted(self.buffers)}")
        for k, buf in self.buffers.items():
            v = batch[k]
            if (buf is None) != (v is None):
                raise ValueError(f"batch: {k!r} is {'None' if v is None else 'a tensor'} but was "
                                 f"{'None' if buf is None else 'a tensor'} when the step was captured")
            if buf is not None and tuple(v.shape) != tuple(buf.shape):
                raise ValueError(f"batch size: batch[{k!r}] has shape {tuple(v.shape)} but the captured buffers hold "
                                 f"{tuple(buf.shape)} (a CUDA graph replays fixed shapes); make another CapturedStep "
                                 f"for batch size {v.shape[0] if v.ndim else v.shape}")

    def _generators(self) -> list[torch.Generator]:
        gens = [getattr(self.learner, "generator", None), getattr(self.source, "generator", None)]
        return [g for g in gens if isinstance(g, torch.Generator)]

    def _snapshot(self) -> dict:
        modules, opts = _parts(self.learner)
        tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
        state = {id(p): {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
                 for opt in opts for p, st in opt.state.items()}
        rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()
        return {"tensors": [(t, t.detach().clone()) for t in tensors.values()], "opt_state": state,
                "generators": [(g, g.get_state()) for g in self._generators()], "rng": rng}

    def _restore(self, snap: dict) -> None:
        """Put back the values of ``snap``, in place (the graph holds these tensors); optimiser state made since
        the snapshot is zeroed, which is Adam's initial state."""
        _, opts = _parts(self.learner)
        with torch.no_grad():
            for t, v in snap["tensors"]:
                t.copy_(v)
            for opt in opts:
                for p, st in opt.state.items():
                    saved = snap["opt_state"].get(id(p), {})
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor) and k in saved:
                            v.copy_(saved[k])
                        elif isinstance(v, torch.Tensor):
                            v.zero_()
        for g, s in snap["generators"]:
            g.set_state(s)
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(snap["rng"], self.device)
        else:
            torch.set_rng_state(snap["rng"])

    def _prepare(self) -> None:
        """Warm up, capture (CUDA only), undo the warm-up."""
        snap = self._snapshot()
        _, opts = _parts(self.learner)
        if self.device.type == "cuda":
            _capturable(opts, self.device)
            if self._schedule is not None:  # the graph reads the rate the schedule fills in between replays
                _tensor_lr(self._schedule.optimizer, self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            _capturable(_parts(self.learner)[1], self.device)  # optimisers made lazily in the warm-up
        else:
            for _ in range(self.warmup - 1):
                self._body()
            self.host_syncs = self._audit()  # a warm-up step too (undone below)
        try:
            if self.graph_on:
                self._graph = self._capture()
        except RuntimeError as e:  # torch's CUDA errors (AcceleratorError) are RuntimeErrors
            self._graph, self._out = None, None
            self.capture_error = (f"{type(self.learner).__name__}.step could not be captured as a CUDA graph: "
                                  f"{str(e).strip().splitlines()[0]}")
            if not self.fallback:
                raise CaptureError(f"capture: {self.capture_error}. Something in the step synchronises with the host "
                                   "or cannot be captured (run on the CPU, CapturedStep.host_syncs names the known "
                                   "operators that do); run it eagerly (graph=False, or without --capture)") from e
        finally:
            self._restore(snap)
        self._ready = True

    def _audit(self) -> list[str]:
        """One step under the recorder, as CUDA would run it: without the learner's NaN checks (``check_finite``,
        off on CUDA) and with optimiser steps unrecorded (capturable on CUDA); the :data:`SYNC_OPS` met."""
        check = getattr(self.learner, "check_finite", None)
        if check is not None:
            self.learner.check_finite = False
        try:
            with _SyncRecorder(skip_optimisers=True) as rec:
                self._body()
        finally:
            if check is not None:
                self.learner.check_finite = check
        return rec.found

    def _capture(self) -> "torch.cuda.CUDAGraph":
        g = torch.cuda.CUDAGraph()
        for gen in self._generators():
            if gen.device.type == "cuda":
                if not hasattr(g, "register_generator_state"):
                    raise ValueError("generator: this torch cannot capture draws from a custom CUDA generator "
                                     "(CUDAGraph.register_generator_state); use the default generator or graph=False")
                g.register_generator_state(gen)
        with torch.cuda.graph(g):
            self._out = self._body()
        return g


class _Source:
    """A stage's batch source bound to the stage loop's generator: what a captured step draws in its graph."""

    def __init__(self, batches, generator: torch.Generator):
        self.batches, self.generator = batches, generator

    def __call__(self) -> dict:
        return self.batches(self.generator)


class CapturedLearner:
    """A stage's learner whose every step, its batch draw included, is one CUDA graph: at the first step the
    stage loop's generator (``batch["generator"]``) becomes the source's, so the graph draws the same indices
    from the same generator as the plain run, and ``run_stage`` checkpoints and restores that generator as
    usual. The learner's state is the plain learner's (checkpoints are interchangeable with a plain run's)."""

    def __init__(self, learner, batches, device: torch.device):
        self.learner, self.batches, self.device, self.cap = learner, batches, device, None

    def step(self, batch: dict) -> dict:
        if self.cap is None:
            self.cap = CapturedStep(self.learner, device=self.device, source=_Source(self.batches, batch["generator"]),
                                    fallback=True)
        return self.cap.run()

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)
        self.cap = None  # captured again at the next step (loading replaces optimiser state tensors)

    def how(self) -> str | None:
        """How the steps ran: ``graph``, why they could not be captured, or eager on a device without graphs."""
        if self.cap is None or not self.cap.ready:
            return None
        if self.cap.captured or self.cap.capture_error:
            return "graph" if self.cap.captured else self.cap.capture_error
        return f"eager (no CUDA graphs on {self.device.type}){_sync_verdict(self.cap.host_syncs)}"


def _sync_verdict(found: list[str] | None) -> str:
    """What the CPU's audit says about CUDA, for ``how()`` ("" when there was none)."""
    if found is None:
        return ""
    if not found:
        return "; no host synchronisation found, so it should capture on CUDA"
    return "; it would not capture on CUDA, it synchronises with the host in " + "; ".join(
        f"{SYNC_OPS[op]} [{op}]" for op in found)


def captured_stage(st: Stage, device) -> Stage:
    """``st`` with each step of its learner, the batch draw included, one CUDA graph (:class:`CapturedStep` with
    the stage's own batch source on the stage loop's generator; the warm-up undone, so the run's draws are
    those of the plain run). A step that cannot be captured runs eagerly (its stats say why); the sampling
    stage is left as it is."""
    from dataclasses import replace
    if st.name not in ("behaviour", "critic", "energy"):
        return st
    make, batches = st.learner, st.batches
    return replace(st, learner=lambda: CapturedLearner(make(), batches, torch.device(device)),
                   batches=lambda g: {"generator": g})
