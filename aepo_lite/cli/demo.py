"""``aepo-lite demo``: the closed-form guidance checks and figure (docs/derivation.md sections 3-4), no data needed."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="closed-form guidance checks (PASS/FAIL) and figures/closed_form_guidance.png",
        description="Check the Gaussian closed forms of the intermediate energy E_t (two routes, Monte Carlo, "
                    "AEPO's first-order target, exact guided sampling) and draw guided samples for a few "
                    "guidance scales. Writes closed_form_guidance.png and closed_form_checks.json.")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--scale", choices=("smoke", "full"), default="full", help="sample counts (default: full)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from aepo_lite.course.demo import run_demo

    try:
        run_demo(out_dir=args.out, scale=args.scale, seed=args.seed)
    except RuntimeError as e:
        print(f"aepo-lite demo: {e}")
        return 1
    return 0
