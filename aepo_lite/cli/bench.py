"""``aepo-lite bench``: time each pipeline stage here and extrapolate the ``full`` preset."""
from __future__ import annotations

import argparse

from aepo_lite.device import DEVICE_CHOICES


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time each pipeline stage; extrapolate the full preset",
                              description="Time behaviour, critic and energy training steps, support-action and "
                              "guided sampling on random data of D4RL-locomotion shape; print steps/s or samples/s, "
                              "the full preset's time at those rates, the device and library versions.")
    p.add_argument("--device", default="auto", help=f"one of {DEVICE_CHOICES} or cuda:N (default auto)")
    p.add_argument("--quick", action="store_true", help="one short repeat per stage (same batch sizes)")
    p.add_argument("--out", default=None, help="write the result as JSON here (and a .md table next to it)")
    p.add_argument("--state-dim", type=int, default=11, help="state size (default 11, Hopper)")
    p.add_argument("--action-dim", type=int, default=3, help="action size (default 3, Hopper)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per stage (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every network the stages run (CUDA: mode reduce-overhead, CUDA graphs; CPU: "
                        "inductor's default). Compiles in each stage's warm-up (on a 2-core CPU ~100 s with an empty "
                        "inductor cache); on the CPU only guided sampling at small batches got faster")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aepo_lite import bench
    from aepo_lite._io import atomic_write_json, atomic_write_text

    kw = dict(device=args.device, state_dim=args.state_dim, action_dim=args.action_dim, compile=args.compile,
              tf32=args.tf32)
    if args.threads is not None:
        kw["threads"] = args.threads
    if args.repeats is not None:
        kw["repeats"] = args.repeats
    cfg = bench.quick_config(**kw) if args.quick else bench.BenchConfig(**kw)
    print(f"aepo-lite bench: {'quick, ' if args.quick else ''}state {cfg.state_dim}, action {cfg.action_dim}")
    result = bench.run_bench(cfg, log=print)
    print()
    print(bench.to_markdown(result))
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), bench.to_markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
