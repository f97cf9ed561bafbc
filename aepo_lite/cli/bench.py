"""``aepo-lite bench``: the speed bench, its options generated from :class:`aepo_lite.bench.BenchConfig` (tyro).

  aepo-lite bench                                   # every stage at the full preset's sizes, extrapolated
  aepo-lite bench --quick --threads 1 --out figures/bench_cpu.json
  aepo-lite bench --energy.expansion first --methods aepo
  aepo-lite bench --toy 8gaussians                  # the toy learners at the toy preset's sizes

Every field of the config is a flag (``--behaviour.batch 1024``), and ``--help`` shows each field's
comment. ``--quick`` and ``--tiny`` change the defaults the flags then override.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from aepo_lite.bench import BenchConfig
from aepo_lite.cli._config import _arg, _flag, tyro_cli

DESCRIPTION = ("Time the library's training steps (behaviour, critics, energy learners) and samplers on random data "
               "of Hopper's shape, at the full preset's sizes unless flags say otherwise; print steps/s or samples/s, "
               "the full preset's time at those rates, the device and library versions. --toy TASK times a toy "
               "task's learners instead, at the toy preset's sizes.")


@dataclass
class BenchCommand:
    """Time each training stage and sampler; extrapolate the full preset."""

    config_values: Annotated[BenchConfig, _arg("", "")] = field(default_factory=BenchConfig)
    out: Optional[str] = None  # write the result as JSON here (and a Markdown table next to it, .md)
    quick: Annotated[bool, _flag()] = False  # one short timed loop per stage (warmup 1, min_time 0.2, repeats 1)
    tiny: Annotated[bool, _flag()] = False  # tiny networks and batches on the CPU: checks the bench runs, no numbers


def register(subparsers) -> None:
    """Nothing to add: ``bench`` is listed through :data:`CONFIG_COMMANDS`."""


def parse(argv: list[str]) -> BenchCommand:
    """``argv`` -> the command; ``--quick`` / ``--tiny`` set the defaults, every other flag overrides them."""
    from aepo_lite import bench
    from aepo_lite.cli.errors import OneLineParser
    pre = OneLineParser(add_help=False, prog="aepo-lite bench")
    pre.add_argument("--quick", action="store_true")
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args(argv)
    base = bench.tiny_config() if known.tiny else bench.quick_config() if known.quick else BenchConfig()
    return tyro_cli(BenchCommand, argv, prog="aepo-lite bench", default=BenchCommand(config_values=base),
                    description=DESCRIPTION)


def _bench(argv: list[str]) -> int:
    from aepo_lite import bench
    from aepo_lite._io import atomic_write_json, atomic_write_text
    cmd = parse(argv)
    cfg = bench.check_bench_config(cmd.config_values)
    if cmd.out:
        _check_out_file(Path(cmd.out))
    what = f"toy task {cfg.toy}" if cfg.toy else f"state {cfg.state_dim}, action {cfg.action_dim}"
    print(f"aepo-lite bench: {'quick, ' if cmd.quick else ''}{'tiny, ' if cmd.tiny else ''}{what}")
    result = bench.run_bench(cfg, log=print)
    md = bench.to_markdown(result)
    print()
    print(md)
    if cmd.out:
        out = Path(cmd.out)
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), md)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _check_out_file(out: Path) -> None:
    """``--out`` must name a file in a folder that is (or can be) made: checked before the bench runs, which takes
    an hour at the full preset's sizes, not when it writes its result."""
    import errno
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(out))
    first = next((p for p in out.parents if p.exists()), None)
    if first is not None and not first.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(out))


CONFIG_COMMANDS = {"bench": ("time each training stage and sampler; extrapolate the full preset (every field a flag)",
                             _bench)}
