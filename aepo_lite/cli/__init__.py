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
    """Parse ``argv`` and run the command inside the error boundary (``aepo_lite.cli.errors``): a failure
    is one line ``aepo-lite CMD: error: ...`` and an exit status; ``--debug`` or ``AEPO_DEBUG=1`` adds the traceback."""
    from aepo_lite.cli.errors import debug_requested, run_command
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = None

    def build() -> int:
        nonlocal parser
        parser = build_parser()
        parser.add_argument("--debug", action="store_true",
                            help="print the full traceback of an error (also: environment variable AEPO_DEBUG=1)")
        return 0

    early_debug = debug_requested("--debug" in argv[:1])
    rc = run_command("", build, early_debug)  # a command module that fails to import is one line too
    if rc:
        return rc
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.command, lambda: args.func(args), args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
