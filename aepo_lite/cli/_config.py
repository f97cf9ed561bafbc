"""Commands whose options are a config: the command line is generated from the dataclasses (tyro).

Every field of the config is a flag (``--energy.beta 3``), ``--help`` shows each field's comment,
``--preset NAME`` starts from a named preset, ``--config FILE`` from a saved config (a run's
``config.json``, or YAML), and ``--save-config FILE`` writes the resolved config and exits.
Precedence: the preset's values, then the config file, then the flags. A YAML file holds overrides (the fields it
names replace the preset's, as a sweep's ``--overrides`` file); a JSON file is a saved config (a run's
config.json: every field, the preset's included).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

from aepo_lite._io import atomic_write_json
from aepo_lite.config import PRESETS, ToyConfig, apply_overrides, preset_config, to_dict

__all__ = ["ConfigCommand", "parse_command", "print_config", "tyro_cli", "PRESET_NOTES"]

PRESET_NOTES = {
    "rl": {"smoke": "seconds on a CPU: a check that everything runs, not a result",
           "bench": "about an hour per method on a 2-core CPU (our CPU benchmark)",
           "full": "QGPO's published settings: hours on one GPU, days on a CPU"},
    "toy": {"smoke": "a minute on a CPU", "full": "the committed toy grid's sizes"},
}


def _arg(name: str, help: str):
    import tyro
    return tyro.conf.arg(name=name, help=help)


def _flag():
    """A boolean option as a plain flag (``--quiet``), without the ``--no-quiet`` twin."""
    import tyro
    return tyro.conf.FlagCreatePairsOff


@dataclass
class ConfigCommand:
    """Options every config-driven command has; a command adds ``config_values`` (its config) and its own."""

    config_file: Annotated[Optional[str], _arg("config", "start from a saved config (a run's config.json) or a YAML "
                                                         "of overrides over the preset; flags last")] = None
    save_config: Annotated[Optional[str], _arg("save-config", "write the resolved config to this file and exit")] = None


def tyro_cli(cls, argv: list[str], *, prog: str, **kw):
    """``tyro.cli(cls, args=argv, prog=prog, **kw)`` whose usage errors are one line: a ``ValueError`` (the
    error boundary prints it as ``PROG: error: ...``, status 2) with the words of tyro's box, without the box,
    the flag's help text or the hint, plus the flags tyro suggests. ``--help`` and warnings pass through."""
    import contextlib
    import io

    import tyro
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cmd = tyro.cli(cls, args=argv, prog=prog, **kw)
    except SystemExit as e:
        if e.code:
            raise ValueError(f"{_box_text(err.getvalue())} (see {prog} --help)") from None
        sys.stderr.write(err.getvalue())
        raise
    sys.stderr.write(err.getvalue())
    return cmd


def _box_text(text: str) -> str:
    """The message of tyro's error in one line: its first section after the title, and the flags it suggests.
    tyro draws a box (``╭─ Title ─╮``, ``│ ... │`` rows, ``─`` rules) on a terminal, or the title and rules
    without the box elsewhere; both read the same here."""
    title, sections = None, [[]]
    for line in text.splitlines():
        row = line.strip().strip("│|").strip()
        if row[:1] in ("╭", "╰"):
            title = title or row.strip("╭╮╰╯─ ")
        elif len(row) >= 3 and set(row) <= set("─-"):
            sections.append([])
        elif row:
            sections[-1].append(row)
    sections = [sec for sec in sections if sec]
    if title is None and len(sections) > 1 and len(sections[0]) == 1:
        title = sections.pop(0)[0]  # no box: the title is a line of its own, then a rule
    words = " ".join(sections[0]) if sections else (title or "")
    meant = next((sec for sec in sections[1:] if sec[0].startswith("Perhaps you meant")), [])
    flags = [row.split()[0] for row in meant[1:] if row.startswith("-")]
    return (words or "invalid command line") + (f"; perhaps you meant {', '.join(flags)}" if flags else "")


def _pre_parse(argv: list[str], prog: str):
    from aepo_lite.cli.errors import OneLineParser
    p = OneLineParser(add_help=False, prog=prog)
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--save-config")
    p.add_argument("--dataset")
    p.add_argument("--method")
    known, _ = p.parse_known_args(argv)
    return known


def parse_command(command_cls, config_cls, argv: list[str], *, prog: str, description: str,
                  default_preset: str | None = None, domain: Callable | None = None):
    """Parse ``argv`` into ``command_cls`` (a dataclass with a ``config_values: Annotated[config_cls, arg(name="")]``
    field plus the command's own options). Returns the parsed command, or None after ``--save-config``.

    ``default_preset``: the preset when neither ``--preset`` nor ``--config`` is given; None makes the
    choice explicit (an error listing the presets and what each costs). ``domain(cfg) -> cfg``: settings
    that follow from the dataset (e.g. AntMaze's), applied after the preset and before the flags.
    """
    kind = "toy" if config_cls is ToyConfig else "rl"
    pre = _pre_parse(argv, prog)
    wants_help = any(a in ("-h", "--help") for a in argv)
    saved, partial = {}, {}
    if pre.config:
        from aepo_lite.config import load_config_file, read_config_file
        if Path(pre.config).suffix in (".yaml", ".yml"):  # overrides over the preset: the fields it names only
            partial = read_config_file(pre.config)
        else:  # a saved config (a run's config.json): every field, as the run resolved it
            saved = to_dict(load_config_file(pre.config, config_cls))
    preset = pre.preset or saved.get("preset") or partial.get("preset") or default_preset
    if preset is None and not wants_help:
        notes = "; ".join(f"{k}: {v}" for k, v in PRESET_NOTES[kind].items())
        raise ValueError(f"preset: choose one with --preset ({notes}), or start from a saved config with --config")
    base = preset_config(config_cls, preset or next(iter(PRESETS[kind])))
    if saved:
        base = apply_overrides(base, dict(saved, preset=preset))
    top = {k: v for k, v in (("dataset", partial.get("dataset")), ("method", partial.get("method")),
                             ("dataset", pre.dataset), ("method", pre.method)) if v is not None and hasattr(base, k)}
    base = apply_overrides(base, top)
    if domain is not None and not saved:
        base = domain(base)  # as a sweep builds a run's config: the preset, the domain, then the overrides file
    if partial:
        base = apply_overrides(base, {k: v for k, v in partial.items() if k not in ("preset", *top)})
    default = command_cls(config_values=base)
    cmd = tyro_cli(command_cls, argv, prog=prog, default=default, description=description)
    cfg = cmd.config_values
    if pre.save_config:
        atomic_write_json(Path(pre.save_config), to_dict(cfg))
        print(f"wrote the resolved config to {pre.save_config}")
        return None
    return cmd


def print_config(cfg, what: str = "config") -> None:
    """Print the preset and the resolved config at the start of a run."""
    kind = "toy" if isinstance(cfg, ToyConfig) else "rl"
    note = PRESET_NOTES[kind].get(cfg.preset, "")
    print(f"preset: {cfg.preset} ({note})")
    print(f"{what}: {json.dumps(to_dict(cfg), sort_keys=True)}", file=sys.stdout)

