"""Offline RL subcommands: ``make-dataset``, ``train``, ``eval``, ``rl-results``, ``rl-bench``."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from aepo_lite.rl.datasets import QUALITIES
    from aepo_lite.device import DEVICE_CHOICES
    from aepo_lite.core.nets import SMOOTH_ACTIVATIONS

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("train", help="train an agent on a Minari dataset (staged, resumable)")
    p.add_argument("--dataset", required=True, help="Minari dataset id (local, or downloaded when online)")
    p.add_argument("--method", required=True, choices=("aepo", "qgpo", "mse", "bc"))
    p.add_argument("--preset", default="smoke", choices=("smoke", "bench", "full"))
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>/<method>-<preset>-s<seed>)")
    p.add_argument("--covariance", default=None, help="AEPO posterior covariance (tweedie|isotropic|none)")
    p.add_argument("--expansion", default=None, help="AEPO expansion of Q (first|second|sampled)")
    p.add_argument("--critic", default=None, choices=("iql", "insupport"), help="override the method's critic")
    p.add_argument("--critic-activation", default=None, choices=SMOOTH_ACTIVATIONS + ("relu",),
                   help="the critic's activation (default mish; relu, QGPO's and cheaper, only where Q is not "
                        "differentiated: qgpo, mse, aepo with --expansion sampled)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the networks for training (CUDA graphs on CUDA; no faster on a CPU)")
    p.add_argument("--init-behaviour", default=None, help="copy the behaviour stage from this run dir (same settings)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--no-eval", action="store_true", help="train only; run `aepo-lite eval` later")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a trained run at one or more guidance scales")
    p.add_argument("--run", required=True, help="run directory made by `aepo-lite train`")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=None, help="default: the config's sweep")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None, help="best-of-N actions ranked by Q")
    p.add_argument("--guidance-t-max", type=float, default=None, help="guide only where t <= this (default 1: everywhere)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the guided sampler step (CUDA graphs on CUDA; the first calls compile)")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("rl-results", help="collect saved runs into figures/rl_results.csv (+ table, figure, README)")
    p.add_argument("--runs", nargs="+", default=["runs"], help="run directories or folders holding them")
    p.add_argument("--csv", default="figures/rl_results.csv")
    p.add_argument("--figures", default="figures")
    p.add_argument("--readme", default=None, help="README.md to update between <!-- rl:start --> and <!-- rl:end -->")
    p.set_defaults(func=_results)

    p = sub.add_parser("rl-bench", help="train + evaluate methods x seeds on one dataset; report speeds")
    p.add_argument("--dataset", required=True)
    p.add_argument("--methods", nargs="+", default=["bc", "aepo", "qgpo"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="bench", choices=("smoke", "bench", "full"))
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_bench)


def _make_dataset(args) -> int:
    from aepo_lite.rl.datasets import DatasetRecipe, make_dataset
    from aepo_lite.rl.data import description_info
    r = DatasetRecipe(env_id=args.env, quality=args.quality, steps=args.steps, name=args.name, seed=args.seed,
                      train_steps=args.train_steps, eval_every=args.eval_every, learning_starts=args.learning_starts,
                      ref_episodes=args.ref_episodes)
    ds = make_dataset(r, overwrite=args.overwrite)
    meta = ds.storage.metadata
    info = description_info(meta)
    print(f"{args.name}: {ds.total_episodes} episodes, {ds.total_steps} transitions, "
          f"mean episode return {info.get('dataset_mean_episode_return', float('nan')):.1f}, "
          f"ref_min_score {meta.get('ref_min_score'):.1f}, ref_max_score {meta.get('ref_max_score'):.1f}")
    return 0


def _default_out(dataset: str, method: str, preset: str, seed: int) -> Path:
    return Path("runs") / dataset.replace("/", "_") / f"{method}-{preset}-s{seed}"


def _train(args) -> int:
    from aepo_lite.rl.agent import evaluate_run, make_config, train
    cfg = make_config(args.dataset, args.method, args.preset, seed=args.seed, device=args.device,
                      covariance=args.covariance, expansion=args.expansion, critic=args.critic,
                      critic_activation=args.critic_activation, compile=args.compile, tensorboard=args.tensorboard or None)
    out = Path(args.out) if args.out else _default_out(args.dataset, args.method, args.preset, args.seed)
    train(cfg, out, progress=not args.quiet, init_behaviour=args.init_behaviour)
    print(f"trained {args.method} on {args.dataset} -> {out}")
    if not args.no_eval:
        _print_results(evaluate_run(out, progress=not args.quiet))
    return 0


def _print_results(res: dict) -> None:
    for w, row in res["results"].items():
        ns = row["normalized_score_mean"]
        ns = "n/a" if ns is None else f"{ns:.1f} +- {row['normalized_score_std']:.1f}"
        print(f"  w={w:>5}  return {row['return_mean']:9.1f} +- {row['return_std']:7.1f}  normalised {ns}  "
              f"({row['episodes']} episodes, {row['actions_per_s']:.0f} actions/s)")


def _eval(args) -> int:
    from aepo_lite.rl.agent import evaluate_run
    _print_results(evaluate_run(args.run, guidance_scales=args.guidance_scale, episodes=args.episodes,
                                device=args.device, n_candidates=args.candidates,
                                guidance_t_max=args.guidance_t_max, compile_sampler=args.compile,
                                progress=not args.quiet))
    return 0


def _results(args) -> int:
    from aepo_lite.rl import report as rl_report
    rows = rl_report.collect(args.runs, args.csv)
    print(f"{len(rows)} rows -> {args.csv}")
    for p in rl_report.render(args.csv, args.figures):
        print(f"wrote {p}")
    if args.readme:
        rl_report.update_readme(args.readme, args.csv)
        print(f"updated {args.readme}")
    return 0


def _bench(args) -> int:
    from aepo_lite.rl.agent import evaluate_run, make_config, train
    from aepo_lite.rl.data import load_minari
    data, _ = load_minari(args.dataset)
    out = Path(args.out)
    for seed in args.seeds:
        first = None
        for m in args.methods:
            cfg = make_config(args.dataset, m, args.preset, seed=seed, device=args.device)
            d = out / args.dataset.replace("/", "_") / f"{m}-{args.preset}-s{seed}"
            train(cfg, d, data=data, progress=not args.quiet, init_behaviour=first)
            first = first or d
            res = evaluate_run(d, progress=not args.quiet)
            print(f"{m} seed {seed}:")
            _print_results(res)
    return 0
