"""``aepo-lite toy`` and ``aepo-lite toy-grid``: the toy 2D tasks of docs/derivation.md section 6.

  aepo-lite toy --preset smoke --task moons --method aepo --energy.beta 10 --sampling.guidance-scales 1 2
  aepo-lite toy-grid --preset full --betas 10 --seeds 0 1 2 --critic reward regression   # or any part of the grid
  aepo-lite toy-convergence --steps 2000 4000 8000 --check 4000   # is the energy budget large enough?

``toy`` is generated from :class:`aepo_lite.config.ToyConfig`: every field is a flag (``--help`` lists
them with their comments). Speeds of the toy stages: ``aepo-lite bench``.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from aepo_lite.cli._config import ConfigCommand, _arg, _flag, parse_command, print_config
from aepo_lite.config import ToyConfig
from aepo_lite.device import DEVICE_CHOICES

GRID_METHODS = ("aepo", "qgpo", "mse", "bc")


@dataclass
class ToyCommand(ConfigCommand):
    """Train (or load from the stage cache) and evaluate one method on a toy 2D task."""

    config_values: Annotated[ToyConfig, _arg("", "")] = field(default_factory=ToyConfig)
    out: Optional[str] = None  # run folder (default: runs/toy/<task>/<method>-b<beta>-<critic>-<preset>-s<seed>)
    cache_dir: Optional[str] = None  # stage checkpoints, one folder per task shared by every run (runs/toy_cache)
    quiet: Annotated[bool, _flag()] = False  # no progress bars


_GRID_CSV = "figures/toy2d_results.csv"  # the project's grid: the default CSV, the one that updates the toy tables
_CONVERGENCE_CSV = "figures/toy2d_convergence.csv"  # the true-reward energy-steps curve
_CONVERGENCE_CRITIC_CSV = "figures/toy2d_convergence_critic.csv"  # the fitted critic's rows beside it
_TOY_TABLES = "docs/results.md"  # where the project's toy tables live (between the toy markers), as `figures` writes them


def _toy(argv: list[str]) -> int:
    from aepo_lite.toy.pipeline import check_config, default_out, estimator_label, run_toy
    cmd = parse_command(ToyCommand, ToyConfig, argv, prog="aepo-lite toy", default_preset="full",
                        description="Train (or load from the stage cache) and evaluate one guidance method on a toy "
                                    "2D task; every config field is a flag. Writes DIR/config.json, "
                                    "DIR/metrics.jsonl, DIR/results.json and DIR/figure.png.")
    if cmd is None:
        return 0
    cfg = check_config(cmd.config_values)  # every field, before any training
    out = Path(cmd.out) if cmd.out else default_out(cfg)
    print_config(cfg)
    res = run_toy(cfg, out, cache_dir=cmd.cache_dir, progress=not cmd.quiet)
    for r in res["results"]:
        print(f"{cfg.task} {estimator_label(cfg)} (Q: {res['critic']}) beta={cfg.energy.beta:g} "
              f"w={r['guidance_scale']:g}: distance {r['distance']:.4f} (mean of {len(r['distances'])} draws; floor "
              f"{r['floor']:.4f}, ratio "
              f"{r['distance'] / r['floor']:.2f}), mean reward {r['mean_reward']:.3f} (exact target "
              f"{res['target_mean_reward']:.3f})")
    print(f"wrote {out / 'results.json'} and {out / 'figure.png'}")
    return 0


CONFIG_COMMANDS = {"toy": ("train and evaluate one guidance method on a toy 2D task (every config field a flag)",
                           _toy)}


def _float(name):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {s!r}") from None
        if math.isnan(v):
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got NaN")
        return v
    return parse


def register(subparsers) -> None:
    from aepo_lite.config import PRESETS
    from aepo_lite.toy.pipeline import CRITIC_KINDS

    g = subparsers.add_parser("toy-grid", help="run the toy grid (or part of it) and regenerate its CSV, tables, README",
                              description="Run tasks x methods x estimators x critics x betas x seeds at a preset "
                              "(rows already in the CSV are skipped unless --force), merge them into the CSV, then "
                              "regenerate figures/toy2d_* and the README block from the CSV alone.")
    g.add_argument("--tasks", nargs="+", default=None, help="default: every registered task")
    g.add_argument("--methods", nargs="+", default=list(GRID_METHODS), help="default: aepo qgpo mse bc")
    g.add_argument("--estimators", nargs="+", default=None,
                   help="AEPO estimators: <covariance>/<expansion> (e.g. gaussian-fit/sampled, the default), "
                        "particles[-K<k>] or mixture[-K<k>][-h<bandwidth>] (K support points; default support.k), "
                        "'all' = every <covariance>/<expansion> the critic allows")
    g.add_argument("--critic", nargs="+", default=["reward"], choices=CRITIC_KINDS,
                   help="Q of the energy targets: reward (the true e(x), default) and/or regression (the fitted "
                        "critic); every method runs with each")
    g.add_argument("--critic-steps", type=int, default=None, help="the fitted critic's training steps (default: the "
                   "preset's; the grids committed before session 67 used 1500)")
    g.add_argument("--betas", type=_float("betas"), nargs="+", default=[3.0, 10.0, 20.0])
    g.add_argument("--guidance-scales", type=_float("guidance-scales"), nargs="+", default=[1.0])
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--preset", default="full", choices=tuple(PRESETS["toy"]))
    g.add_argument("--csv", default=_GRID_CSV)
    g.add_argument("--figures-dir", default=None, help=f"tables and figures (default: figures/ for {_GRID_CSV}, "
                   "else a folder named after the CSV beside it, as `aepo-lite figures` lays out figures/toy2d_long.csv; "
                   "so another grid never rewrites the project's tables)")
    g.add_argument("--budget-csv", default="", help="also write each run's error-budget parts 4-5 here "
                   "(e.g. figures/toy2d_budget_runs.csv; '' = none)")
    g.add_argument("--readme", default=None, help="Markdown file to update between the toy markers (default: "
                   f"docs/results.md, where `aepo-lite figures` keeps the toy tables, when --csv is {_GRID_CSV}, "
                   "else none; '' = none)")
    g.add_argument("--cache-dir", default=None, help="stage checkpoints (default runs/toy_cache)")
    g.add_argument("--runs-dir", default="runs/toy", help="one run folder per row group (config, results, figure)")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    g.add_argument("--force", action="store_true", help="re-evaluate rows already in the CSV")
    g.add_argument("--render-only", action="store_true", help="only regenerate tables, figures and README from the CSV")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=run_grid_command)
    _register_convergence(subparsers, tuple(PRESETS["toy"]), CRITIC_KINDS)


def _estimator_specs(args, critic: str) -> list[str]:
    from aepo_lite.toy.pipeline import ESTIMATORS, estimator_overrides
    specs = args.estimators or ["/".join((ToyConfig().energy.covariance, ToyConfig().energy.expansion))]
    if "all" not in specs:
        return specs
    # 'all': every Gaussian-posterior estimator this critic allows (the true reward has no gradient)
    return [s for s in ESTIMATORS
            if critic == "regression" or estimator_overrides(s)["energy"]["expansion"] == "sampled"]


def _grid_configs(args) -> list:
    from aepo_lite.toy.pipeline import estimator_overrides, make_config
    from aepo_lite.toy.tasks import task_names
    if args.critic_steps is not None and (args.critic_steps < 1 or "regression" not in args.critic):
        raise ValueError(f"--critic-steps {args.critic_steps}: expected a positive step count of the fitted critic "
                         "(with --critic regression)")
    steps = {} if args.critic_steps is None else {"steps": args.critic_steps}
    cfgs = []
    for beta in args.betas:
        for seed in args.seeds:
            for task in args.tasks or task_names():
                for method in args.methods:
                    for critic in (["reward"] if method == "bc" else args.critic):  # bc reads no Q
                        for spec in (_estimator_specs(args, critic) if method == "aepo" else [None]):
                            over = estimator_overrides(spec) if spec else {}
                            cfgs.append(make_config(task, method, args.preset, seed=seed, device=args.device,
                                                    energy=dict(over.get("energy", {}), beta=beta),
                                                    support=over.get("support"),
                                                    critic=dict(kind=critic, **(steps if critic == "regression" else {})),
                                                    sampling={"guidance_scales": tuple(args.guidance_scales)}))
    return cfgs


def _register_convergence(subparsers, presets, critic_kinds) -> None:
    from aepo_lite.toy.convergence import ConvergenceConfig
    d = ConvergenceConfig()
    c = subparsers.add_parser("toy-convergence", help="energy error vs energy steps on the toy tasks (is the budget "
                              "converged?)", description="One run per task, method and energy step count (resumable: "
                              "finished runs are read), each run's row merged into the CSV under a lock (processes running other tasks "
                              "or seeds may share it); then figures/toy2d_convergence.{md,png} (with --critic regression: "
                              "figures/toy2d_convergence_critic.{md,png}, the fitted critic's rows beside the true "
                              "reward's at each task's converged budget). "
                              "--check N fails unless every method's energy error falls by less than --tol past N and past every "
                              "larger step count measured.")
    c.add_argument("--tasks", nargs="+", default=None, help="default: every registered task")
    c.add_argument("--specs", nargs="+", default=list(d.specs), help="qgpo, mse, aepo:<estimator> (default: %(default)s)")
    c.add_argument("--steps", type=int, nargs="+", default=list(d.steps), help="energy step counts (increasing)")
    c.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=list(d.seeds),
                   help="one curve per seed (default: %(default)s)")
    c.add_argument("--beta", type=_float("beta"), default=d.beta)
    c.add_argument("--critic", default=d.critic, choices=critic_kinds, help="Q of every method's target")
    c.add_argument("--critic-steps", type=int, default=None, help="with --critic regression: the fitted critic's "
                   "training steps (default: the preset's; python scripts/toy_critic_steps.py measures what they buy)")
    c.add_argument("--preset", default=d.preset, choices=presets, help="every setting but energy.steps")
    c.add_argument("--draws", type=int, default=None, help="distance draws per run, their mean the distance "
                   "(eval.draws; default: the preset's; a finished run evaluated with other draws is evaluated again "
                   "from its cached stages)")
    c.add_argument("--check", type=int, default=None, metavar="N", help="fail unless the budget N is converged for "
                   "the curve's tasks and specs (read from the CSV; a seed run only at N counts through the seeds "
                   "carried past it; a plateau past N followed by a fall is not converged; a method flat from a "
                   "smaller count is)")
    c.add_argument("--tol", type=_float("tol"), default=0.1, help="relative drop past N that counts as converged")
    c.add_argument("--csv", default=None, help="default: figures/toy2d_convergence.csv with the true reward, "
                   "figures/toy2d_convergence_critic.csv with the fitted critic (--critic regression)")
    c.add_argument("--reference-csv", default=_CONVERGENCE_CSV, help="with --critic regression: the true-reward "
                   "rows the fitted critic's are set beside, each task at its converged budget (default: %(default)s)")
    c.add_argument("--figures-dir", default=None, help="the table and figure (default: the CSV's folder, so a CSV "
                   "of one's own never rewrites the project's figures)")
    c.add_argument("--runs-dir", default="runs/convergence")
    c.add_argument("--cache-dir", default=None, help="stage checkpoints (default runs/toy_cache)")
    c.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    c.add_argument("--capture", action="store_true", help="each training step one CUDA graph (eager on the CPU)")
    c.add_argument("--render-only", action="store_true", help="only the table, figure and --check from the CSV")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--workers", type=int, default=1, help="runs at a time in a process pool, the cores shared out "
                   "as torch threads (no progress bars; a line per finished run)")
    c.set_defaults(func=run_convergence_command)


def run_convergence_command(args) -> int:
    from aepo_lite.toy import convergence as conv
    cc = conv.ConvergenceConfig(tasks=tuple(args.tasks or ()), specs=tuple(args.specs), steps=tuple(args.steps),
                                seeds=tuple(args.seeds), beta=args.beta, critic=args.critic,
                                critic_steps=args.critic_steps, preset=args.preset,
                                device=args.device, capture=args.capture, draws=args.draws)
    if args.check is not None and args.check not in args.steps[:-1]:
        raise ValueError(f"--check {args.check}: expected one of the step counts below the largest, {args.steps[:-1]}")
    fitted = args.critic != "reward"
    csv = args.csv or (_CONVERGENCE_CRITIC_CSV if fitted else _CONVERGENCE_CSV)
    if fitted and Path(csv).resolve() == Path(args.reference_csv).resolve():
        raise ValueError(f"--csv {csv}: the fitted critic's rows would join the true-reward curve they are compared "
                         f"with (--reference-csv); give them a CSV of their own (default {_CONVERGENCE_CRITIC_CSV})")
    if not args.render_only:
        conv.run_convergence(cc, csv, runs_dir=args.runs_dir, cache_dir=args.cache_dir, progress=not args.quiet,
                             workers=args.workers)
    figures_dir = args.figures_dir or Path(csv).parent
    paths = (conv.render_critic(csv, args.reference_csv, figures_dir, tol=args.tol) if fitted
             else conv.render(csv, figures_dir, tol=args.tol))
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.check is not None:
        drops = conv.check_converged(conv.curve_rows(conv.read_rows(csv), cc), args.check, args.tol)
        top = 100 * max(drops.values(), default=0.0)  # none: every method flat from a smaller count
        past = (f"the largest drop past it is {top:.1f}%" if top > 0
                else f"no error fell past it (rose by {-top:.1f}% or more)")
        print(f"energy.steps={args.check} is converged: {past} (tol {100 * args.tol:.0f}%)")
    return 0


def run_grid_command(args) -> int:
    from aepo_lite.toy import report as toy_report
    from aepo_lite.toy import trained_budget
    from aepo_lite.toy.pipeline import default_out, run_toy
    csv = Path(args.csv)
    if not args.render_only:
        cfgs = _grid_configs(args)  # every config checked before the first training step
        done = toy_report.done_keys(csv)
        for i, cfg in enumerate(cfgs):
            keys = toy_report.config_keys(cfg)
            if keys <= done and not args.force:
                continue
            t0 = time.time()
            out = default_out(cfg, args.runs_dir)
            res = run_toy(cfg, out, cache_dir=args.cache_dir, progress=not args.quiet)
            toy_report.write_results(csv, toy_report.result_rows(res, cfg))
            if args.budget_csv:
                trained_budget.write_rows(args.budget_csv, trained_budget.budget_rows(res))
            done |= keys
            r = res["results"][0]
            print(f"[{i + 1}/{len(cfgs)}] {out.parent.name}/{out.name}: distance {r['distance']:.4f} floor "
                  f"{r['floor']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    project = csv.resolve() == Path(_GRID_CSV).resolve()  # however the path is spelled
    figures_dir = args.figures_dir or (csv.parent if project else csv.with_suffix(""))
    paths = toy_report.render(csv, figures_dir)
    if args.budget_csv and Path(args.budget_csv).exists():
        paths += trained_budget.render(args.budget_csv, figures_dir)
    readme = (_TOY_TABLES if project else "") if args.readme is None else args.readme
    if readme:
        paths.append(toy_report.update_readme(csv, readme))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
