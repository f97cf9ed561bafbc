"""The ``aepo-lite`` command. Each subcommand lives in ``aepo_lite/cli/<name>.py`` and exposes
``register(subparsers)``; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``aepo-lite --help`` lists them. A module that is not there
# yet (a later part of the course) is skipped; one that fails to import is an error.
COMMAND_MODULES = ("demo", "toy", "rl", "sweep", "bench", "figures", "lab")


def _modules():
    for name in COMMAND_MODULES:
        try:
            yield importlib.import_module(f"aepo_lite.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"aepo_lite.cli.{name}":
                raise


def config_commands() -> dict:
    """Commands whose options are generated from a config (``CONFIG_COMMANDS`` of each module): name -> (help, fn(argv))."""
    out = {}
    for mod in _modules():
        out.update(getattr(mod, "CONFIG_COMMANDS", {}))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aepo-lite", description="AEPO / QGPO energy-guided diffusion policies: "
                                     "closed-form checks, toy 2D tasks, offline RL on Minari datasets.")
    parser.add_argument("--version", action="version", version=f"aepo-lite {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _modules():
        mod.register(sub)
        for name, (help_text, _) in getattr(mod, "CONFIG_COMMANDS", {}).items():
            sub.add_parser(name, help=help_text, add_help=False)  # listed here; parsed from its config
    return parser


def _version() -> str:
    from aepo_lite import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    raw = config_commands()
    if argv and argv[0] in raw:
        try:
            return int(raw[argv[0]][1](argv[1:]) or 0)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"aepo-lite {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        except SystemExit as e:  # tyro's own usage errors and --help
            return int(e.code or 0)
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
