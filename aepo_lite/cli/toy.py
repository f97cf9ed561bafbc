"""``aepo-lite toy``, ``aepo-lite toy-grid`` and ``aepo-lite toy-bench``: the toy 2D tasks of method.md section 6.

  aepo-lite toy --task 8gaussians --method aepo --beta 10 --guidance-scale 1 2 --preset smoke --out runs/toy/x
  aepo-lite toy-grid --preset full --betas 10 --seeds 0 1 2          # or any part of the grid
  aepo-lite toy-bench                                              # training steps/s, sampled points/s
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from aepo_lite.device import DEVICE_CHOICES

GRID_METHODS = ("aepo", "cep", "mse", "bc")


def _float(name):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {s!r}") from None
        return v
    return parse


def register(subparsers) -> None:
    from aepo_lite.toy.tasks import task_names
    from aepo_lite.toy.pipeline import ESTIMATORS, PRESETS, TOY_METHODS, DEFAULT_ESTIMATOR

    p = subparsers.add_parser("toy", help="train and evaluate one guidance method on a toy 2D task",
                              description="Train (or load from the cache) and evaluate one guidance method on a toy "
                              "2D task; writes DIR/metrics.json, DIR/config.json and DIR/figure.png.")
    p.add_argument("--task", required=True, help=f"toy task: {', '.join(task_names())} or a registered one")
    p.add_argument("--method", required=True, help=f"one of {', '.join(TOY_METHODS)}")
    p.add_argument("--estimator", default=DEFAULT_ESTIMATOR,
                   help=f"AEPO estimator <covariance>-<expansion> (default {DEFAULT_ESTIMATOR}); one of {', '.join(ESTIMATORS)}")
    p.add_argument("--beta", type=_float("beta"), required=True, help="inverse temperature beta >= 0")
    p.add_argument("--guidance-scale", type=_float("guidance-scale"), nargs="+", default=[1.0],
                   help="one or more guidance scales w >= 0 (default 1)")
    p.add_argument("--preset", default="smoke", choices=tuple(PRESETS), help="sizes (default smoke)")
    p.add_argument("--seed", type=int, default=0, help="seed of the energy, the samples and the references")
    p.add_argument("--out", default=None, help="output folder (default runs/toy/<task>-<method>-b<beta>-s<seed>)")
    p.add_argument("--cache-dir", default=None, help="stage checkpoints (default runs/toy_cache)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--n-eval", type=int, default=None, help="override the preset's sample count")
    p.add_argument("--grid-size", type=int, default=None, help="override the preset's energy-error grid size")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_toy_command)

    g = subparsers.add_parser("toy-grid", help="run the toy grid (or part of it) and regenerate its CSV, tables, README",
                              description="Run tasks x methods x betas x seeds (skipping rows already in the CSV "
                              "unless --force), merge them into the CSV, then regenerate figures/toy2d_* and the "
                              "README block from the CSV alone.")
    g.add_argument("--tasks", nargs="+", default=None, help="default: every registered task")
    g.add_argument("--methods", nargs="+", default=list(GRID_METHODS), help="default: aepo cep mse bc")
    g.add_argument("--estimators", nargs="+", default=None,
                   help=f"AEPO estimators to run (default: {DEFAULT_ESTIMATOR}); 'all' = every estimator")
    g.add_argument("--betas", type=_float("betas"), nargs="+", default=[3.0, 10.0, 20.0])
    g.add_argument("--guidance-scales", type=_float("guidance-scales"), nargs="+", default=[1.0])
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--preset", default="full", choices=tuple(PRESETS))
    g.add_argument("--csv", default="figures/toy2d_results.csv")
    g.add_argument("--figures-dir", default="figures")
    g.add_argument("--readme", default="README.md", help="README to update between the toy markers ('' = none)")
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--runs-dir", default="runs/toy", help="per-run metrics.json and figures")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    g.add_argument("--force", action="store_true", help="re-evaluate rows already in the CSV")
    g.add_argument("--render-only", action="store_true", help="only regenerate tables, figures and README from the CSV")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=run_grid_command)

    b = subparsers.add_parser("toy-bench", help="training steps/s and sampled points/s on a toy task")
    b.add_argument("--task", default="8gaussians")
    b.add_argument("--preset", default="full", choices=tuple(PRESETS), help="network sizes to time (default full)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per learner")
    b.add_argument("--n-points", type=int, default=4000, help="points per timed sampling call")
    b.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    b.set_defaults(func=run_bench_command)


def _config(args, **kw):
    from aepo_lite.toy.pipeline import make_config
    return make_config(args.preset, device=args.device, **kw)


def run_toy_command(args) -> int:
    from aepo_lite.toy.pipeline import run_toy
    if any(math.isnan(w) for w in args.guidance_scale):
        raise ValueError("guidance_scale: expected finite numbers, got NaN")
    cfg = _config(args, task=args.task, method=args.method, estimator=args.estimator, beta=args.beta,
                  guidance_scales=tuple(args.guidance_scale), seed=args.seed, n_eval=args.n_eval,
                  grid_size=args.grid_size)  # validated here, before any training
    out = Path(args.out or f"runs/toy/{cfg.task}-{cfg.method}-b{cfg.beta:g}-s{cfg.seed}")
    m = run_toy(cfg, out, cache_dir=args.cache_dir, progress=not args.no_progress)
    for r in m["results"]:
        print(f"{cfg.task} {cfg.method} beta={cfg.beta:g} w={r['guidance_scale']:g}: distance {r['distance']:.4f} "
              f"(floor {r['floor']:.4f}, ratio {r['distance'] / r['floor']:.2f}), mean reward {r['mean_reward']:.3f} "
              f"(exact target {m['target_mean_reward']:.3f})")
    print(f"wrote {out / 'metrics.json'} and {out / 'figure.png'}")
    return 0


def _grid_configs(args):
    from aepo_lite.toy.tasks import task_names
    from aepo_lite.toy.pipeline import DEFAULT_ESTIMATOR, ESTIMATORS
    tasks = args.tasks or task_names()
    ests = args.estimators or [DEFAULT_ESTIMATOR]
    if "all" in ests:
        ests = list(ESTIMATORS)
    cfgs = []
    for beta in args.betas:
        for seed in args.seeds:
            for task in tasks:
                for method in args.methods:
                    for est in (ests if method == "aepo" else [DEFAULT_ESTIMATOR]):
                        cfgs.append(_config(args, task=task, method=method, estimator=est, beta=beta, seed=seed,
                                            guidance_scales=tuple(args.guidance_scales)))
    return cfgs


def run_grid_command(args) -> int:
    from aepo_lite.toy import report as toy_report
    from aepo_lite.toy.pipeline import config_rows, run_toy
    csv = Path(args.csv)
    if not args.render_only:
        if any(math.isnan(w) for w in args.guidance_scales):
            raise ValueError("guidance_scales: expected finite numbers, got NaN")
        cfgs = _grid_configs(args)  # every config validated before the first training step
        done = {toy_report._key(r) for r in toy_report.read_results(csv)} if csv.exists() else set()
        for i, cfg in enumerate(cfgs):
            est = cfg.estimator if cfg.method == "aepo" else ""
            scales = (0.0,) if cfg.method == "bc" else cfg.guidance_scales
            keys = {(cfg.task, cfg.method, est, float(cfg.beta), float(w), cfg.seed) for w in scales}
            if keys <= done and not args.force:
                continue
            t0 = time.time()
            tag = f"{cfg.task}-{cfg.method}{'-' + est if est else ''}-b{cfg.beta:g}-s{cfg.seed}"
            m = run_toy(cfg, Path(args.runs_dir) / tag, cache_dir=args.cache_dir, progress=not args.no_progress)
            toy_report.write_results(csv, config_rows(m))
            done |= keys
            r = m["results"][0]
            print(f"[{i + 1}/{len(cfgs)}] {tag}: distance {r['distance']:.4f} floor {r['floor']:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    paths = toy_report.render(csv, args.figures_dir)
    if args.readme:
        paths.append(toy_report.update_readme(csv, args.readme))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_bench_command(args) -> int:
    from aepo_lite.toy.pipeline import bench
    for line in bench(args.task, preset=args.preset, steps=args.steps, n_points=args.n_points, device=args.device):
        print(line, flush=True)
    return 0
