"""``aepo-lite demo``: the closed-form guidance checks and figure (docs/derivation.md sections 3-4), no data needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DemoCommand:
    """Check the Gaussian closed forms of the intermediate energy E_t (two routes, Monte Carlo, AEPO's first-order
    target, exact guided sampling) and draw guided samples for a few guidance scales. Writes
    closed_form_guidance.png and closed_form_checks.json."""

    out: str = "figures"  # output folder
    scale: Literal["smoke", "full"] = "full"  # sample counts; full (the default, a few seconds) reproduces the committed figures/closed_form_checks.json, smoke draws fewer; AEPO_SCALE does not apply
    seed: int = 0  # random seed


def _run(argv: list[str]) -> int:
    from aepo_lite._checks import check_seed
    from aepo_lite.cli._config import tyro_cli
    from aepo_lite.course.demo import run_demo
    cmd = tyro_cli(DemoCommand, argv, prog="aepo-lite demo")
    check_seed("seed", cmd.seed)
    try:
        run_demo(out_dir=cmd.out, scale=cmd.scale, seed=cmd.seed)
    except RuntimeError as e:
        print(f"aepo-lite demo: {e}")
        return 1
    return 0


def register(subparsers) -> None:
    """Nothing to add: ``demo`` is listed through CONFIG_COMMANDS."""


CONFIG_COMMANDS = {"demo": ("closed-form guidance checks (PASS/FAIL) and figures/closed_form_guidance.png", _run)}
