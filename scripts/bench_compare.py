"""The speed bench of two source trees side by side: is one slower than the other on this machine?

    git worktree add /tmp/aepo-old <commit>
    python scripts/bench_compare.py --old /tmp/aepo-old --new . --rounds 8 --threads 1 --out /tmp/bench_compare

One worker process per tree (``PYTHONPATH`` set to it) builds that tree's bench stages with its own
``aepo_lite.bench`` at the same sizes, runs each stage in order (a bench that freezes a network after
its stage gets it frozen; each later block of a stage runs with the flags of its first run), and
sizes a block of calls to last about ``--min-time`` seconds.
Then, round after round, stage after stage, the two workers time one block each, back to back, old
first on even rounds and new first on odd ones: on a machine shared with other processes both sides
of a pair see nearly the same load. Each block is timed by the wall clock and by the process's CPU
time (with one torch thread, the CPU time is what other processes on a shared machine move least;
it means nothing on CUDA). The table gives, per stage, the median rate of each side and the median
over rounds of the per-round ratio new / old (> 1: the new tree is faster), and the 1-minute load
average over the rounds.

A tree whose ``BenchConfig`` has the config parts gets them (``energy.baseline=none``: the earlier
flat bench has no value baseline); an older tree with flat field names gets the same settings under
its names (its ``cep`` is reported as ``qgpo``, ``critic_softmax`` as ``critic_insupport``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# runs inside each tree's interpreter, with its own bench and its own config names; one JSON line per reply
WORKER = r"""
import json, sys, time
import torch
from aepo_lite import bench
spec = json.loads(sys.argv[1])
if "behaviour" in bench.BenchConfig.__dataclass_fields__:
    from aepo_lite.config import apply_overrides
    cfg = apply_overrides(bench.BenchConfig(), spec["nested"])
    device = bench.resolve_device(cfg.device)
    plan = [(t.name, t.unit, t.batch, t.build, t.trains) for t in bench.RLStages(cfg, device).plan()]
else:
    cfg = bench.BenchConfig(**spec["flat"])
    device = bench.resolve_device(cfg.device)
    st = bench.Stages(cfg, device)
    plan = [("behaviour", "steps/s", cfg.behaviour_batch, st.behaviour_step, None),
            ("critic_iql", "steps/s", cfg.batch, st.critic_iql_step, None),
            ("critic_softmax", "steps/s", cfg.batch, st.critic_softmax_step, None)]
    plan += [(f"energy_{m}", "steps/s", cfg.batch, lambda m=m: st.energy_step(m), None) for m in cfg.methods]
    plan.append(("support_sampling", "samples/s", cfg.batch * cfg.support_k, lambda: st.support_sampler()[0], None))
    plan += [(f"guided_b{b}", "samples/s", b, lambda b=b: st.guided_sampler(b)[0], None) for b in cfg.sample_batches]
torch.set_num_threads(spec["threads"])
sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
# a stage trains its network, which the bench then freezes: every block runs with the flags of its first run
params = [p for *_, trains in plan if trains is not None for p in trains.parameters()]
fns, info, flags = {}, {}, {}
for name, unit, batch, build, trains in plan:
    flags[name] = [p.requires_grad for p in params]
    fn = build()
    for _ in range(spec["warmup"]):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    if trains is not None:
        trains.requires_grad_(False).eval()
    fns[name] = fn
    info[name] = {"unit": unit, "batch": batch, "calls": max(1, int(spec["min_time"] / max(one, 1e-9)))}
print(json.dumps(info), flush=True)
for line in sys.stdin:
    name = line.strip()
    fn, n = fns[name], info[name]["calls"]
    for p, flag in zip(params, flags[name]):
        p.requires_grad_(flag)
    per = info[name]["batch"] if info[name]["unit"] == "samples/s" else 1
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall": per * n / wall, "cpu": per * n / max(cpu, 1e-9)}), flush=True)
"""
RENAMED = {"energy_cep": "energy_qgpo", "critic_softmax": "critic_insupport"}


def spec(args) -> dict:
    """The same settings in both APIs: the full preset's sizes, 15 dpm2 steps, AEPO tweedie + sampled."""
    common = dict(device=args.device, sample_batches=list(args.sample_batches), guidance_scale=3.0)
    nested = dict(common, methods=["aepo", "mse", "qgpo"], energy=dict(baseline="none"))
    flat = dict(common, methods=("aepo", "mse", "cep"), solver="dpm2", n_steps=15, covariance="tweedie",
                expansion="sampled", sample_batches=tuple(args.sample_batches))
    return {"nested": nested, "flat": flat, "threads": args.threads, "warmup": args.warmup, "min_time": args.min_time}


class Worker:
    """One tree's bench stages in a child process, timed one block per request."""

    def __init__(self, tree: Path, settings: dict, python: str):
        self.proc = subprocess.Popen([python, "-c", WORKER, json.dumps(settings)], cwd=tree, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(tree)), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        info = self._reply(tree)
        self.names = {RENAMED.get(k, k): k for k in info}  # reported name -> the tree's own
        self.info = {RENAMED.get(k, k): v for k, v in info.items()}
        self.tree = tree

    def _reply(self, tree):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{tree}: the bench worker stopped (its error is above)")
        return json.loads(line)

    def rate(self, name: str) -> dict:
        """{"wall": rate by the wall clock, "cpu": rate by this process's CPU time}."""
        self.proc.stdin.write(self.names[name] + "\n")
        self.proc.stdin.flush()
        return self._reply(self.tree)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(args) -> dict:
    settings = spec(args)
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    workers = {side: Worker(tree, settings, args.python) for side, tree in trees.items()}
    try:
        stages = [k for k in workers["new"].info if k in workers["old"].info]
        rates = {k: {"old": [], "new": []} for k in stages}
        loads = []
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            loads.append(round(os.getloadavg()[0], 2))
            for k in stages:
                for side in order:
                    rates[k][side].append(workers[side].rate(k))
            print(f"round {r + 1}/{args.rounds} ({' first, '.join(order)} second; load {loads[-1]}), new / old by "
                  "CPU time: " + ", ".join(f"{k} {rates[k]['new'][-1]['cpu'] / rates[k]['old'][-1]['cpu']:.2f}"
                                           for k in stages), flush=True)
    finally:
        for w in workers.values():
            w.close()
    table = {}
    for k, v in rates.items():
        row = {"unit": workers["new"].info[k]["unit"], "batch": workers["new"].info[k]["batch"]}
        for clock in ("wall", "cpu"):
            ratios = [n[clock] / o[clock] for n, o in zip(v["new"], v["old"])]
            row[clock] = {"old": statistics.median(o[clock] for o in v["old"]),
                          "new": statistics.median(n[clock] for n in v["new"]),
                          "ratio": statistics.median(ratios), "ratios": ratios}
        table[k] = row
    return {"trees": {k: str(v) for k, v in trees.items()}, "settings": settings, "load_average_1min": loads,
            "rates": rates, "stages": table}


def to_markdown(res: dict) -> str:
    """Rates and ratios by CPU time (what load on a shared machine moves least) and by the wall clock."""
    lines = ["| stage | batch | old (CPU time) | new (CPU time) | new / old, CPU time | new / old, wall clock | "
             "per round (CPU time) |", "|---|---:|---:|---:|---:|---:|---|"]
    for k, s in res["stages"].items():
        c, w = s["cpu"], s["wall"]
        lines.append(f"| {k} | {s['batch']} | {c['old']:.2f} {s['unit']} | {c['new']:.2f} {s['unit']} | "
                     f"{c['ratio']:.3f} | {w['ratio']:.3f} | {', '.join(f'{x:.2f}' for x in c['ratios'])} |")
    loads = res["load_average_1min"]
    lines += ["", f"{len(loads)} interleaved rounds, {res['settings']['threads']} torch thread(s) per side; ratios are "
                  f"medians over rounds; 1-minute load average at the rounds' starts: {min(loads)} to {max(loads)} "
                  f"(median {statistics.median(loads)})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="source tree of the reference (a worktree of an older commit)")
    ap.add_argument("--new", default=".", help="source tree to compare (default: this one)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both sides)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per stage before sizing its block")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds one timed block should last")
    ap.add_argument("--sample-batches", type=int, nargs="+", default=[1, 10, 256], help="guided-sampling batches")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both sides")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    for name in ("rounds", "threads", "warmup"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    res = compare(args)
    md = to_markdown(res)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
