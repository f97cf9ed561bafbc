"""Commands whose options are a config: the command line is generated from the dataclasses (tyro).

Every field of the config is a flag (``--energy.beta 3``), ``--help`` shows each field's comment,
``--preset NAME`` starts from a named preset, ``--config FILE`` from a saved config (a run's
``config.json``, or YAML), and ``--save-config FILE`` writes the resolved config and exits.
Precedence: the preset's values, then the config file, then the flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

from aepo_lite._io import atomic_write_json
from aepo_lite.config import PRESETS, ToyConfig, apply_overrides, preset_config, to_dict

__all__ = ["ConfigCommand", "parse_command", "print_config", "PRESET_NOTES"]

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

    config_file: Annotated[Optional[str], _arg("config", "start from a saved config (a run's config.json, or "
                                                         "YAML); the preset's values come first, flags last")] = None
    save_config: Annotated[Optional[str], _arg("save-config", "write the resolved config to this file and exit")] = None


def _pre_parse(argv: list[str]):
    p = argparse.ArgumentParser(add_help=False)
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
    import tyro
    kind = "toy" if config_cls is ToyConfig else "rl"
    pre = _pre_parse(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    saved = {}
    if pre.config:
        from aepo_lite.config import load_config_file
        saved = to_dict(load_config_file(pre.config, config_cls))
    preset = pre.preset or saved.get("preset") or default_preset
    if preset is None and not wants_help:
        notes = "; ".join(f"{k}: {v}" for k, v in PRESET_NOTES[kind].items())
        raise ValueError(f"preset: choose one with --preset ({notes}), or start from a saved config with --config")
    base = preset_config(config_cls, preset or next(iter(PRESETS[kind])))
    if saved:
        base = apply_overrides(base, dict(saved, preset=preset))
    top = {k: v for k, v in (("dataset", pre.dataset), ("method", pre.method)) if v is not None and hasattr(base, k)}
    base = apply_overrides(base, top)
    if domain is not None and not saved:
        base = domain(base)
    default = command_cls(config_values=base)
    cmd = tyro.cli(command_cls, default=default, args=argv, prog=prog, description=description)
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

