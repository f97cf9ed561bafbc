"""Offline RL subcommands: ``make-dataset``, ``train``, ``eval``, ``rl-results`` (many runs: ``aepo-lite sweep``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from aepo_lite.cli._config import ConfigCommand, _arg, _flag, parse_command, print_config, tyro_cli
from aepo_lite.config import EvalConfig, SamplingConfig, TrainConfig


def register(sub) -> None:
    from aepo_lite.rl.datasets import QUALITIES

    p = sub.add_parser("make-dataset", help="make a D4RL-style Minari dataset locally (random actions or TD3 policies)")
    p.add_argument("--env", required=True, help="Gymnasium environment id, e.g. Hopper-v5")
    p.add_argument("--quality", required=True, choices=QUALITIES)
    p.add_argument("--steps", type=int, required=True, help="transitions in the dataset")
    p.add_argument("--name", required=True, help="dataset id NAMESPACE/ENV/QUALITY-v0, e.g. local/hopper/medium-v0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=60_000, help="TD3 budget (env steps) of the policy ladder")
    p.add_argument("--eval-every", type=int, default=5_000, help="ladder snapshot period (env steps)")
    p.add_argument("--learning-starts", type=int, default=5_000, help="random steps before TD3 learns")
    p.add_argument("--ref-episodes", type=int, default=100, help="episodes for ref_min_score / ref_max_score")
    p.add_argument("--medium-fraction", type=float, default=1.0 / 3.0,
                   help="medium = the first ladder snapshot reaching this fraction of the way from random to expert "
                        "(D4RL: about 1/3; lower it where the ladder jumps, e.g. InvertedDoublePendulum)")
    p.add_argument("--collect-noise", type=float, default=0.1,
                   help="std of the Gaussian action noise on the policies' actions while collecting (D4RL-like: 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("rl-results", help="collect saved runs into figures/rl_results.csv (+ table, figure, README)")
    p.add_argument("--runs", nargs="+", default=["runs"], help="run directories or folders holding them")
    p.add_argument("--csv", default="figures/rl_results.csv")
    p.add_argument("--figures", default="figures")
    p.add_argument("--speed-csv", default=None, help="the stage speeds (default: rl_speed.csv beside --csv)")
    p.add_argument("--readme", default=None, help="a Markdown file to update between <!-- rl:start --> and "
                   "<!-- rl:end --> (the project's: docs/results.md)")
    p.add_argument("--force", action="store_true", help="replace saved rows that the runs found would drop")
    p.add_argument("--merge", action="store_true", help="keep the saved rows the runs do not give (more seeds or "
                   "scales for runs whose folders are gone); a saved row the runs give with another value is an error")
    p.set_defaults(func=_results)


def dataset_recipe(args):
    """The :class:`aepo_lite.rl.datasets.DatasetRecipe` of parsed ``make-dataset`` arguments."""
    from aepo_lite.rl.datasets import DatasetRecipe
    return DatasetRecipe(env_id=args.env, quality=args.quality, steps=args.steps, name=args.name, seed=args.seed,
                         train_steps=args.train_steps, eval_every=args.eval_every, learning_starts=args.learning_starts,
                         ref_episodes=args.ref_episodes, medium_fraction=args.medium_fraction,
                         collect_noise=args.collect_noise)


def _make_dataset(args) -> int:
    from aepo_lite.rl.datasets import dataset_reference_differences, make_dataset
    from aepo_lite.rl.data import description_info
    ds = make_dataset(dataset_recipe(args), overwrite=args.overwrite)
    meta = ds.storage.metadata
    info = description_info(meta)
    print(f"{args.name}: {ds.total_episodes} episodes, {ds.total_steps} transitions, "
          f"mean episode return {info.get('dataset_mean_episode_return', float('nan')):.1f}, "
          f"ref_min_score {meta.get('ref_min_score'):.1f}, ref_max_score {meta.get('ref_max_score'):.1f}")
    snaps = {s["step"]: s["eval_return"] for s in info.get("ladder", [])}
    if "medium_snapshot_step" in info:
        print(f"  ladder: medium snapshot at step {info['medium_snapshot_step']} (eval return "
              f"{snaps.get(info['medium_snapshot_step'], float('nan')):.1f}), expert at step "
              f"{info['expert_snapshot_step']} ({snaps.get(info['expert_snapshot_step'], float('nan')):.1f})")
    for what, key in (("policy ladder", "ladder_made_with"), ("data", "made_with")):
        made = info.get(key)  # a remade dataset that differs: compare these (TD3 training is chaotic in floating point)
        if made:
            n = made.get("torch_threads")  # None: made before the count was recorded
            print(f"  {what} made with " + ", ".join(f"{k} {v}" for k, v in sorted(made["versions"].items()) if v)
                  + f" on {made['cpu']}" + ("" if n is None else f", {n} torch thread" + "s" * (n != 1)))
    diff = dataset_reference_differences(args.name)
    if diff == []:
        print("  the same as the dataset docs/results.md's tables were measured on")
    elif diff:
        print("  NOT the dataset docs/results.md's tables were measured on, though made by the same recipe: "
              + "; ".join(diff) + ". Its ladder trained differently (TD3 follows every floating-point difference: "
              "CPU, thread count, library versions; docs/results.md, 'Remaking a dataset'), so scores on it are not "
              "comparable with those tables.", file=sys.stderr)
    return 0


def _default_out(dataset: str, method: str, preset: str, seed: int, root="runs") -> Path:
    return Path(root) / dataset.replace("/", "_") / f"{method}-{preset}-s{seed}"


@dataclass
class TrainCommand(ConfigCommand):
    """Train an agent on a Minari dataset (staged, resumable), then evaluate it at each guidance scale."""

    config_values: Annotated[TrainConfig, _arg("", "")] = field(default_factory=TrainConfig)
    out: Optional[str] = None  # run directory (default: runs/<dataset>/<method>-<preset>-s<seed>; with --seeds, a folder of runs)
    seeds: Optional[tuple[int, ...]] = None  # several seeds in one process (replaces --seed): behaviour, support, critic and energy stages trained together, stacked
    init_behaviour: Optional[str] = None  # copy finished stages (behaviour; support, critic if they match) from this run
    stage_cache: Optional[str] = None  # train shared stages (behaviour, support, critic) once in this folder, reused by runs
    no_eval: Annotated[bool, _flag()] = False  # train only; evaluate later with `aepo-lite eval --run DIR`
    quiet: Annotated[bool, _flag()] = False  # no progress bars


def _train(argv: list[str]) -> int:
    from aepo_lite.rl.agent import check_config, domain_settings, evaluate_run, train
    cmd = parse_command(TrainCommand, TrainConfig, argv, prog="aepo-lite train", domain=domain_settings,
                        description="Train an agent on a Minari dataset (staged, resumable; every config field is a "
                                    "flag), then evaluate it. Choose a scale with --preset.")
    if cmd is None:
        return 0
    cfg = check_config(cmd.config_values)
    if not cfg.dataset:
        raise ValueError("dataset: give a Minari dataset id with --dataset (e.g. a local one made by make-dataset)")
    if cmd.seeds:
        return _train_seeds(cmd, cfg)
    out = Path(cmd.out) if cmd.out else _default_out(cfg.dataset, cfg.method, cfg.preset, cfg.seed)
    print_config(cfg)
    train(cfg, out, progress=not cmd.quiet, init_behaviour=cmd.init_behaviour, stage_cache=cmd.stage_cache)
    print(f"trained {cfg.method} on {cfg.dataset} -> {out} (config: {out / 'config.json'})")
    if not cmd.no_eval:
        _print_results(evaluate_run(out, progress=not cmd.quiet))
    return 0


def _train_seeds(cmd: TrainCommand, cfg) -> int:
    """``train --seeds 0 1 2``: one run per seed (OUT/<method>-<preset>-s<seed>), their behaviour, support, critic and
    energy stages trained together as stacked models (shared stages in the stage cache, default OUT/stage_cache)."""
    from dataclasses import replace
    from aepo_lite.rl.agent import evaluate_run, train_seeds
    seeds = list(cmd.seeds)
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds: expected distinct non-negative seeds, got {seeds}")
    if cmd.init_behaviour:
        raise ValueError("init_behaviour: copies one run's stages; with --seeds each seed trains its own (drop one)")
    root = Path(cmd.out) if cmd.out else Path("runs") / cfg.dataset.replace("/", "_")
    cfgs = [replace(cfg, seed=s) for s in seeds]
    dirs = [root / f"{cfg.method}-{cfg.preset}-s{s}" for s in seeds]
    cache = Path(cmd.stage_cache) if cmd.stage_cache else root / "stage_cache"
    print_config(cfgs[0])
    print(f"seeds {seeds}: behaviour, critic and energy stages trained together (stacked); shared stages in {cache}")
    train_seeds(cfgs, dirs, stage_cache=cache, progress=not cmd.quiet)
    for s, d in zip(seeds, dirs):
        print(f"trained {cfg.method} on {cfg.dataset}, seed {s} -> {d}")
        if not cmd.no_eval:
            _print_results(evaluate_run(d, progress=not cmd.quiet))
    return 0


def _print_results(res: dict) -> None:
    for row in res["rows"]:
        ns = row["normalized_score_mean"]
        ns = "n/a" if ns is None else f"{ns:.1f} +- {row['normalized_score_std']:.1f}"
        w = f"{row['guidance_scale']:g}"
        print(f"  w={w:>5}  return {row['return_mean']:9.1f} +- {row['return_std']:7.1f}  normalised {ns}  "
              f"({row['episodes']} episodes, {row['actions_per_s']:.0f} actions/s)")


@dataclass
class EvalCommand:
    """Evaluate a trained run at each guidance scale; rows with other settings are added beside the saved ones."""

    run: str = ""  # run directory made by `aepo-lite train` (its config gives every default below)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: Optional[str] = None  # auto | cpu | cuda (default: the run's)
    quiet: Annotated[bool, _flag()] = False  # no progress bars


def _eval(argv: list[str]) -> int:
    from aepo_lite._io import read_json
    from aepo_lite.cli.errors import OneLineParser
    from aepo_lite.config import from_dict, to_dict
    from aepo_lite.rl.agent import evaluate_run
    parser = OneLineParser(add_help=False, prog="aepo-lite eval")
    parser.add_argument("--run")
    pre, _ = parser.parse_known_args(argv)
    default = EvalCommand()
    if pre.run and (Path(pre.run) / "config.json").exists():
        saved = from_dict(TrainConfig, read_json(Path(pre.run) / "config.json"))
        default = EvalCommand(run=pre.run, sampling=saved.sampling, eval=saved.eval)
    cmd = tyro_cli(EvalCommand, argv, prog="aepo-lite eval", default=default)
    if not cmd.run:
        raise ValueError("run: give the run directory with --run (made by `aepo-lite train`)")
    # only what the flags changed: the saved values are the run's own (a bc run's saved scales are not a request)
    over = {part: {k: v for k, v in to_dict(getattr(cmd, part)).items() if v != to_dict(getattr(default, part))[k]}
            for part in ("sampling", "eval")}
    _print_results(evaluate_run(cmd.run, device=cmd.device, overrides=over, progress=not cmd.quiet))
    return 0


def _results(args) -> int:
    from aepo_lite.rl import report as rl_report
    if Path(args.figures).exists() and not Path(args.figures).is_dir():  # checked before the CSV is written
        raise ValueError(f"figures: {args.figures} is a file, not a folder; give the folder for the table and figure")
    if args.readme:
        rl_report.check_readme(args.readme)
    rows = rl_report.collect(args.runs, args.csv, args.speed_csv, force=args.force, merge=args.merge)
    print(f"{len(rows)} rows -> {args.csv}")
    for p in rl_report.render(args.csv, args.figures):
        print(f"wrote {p}")
    if args.readme:
        rl_report.update_readme(args.readme, args.csv)
        print(f"updated {args.readme}")
    return 0


CONFIG_COMMANDS = {"train": ("train an agent on a Minari dataset (staged, resumable; every config field a flag)",
                             _train),
                   "eval": ("evaluate a trained run at one or more guidance scales (sampling and eval fields as flags)",
                            _eval)}
