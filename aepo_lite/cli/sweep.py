"""``aepo-lite suite list|show`` and ``aepo-lite sweep`` (options generated from SweepConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Optional

from aepo_lite.cli._config import _arg, tyro_cli
from aepo_lite.rl.sweep import SweepConfig


def register(sub) -> None:
    p = sub.add_parser("suite", help="the reproduction suites: `suite list`, `suite show NAME`")
    p.add_argument("action", choices=("list", "show"))
    p.add_argument("name", nargs="?", help="the suite to show")
    p.set_defaults(func=_suite)


def _suite(args) -> int:
    from aepo_lite.rl.suites import SUITES, get_suite
    if args.action == "list":
        for s in SUITES.values():
            print(f"{s.name:8s} {len(s.datasets):2d} datasets  {s.note}")
        return 0
    if not args.name:
        raise ValueError("name: `suite show` needs a suite name (see `aepo-lite suite list`)")
    s = get_suite(args.name)
    print(f"{s.name}: {s.note}\nsettings ({s.source}): {s.overrides}")
    for ds in s.datasets:
        print(f"  {ds}")
    return 0


@dataclass
class SweepCommand:
    """Train and evaluate datasets (or a suite) x methods x seeds as ordinary run directories."""

    config_values: Annotated[SweepConfig, _arg("", "")] = field(default_factory=SweepConfig)
    results_csv: Optional[str] = None  # merge the runs' results into this CSV (and its table and figure)


def _sweep(argv: list[str]) -> int:
    from aepo_lite.rl.sweep import run_sweep
    cmd = tyro_cli(SweepCommand, argv, prog="aepo-lite sweep",
                   description="Train and evaluate datasets (or a suite) x methods x seeds as ordinary run "
                               "directories; finished runs are skipped (those finished on another copy of their dataset "
                               "are refused), failed ones listed with their logs.")
    res = run_sweep(cmd.config_values, results_csv=cmd.results_csv)
    print(f"sweep: {len(res['done'])} done, {len(res['skipped'])} skipped (finished), {len(res['failed'])} failed, "
          f"{len(res['unavailable'])} datasets unavailable")
    return 1 if res["failed"] else 0


CONFIG_COMMANDS = {"sweep": ("datasets (or a suite) x methods x seeds, resumable, on a process pool or Ray", _sweep)}
