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
    from aepo_lite.cli.errors import OneLineParser
    parser = OneLineParser(prog="aepo-lite", description="AEPO / QGPO energy-guided diffusion policies: "
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
    """Parse ``argv`` and run the command inside the error boundary (``aepo_lite.cli.errors``): a failure
    is one line ``aepo-lite CMD: error: ...`` and an exit status; ``aepo-lite --debug CMD ...`` or
    ``AEPO_DEBUG=1`` adds the traceback. Commands whose options are a config are parsed by tyro."""
    from aepo_lite.cli.errors import debug_requested, run_command
    argv = sys.argv[1:] if argv is None else list(argv)
    early_debug = debug_requested("--debug" in argv[:1])
    raw: dict = {}
    rc = run_command("", lambda: raw.update(config_commands()) or 0, early_debug)
    if rc:
        return rc
    rest = argv[1:] if argv[:1] == ["--debug"] else argv
    if rest and rest[0] in raw:
        def run_config_command() -> int:
            try:
                return int(raw[rest[0]][1](rest[1:]) or 0)
            except SystemExit as e:  # tyro's own usage errors (already printed) and --help
                return int(e.code or 0)
        return run_command(rest[0], run_config_command, early_debug)
    parser = None

    def build() -> int:
        nonlocal parser
        parser = build_parser()
        parser.add_argument("--debug", action="store_true",
                            help="print the full traceback of an error (also: environment variable AEPO_DEBUG=1)")
        return 0

    rc = run_command("", build, early_debug)  # a command module that fails to import is one line too
    if rc:
        return rc
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, in one line like every other usage error
        prog = f"aepo-lite {args.command}" if getattr(args, "command", None) else "aepo-lite"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)\n")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.command, lambda: args.func(args), args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
