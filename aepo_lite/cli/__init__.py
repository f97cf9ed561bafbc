"""The ``aepo-lite`` command. Each subcommand lives in ``aepo_lite/cli/<name>.py`` and exposes
``register(subparsers)``; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``aepo-lite --help`` lists them. A module that is not there
# yet (a later part of the course) is skipped; one that fails to import is an error.
COMMAND_MODULES = ("demo", "toy", "rl", "bench", "figures", "lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aepo-lite", description="AEPO / QGPO energy-guided diffusion policies: "
                                     "closed-form checks, toy 2D tasks, offline RL on Minari datasets.")
    parser.add_argument("--version", action="version", version=f"aepo-lite {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"aepo_lite.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"aepo_lite.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def _version() -> str:
    from aepo_lite import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"aepo-lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
