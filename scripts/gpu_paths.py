"""Side-by-side timings of the GPU-speed paths (docs/gpu.md), old against new in one process, interleaved,
on any device; and several seeds trained in one process (:mod:`aepo_lite.training.stacked`).

    python scripts/gpu_paths.py --device cpu                       # every part, the sizes below
    python scripts/gpu_paths.py --device cuda --out figures/bench_cuda_paths.json
    python scripts/gpu_paths.py --device cpu --tiny --parts jacobian twinq   # checks it runs (tests)

Parts (each prints median ms per call over ``--rounds`` interleaved rounds and the ratio old / new, > 1: the
new path is faster; ``ops`` is the number of aten operators one call runs, a proxy for kernel launches):

  jacobian   the Tweedie covariance's Jacobian of eps_theta in a_t (the default NoiseNet, Hopper's d = 3 and
             d = 6) and the Hessian of Q in a (TwinQ 2 x 256, ``critic_expansion(order=2)``): the loop of d
             backward passes against ``rowwise_jacobian``'s ``vmap`` (one vmapped backward pass) and ``rows``
             (one pass over the rows repeated d times)
  twinq      ``IQLCritic.step`` and ``InSupportCritic.step`` (K = 16) with the earlier TwinQ (two MLPs) against
             the batched TwinQ, batch 256, 2 x 256 Mish
  captured   ``IQLCritic.step`` on device-drawn batches: eager against ``CapturedStep`` (1 and 8 steps per
             replay); on the CPU both run eagerly (the ratio shows the bookkeeping costs nothing)
  seeds      N behaviour models trained together (``StackedBehaviourLearner``: stacked parameters, one vmapped
             loss, one Adam; what ``train --seeds`` and ``sweep --stack-seeds`` run) against one; the same for
             N IQL critics (``StackedCritic``, batch 256) and N AEPO energy learners (``StackedEnergyLearner``,
             the default particle target, batch 256), and one chunk of support actions (``StackedSupportSampler``:
             4096 actions a seed, 15 dpmpp2m steps): time(N seeds together) / time(1 seed), N = 4 and 8

Nothing is asserted here; the tests (tests/test_gpu_paths.py) check the numbers of each path.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aepo_lite import bench  # noqa: E402
from aepo_lite._io import atomic_write_json  # noqa: E402
from aepo_lite.config import CriticConfig, EnergyConfig  # noqa: E402
from aepo_lite.core import aepo  # noqa: E402
from aepo_lite.core.aepo import JACOBIANS, EnergyLearner, critic_expansion, rowwise_jacobian  # noqa: E402
from aepo_lite.core.critics import IQLCritic, InSupportCritic  # noqa: E402
from aepo_lite.core.diffusion import DiffusionModel  # noqa: E402
from aepo_lite.core.nets import MLP, EnergyNet, NoiseNet, TwinQ  # noqa: E402
from aepo_lite.core.schedule import VPSchedule  # noqa: E402
from aepo_lite.device import resolve_device  # noqa: E402
from aepo_lite.training import BehaviourLearner  # noqa: E402
from aepo_lite.training.captured import CapturedStep, DeviceBatches  # noqa: E402
from aepo_lite.training.stacked import (StackedBehaviourLearner, StackedCritic, StackedEnergyLearner,  # noqa: E402
                                        StackedSupportSampler)

PARTS = ("jacobian", "twinq", "captured", "seeds")


# ----------------------------------------------------------------------------- the earlier TwinQ (reference)
class OldTwinQ(nn.Module):
    """The TwinQ layout before it was batched: two independent MLPs."""

    def __init__(self, state_dim, action_dim, hidden=256, depth=2, activation="mish", layer_norm=False):
        super().__init__()
        self.q1 = MLP(state_dim + action_dim, 1, hidden, depth, activation, layer_norm)
        self.q2 = MLP(state_dim + action_dim, 1, hidden, depth, activation, layer_norm)

    def forward(self, s, a):
        x = torch.cat([s, a], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, s, a):
        return torch.minimum(*self(s, a))


# ----------------------------------------------------------------------------- timing
# operators that launch no kernel: views and metadata (their storage is another tensor's, or uninitialised)
_NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "as_strided", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind",
    "detach", "alias", "lift_fresh", "empty", "empty_strided", "empty_like", "resize_", "result_type", "view_as",
    "broadcast_to", "movedim", "flatten", "unflatten", "_has_compatible_shallow_copy_type", "is_same_size"))


def _ops(fn) -> tuple[int, int]:
    """(aten operators one call runs, the innermost of them that launch a kernel): the second a closer proxy for
    kernel launches on a GPU (a composite operator counts once, through the operators it calls; views none)."""
    from torch.profiler import profile
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    leaves = sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children
                 and e.name not in _NO_KERNEL)
    return ops, leaves


def side_by_side(fns: dict, device: torch.device, rounds: int, min_time: float) -> dict:
    """Median seconds per call of each of ``fns`` over ``rounds`` rounds, each round timing every one (alternating
    the order); ``{name: {"ms", "ops"}}``."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k] += bench.time_call(fns[k], device=device, warmup=1, min_time=min_time, repeats=1)
    out = {}
    for k, v in times.items():
        ops, launches = _ops(fns[k])
        out[k] = {"ms": 1e3 * statistics.median(v), "ops": ops, "launches": launches}
    return out


def _row(name: str, res: dict, old: str, new: str, log) -> dict:
    ratio = res[old]["ms"] / res[new]["ms"]
    log(f"  {name:<34} {old} {res[old]['ms']:8.2f} ms ({res[old]['ops']:5d} ops)   {new} {res[new]['ms']:8.2f} ms "
        f"({res[new]['ops']:5d} ops)   {old}/{new} {ratio:5.2f}x")
    return {"name": name, "old": old, "new": new, "ms": {old: res[old]["ms"], new: res[new]["ms"]},
            "ops": {old: res[old]["ops"], new: res[new]["ops"]},
            "launches": {old: res[old]["launches"], new: res[new]["launches"]}, "ratio": ratio}


def _seeds_row(name: str, res: dict, n: int, log) -> dict:
    """A row timing ``n`` seeds stacked (``res[f"{n}_seeds"]``) against one (``res["one_seed"]``)."""
    row = _row(name, res, f"{n}_seeds", "one_seed", log)
    row["seconds_n_over_1"] = row["ratio"]
    row["launches_n_over_1"] = row["launches"][f"{n}_seeds"] / row["launches"]["one_seed"]
    log(f"    time({n} seeds together) / time(1 seed) = {row['ratio']:.2f}, kernel-launching operators "
        f"{row['launches_n_over_1']:.2f} (separately: {n}.00)")
    return row


# ----------------------------------------------------------------------------- the parts
@contextlib.contextmanager
def _jacobian_method(method: str):
    """critic_expansion with rowwise_jacobian's method fixed (it uses the device's default)."""
    real = aepo.rowwise_jacobian
    aepo.rowwise_jacobian = functools.partial(real, method=method)
    try:
        yield
    finally:
        aepo.rowwise_jacobian = real


def part_jacobian(device, sizes, rounds, min_time, log) -> list:
    rows = []
    for B, d in sizes["jacobian"]:
        torch.manual_seed(0)
        net = NoiseNet(d, 11, **sizes["noise"]).to(device)
        x0, t, s = torch.randn(B, d, device=device), torch.rand(B, device=device), torch.randn(B, 11, device=device)

        f = lambda x: net(x, t.repeat(x.shape[0] // B), s.repeat(x.shape[0] // B, 1))  # noqa: E731
        fns = {m: (lambda m=m: rowwise_jacobian(f, x0, method=m)) for m in JACOBIANS}
        res = side_by_side(fns, device, rounds, min_time)
        rows += [_row(f"tweedie jacobian B={B} d={d}", res, "loop", m, log) for m in JACOBIANS[1:]]
    B, d = sizes["hessian"]
    q = TwinQ(11, d, **sizes["q"]).to(device)
    s, a = torch.randn(B, 11, device=device), torch.randn(B, d, device=device)

    def hessian(method):
        with _jacobian_method(method):
            return critic_expansion(q.q_min, s, a, order=2)
    res = side_by_side({m: functools.partial(hessian, m) for m in JACOBIANS}, device, rounds, min_time)
    rows += [_row(f"critic hessian B={B} d={d}", res, "loop", m, log) for m in JACOBIANS[1:]]
    return rows


def _critic(cls, cfg, device, old: bool):
    torch.manual_seed(0)
    c = cls(11, 3, cfg)
    if old:
        c.q = OldTwinQ(11, 3, cfg.hidden, cfg.depth, cfg.activation, cfg.layer_norm)
        c.q_target = copy.deepcopy(c.q).requires_grad_(False)
    return c.to(device)


def _critic_data(device, n=4096, K=16):
    g = torch.Generator().manual_seed(0)
    d = {"s": torch.randn(n, 11, generator=g), "a": torch.rand(n, 3, generator=g) * 2 - 1,
         "r": torch.randn(n, generator=g), "s2": torch.randn(n, 11, generator=g),
         "done": torch.zeros(n), "support2": torch.rand(n, K, 3, generator=g) * 2 - 1}
    return {k: v.to(device) for k, v in d.items()}


def part_twinq(device, sizes, rounds, min_time, log) -> list:
    cfg = replace(CriticConfig(), **sizes["critic"])
    data = _critic_data(device, K=sizes["k"])
    rows = []
    for cls in (IQLCritic, InSupportCritic):
        src = DeviceBatches(lambda i: {k: v[i] for k, v in data.items()}, len(data["s"]), sizes["batch"], device)
        old, new = _critic(cls, cfg, device, True), _critic(cls, cfg, device, False)
        fns = {"two_mlps": lambda: old.step(src()), "batched": lambda: new.step(src())}
        rows.append(_row(f"{cls.__name__}.step B={sizes['batch']}", side_by_side(fns, device, rounds, min_time),
                         "two_mlps", "batched", log))
    return rows


def part_captured(device, sizes, rounds, min_time, log) -> list:
    cfg = replace(CriticConfig(), **sizes["critic"])
    data = _critic_data(device, K=sizes["k"])
    gather = lambda i: {k: v[i] for k, v in data.items()}  # noqa: E731
    src = DeviceBatches(gather, len(data["s"]), sizes["batch"], device)
    eager = _critic(IQLCritic, cfg, device, False)
    caps = {k: CapturedStep(_critic(IQLCritic, cfg, device, False), device=device, steps_per_replay=k,
                            source=DeviceBatches(gather, len(data["s"]), sizes["batch"], device)) for k in (1, 8)}
    fns = {"eager": lambda: eager.step(src()), "captured": caps[1].run}
    rows = [_row(f"IQLCritic.step B={sizes['batch']} (1 per replay)", side_by_side(fns, device, rounds, min_time),
                 "eager", "captured", log)]
    fns = {"eager": lambda: [eager.step(src()) for _ in range(8)], "captured": caps[8].run}
    rows.append(_row(f"IQLCritic.step B={sizes['batch']} x 8 (8 per replay)",
                     side_by_side(fns, device, rounds, min_time), "eager", "captured", log))
    return rows


def _behaviours(n, device, sizes):
    models, gens = [], []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(DiffusionModel(NoiseNet(3, 11, **sizes["noise"])).to(device))
        gens.append(torch.Generator(device=device).manual_seed(100 + seed))
    return models, gens


def _seed_rows(name, one, make_stacked, draw, device, sizes, rounds, min_time, log) -> list:
    """time(N seeds stacked) / time(1 seed) for each N: ``one`` a single learner, ``make_stacked(n)`` N of them
    stacked, ``draw()`` one seed's batch (the stacked step gets n of them stacked)."""
    rows = []
    for n in sizes["seeds"]:
        stacked = make_stacked(n)
        fns = {"one_seed": lambda: one.step(draw()),
               f"{n}_seeds": lambda: stacked.step({k: torch.stack(v) for k, v in
                                                   zip(draw().keys(), zip(*[draw().values() for _ in range(n)]))})}
        res = side_by_side(fns, device, rounds, min_time)
        rows.append(_seeds_row(f"{name}: {n} seeds stacked vs 1", res, n, log))
    return rows


def part_seeds(device, sizes, rounds, min_time, log) -> list:
    data = _critic_data(device, K=1)
    B = sizes["behaviour_batch"]
    draw = lambda: {"a": data["a"][torch.randint(0, len(data["a"]), (B,), device=device)],  # noqa: E731
                    "s": data["s"][torch.randint(0, len(data["a"]), (B,), device=device)]}
    models, gens = _behaviours(1, device, sizes)
    one = BehaviourLearner(models[0], 1e-4, generator=gens[0])
    def behaviours(n):
        models, gens = _behaviours(n, device, sizes)
        return StackedBehaviourLearner(models, 1e-4, generators=gens)
    rows = _seed_rows(f"behaviour B={B}", one, behaviours, draw, device, sizes, rounds, min_time, log)
    cfg = replace(CriticConfig(), **sizes["critic"])
    src = DeviceBatches(lambda i: {k: v[i] for k, v in data.items() if k != "support2"}, len(data["s"]),
                        sizes["batch"], device)
    rows += _seed_rows(f"IQL critic B={sizes['batch']}", _critic(IQLCritic, cfg, device, False),
                       lambda n: StackedCritic([_critic(IQLCritic, cfg, device, False) for _ in range(n)]),
                       src, device, sizes, rounds, min_time, log)
    # the default AEPO energy (particle target, centered): targets seed by seed, the N energy networks as one
    K, B = sizes["k"], sizes["batch"]
    sup = torch.rand(len(data["s"]), K, 3, device=device) * 2 - 1
    sup_q = torch.randn(len(data["s"]), K, device=device)
    esrc = DeviceBatches(lambda i: {"s": data["s"][i], "a": data["a"][i], "support": sup[i], "support_q": sup_q[i]},
                         len(data["s"]), B, device)

    def energy_learner(seed):
        torch.manual_seed(seed)
        return EnergyLearner(EnergyNet(3, 11, **sizes["energy"]).to(device), replace(EnergyConfig(), **sizes["energy"]),
                             schedule=VPSchedule(), method="aepo")
    rows += _seed_rows(f"AEPO energy B={B} K={K}", energy_learner(0),
                       lambda n: StackedEnergyLearner([energy_learner(i) for i in range(n)], generators=[
                           torch.Generator(device=device).manual_seed(i) for i in range(n)]),
                       esrc, device, sizes, rounds, min_time, log)
    rows += _support_rows(data["s"], device, sizes, rounds, min_time, log)
    return rows


def _support_rows(obs, device, sizes, rounds, min_time, log) -> list:
    """One chunk of support actions (K for each of chunk / K rows) of 1 seed against N seeds in one pass."""
    from aepo_lite.config import TrainConfig
    from aepo_lite.rl.agent import SupportSampler
    cfg = TrainConfig()
    cfg.support.k, cfg.support.solver, cfg.support.steps = sizes["k"], "dpmpp2m", 15
    chunk = sizes["behaviour_batch"]

    def sampler(seed):
        torch.manual_seed(seed)
        return SupportSampler(DiffusionModel(NoiseNet(3, 11, **sizes["noise"])).to(device), obs, cfg, chunk=chunk,
                              per_call=1)  # one chunk a pass, as the stacked pass samples one chunk of each seed
    one, g, rows = sampler(0), torch.Generator().manual_seed(0), []

    def step(x, batch):
        x.chunks = [[] for _ in x.chunks] if isinstance(x, StackedSupportSampler) else []  # always the first chunk
        return x.step(batch)
    for n in sizes["seeds"]:
        stacked = StackedSupportSampler([sampler(i) for i in range(n)],
                                        generators=[torch.Generator().manual_seed(i) for i in range(n)])
        res = side_by_side({"one_seed": lambda: step(one, {"generator": g}), f"{n}_seeds": lambda: step(stacked, {})},
                           device, rounds, min_time)
        rows.append(_seeds_row(f"support actions {chunk} a seed, K={cfg.support.k}: {n} seeds stacked vs 1", res, n,
                               log))
    return rows


SIZES = {"full": {"jacobian": [(256, 3), (256, 6), (1, 3)], "hessian": (256, 3), "noise": {},
                  "q": {"hidden": 256, "depth": 2}, "critic": {"hidden": 256, "depth": 2}, "k": 16, "batch": 256,
                  "behaviour_batch": 4096, "seeds": (4, 8), "energy": {"hidden": 256, "depth": 3}},
         "tiny": {"jacobian": [(8, 3), (1, 1)], "hessian": (8, 2), "noise": {"hidden": 16, "n_blocks": 1},
                  "q": {"hidden": 16, "depth": 2}, "critic": {"hidden": 16, "depth": 2}, "k": 2, "batch": 8,
                  "behaviour_batch": 16, "seeds": (2,), "energy": {"hidden": 16, "depth": 2}}}


def run(device: str = "cpu", parts=PARTS, tiny: bool = False, rounds: int = 5, min_time: float = 0.5,
        log=print) -> dict:
    """Every part asked for; ``{"device", "parts": {part: [rows]}}`` (JSON-ready)."""
    dev = resolve_device(device)
    sizes = SIZES["tiny" if tiny else "full"]
    out = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "tiny": tiny, "parts": {}}
    for p in parts:
        log(f"{p}:")
        out["parts"][p] = globals()[f"part_{p}"](dev, sizes, rounds, min_time, log)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: checks it runs, measures nothing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per timed loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = run(a.device, a.parts, a.tiny, a.rounds, a.min_time)
    res["seconds"] = time.perf_counter() - t0
    if a.out:
        print(f"wrote {atomic_write_json(a.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
