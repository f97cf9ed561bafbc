"""Several seeds in one process, end to end: the wall time of ``train_seeds`` for N seeds against ``train`` for one,
on a synthetic dataset (no Minari, no simulator: what a GPU machine without them can run).

    python scripts/seeds_timing.py --device cuda --seeds 5 --out /tmp/seeds.json   # the full preset's networks
    python scripts/seeds_timing.py --device cpu --tiny --seeds 2                    # checks it runs (tests)

The runs use the ``full`` preset's networks and batch sizes with ``--steps`` gradient steps per stage (support
actions for every state of the synthetic data, at the preset's K and sampler steps); no evaluation. The first
seed's run is timed alone, then N seeds together (each into fresh folders: nothing is shared between the two),
then the first seed again with ``capture=True`` (each training step one CUDA graph; eager on the CPU).
A short warm-up run first keeps one-off start-up costs (CUDA context, kernels' first launch) out of both.
The issue's target is time(5 seeds) / time(1 seed) <= 1.5 on one GPU; separately it would be 5.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aepo_lite._io import atomic_write_json  # noqa: E402
from aepo_lite.rl.data import OfflineData  # noqa: E402

DATASET = "synthetic/hopper/random-v0"


def synthetic_data(transitions: int, episode_len: int = 250, state_dim: int = 11, action_dim: int = 3,
                   seed: int = 0) -> OfflineData:
    """Random episodes with Hopper's sizes: states, actions in [-1, 1], rewards; every episode truncated."""
    rng = np.random.default_rng(seed)
    n_ep = max(1, -(-transitions // episode_len))
    lens = [episode_len] * (n_ep - 1) + [transitions - episode_len * (n_ep - 1)]
    idx, nxt, offset = [], [], 0
    for T in lens:
        idx.append(offset + np.arange(T))
        nxt.append(offset + np.arange(1, T + 1))
        offset += T + 1
    rewards = rng.normal(size=transitions).astype(np.float32)
    timeouts = np.zeros(transitions, np.float32)
    timeouts[np.cumsum(lens) - 1] = 1.0
    return OfflineData(dataset_id=DATASET, obs_rows=rng.normal(size=(offset, state_dim)).astype(np.float32),
                       idx=np.concatenate(idx), next_idx=np.concatenate(nxt),
                       actions=rng.uniform(-1, 1, (transitions, action_dim)).astype(np.float32), rewards=rewards,
                       terminals=np.zeros(transitions, np.float32), timeouts=timeouts,
                       episode_returns=np.array([r.sum() for r in np.split(rewards, np.cumsum(lens)[:-1])]),
                       action_low=-np.ones(action_dim, np.float32), action_high=np.ones(action_dim, np.float32))


def configs(method: str, seeds: int, steps: int, device: str, tiny: bool):
    from aepo_lite.rl.agent import make_config
    over = {"behaviour": {"steps": steps}, "critic": {"steps": steps}, "energy": {"steps": steps},
            "device": device, "reward_scaling": "none", "log_every": max(steps, 1), "checkpoint_every": 10 ** 9}
    if tiny:
        over.update(behaviour=dict(over["behaviour"], batch=64, hidden=32, blocks=1),
                    critic=dict(over["critic"], batch=64, hidden=32), energy=dict(over["energy"], batch=32, hidden=32,
                                                                                  depth=2),
                    support={"k": 4, "steps": 3})
    return [make_config(DATASET, method, "full", seed=s, **over) for s in range(seeds)]


def work(cfg, data: OfflineData) -> dict:
    """What one seed's run trains, in the bench's stage names and units (steps; support samples): what
    ``aepo_lite.bench.predict`` turns into seconds at a bench's rates (the check of the bench's extrapolation)."""
    from aepo_lite.rl.agent import critic_kind, needs
    out = {"behaviour": cfg.behaviour.steps}
    if cfg.method == "bc":
        return out
    if needs(cfg, "support"):
        out["support_sampling"] = int(data.obs_rows.shape[0]) * cfg.support.k
    out[f"critic_{critic_kind(cfg)}"] = cfg.critic.steps
    out[f"energy_{cfg.method}"] = cfg.energy.steps
    return out


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(device: str = "cpu", seeds: int = 5, methods=("aepo",), steps: int = 300, transitions: int = 5000,
        tiny: bool = False, log=print) -> dict:
    import torch
    from aepo_lite.device import resolve_device
    from aepo_lite.rl.agent import train, train_seeds
    if seeds < 2:
        raise ValueError(f"seeds: time at least 2 seeds together, got {seeds}")
    dev = resolve_device(device)
    data = synthetic_data(transitions)
    out = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "seeds": seeds, "steps_per_stage": steps, "transitions": transitions,
           "tiny": tiny, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = configs(methods[0], 2, 2, str(dev), tiny)
        train_seeds(warm, [tmp / "warm" / f"s{i}" for i in range(2)], stage_cache=tmp / "warm" / "cache", data=data,
                    progress=False)
        for method in methods:
            cfgs = configs(method, seeds, steps, str(dev), tiny)
            _sync(str(dev))
            t0 = time.perf_counter()
            train(cfgs[0], tmp / method / "one", data=data, progress=False)
            _sync(str(dev))
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            train_seeds(cfgs, [tmp / method / f"s{i}" for i in range(seeds)], stage_cache=tmp / method / "cache",
                        data=data, progress=False)
            _sync(str(dev))
            many = time.perf_counter() - t0
            from dataclasses import replace
            t0 = time.perf_counter()  # the same seed with each training step one CUDA graph (eager on the CPU)
            train(replace(cfgs[0], capture=True), tmp / method / "one-captured", data=data, progress=False)
            _sync(str(dev))
            captured = time.perf_counter() - t0
            row = {"method": method, "one_seed_s": one, "n_seeds_s": many, "ratio": many / one,
                   "one_seed_captured_s": captured, "work": work(cfgs[0], data)}
            out["rows"].append(row)
            log(f"  {method}: 1 seed {one:.1f} s, {seeds} seeds together {many:.1f} s: "
                f"time({seeds}) / time(1) = {row['ratio']:.2f} (separately: {seeds}.00); 1 seed with captured "
                f"steps {captured:.1f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["aepo"], help="aepo | qgpo | mse | bc")
    ap.add_argument("--steps", type=int, default=300, help="gradient steps per stage")
    ap.add_argument("--transitions", type=int, default=5000, help="size of the synthetic dataset")
    ap.add_argument("--tiny", action="store_true", help="tiny networks: checks it runs, measures nothing")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run(a.device, a.seeds, tuple(a.methods), a.steps, a.transitions, a.tiny)
    res["seconds"] = time.perf_counter() - t0
    if a.out:
        print(f"wrote {atomic_write_json(a.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
