"""Is the toy energy budget large enough? The energy error against the exact E_t as the energy steps grow.

docs/derivation.md section 6b asks that methods be compared at a matched budget "large enough that more
steps no longer lower the energy error". This module measures it: for each task and method, one run per
energy step count (everything else the preset's, each run with its own learning-rate schedule), and per
run the RMS error of f_phi against the exact E_t (:func:`aepo_lite.toy.pipeline.energy_errors`, mean over
the error times) and the sampler distance at w = 1.

A budget of N steps is *converged* for a row group when no step count of its curve from N on lowers the
energy error by ``tol`` (relative) or more at the next one (2N by default): a curve that is flat from N to 2N but
falls again from 2N to 4N is not converged at N. :func:`check_converged` raises, naming every group that still
improves and where, when it is not; :func:`converged_budgets` finds, per task, the smallest budget that passes.

Entry points: ``run_convergence`` (resumable: a step count whose run folder already holds results for the
same config is read, not trained again), ``render`` (``figures/toy2d_convergence.{md,png}`` from the CSV),
``check_converged``, ``render_critic`` (``figures/toy2d_convergence_critic.{md,png}``: rows run with the fitted
critic, ``--critic regression``, kept in a CSV of their own, set beside the true-reward rows at each task's
converged budget: the critic part of the error budget end to end); the command is ``aepo-lite toy-convergence``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aepo_lite._io import atomic_save_figure, atomic_write_text, merge_csv_rows, read_csv_rows, read_json
from aepo_lite.config import config_diff, to_dict
from aepo_lite.toy import tasks as toy
from aepo_lite.toy.pipeline import (RUN_FIELDS_FREE, check_config, critic_label, default_out, draws_of, estimator,
                                    estimator_overrides, make_config, run_floor, run_toy)

__all__ = ["ConvergenceConfig", "DEFAULT_SPECS", "spec_configs", "run_convergence", "read_rows", "merge_rows",
           "improvements", "matched_top", "matched_budgets", "last_drops", "doublings", "curve_rows", "check_converged",
           "converged_budgets", "convergence_markdown", "distance_markdown", "spread_markdown", "render", "critic_pairs",
           "critic_markdown", "render_critic", "group_of"]

DEFAULT_SPECS = ("qgpo", "mse", "aepo:gaussian-fit/sampled", "aepo:particles-K256")
COLUMNS = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "energy_steps", "err_0.05", "err_0.2",
           "err_0.5", "err_mean", "distance", "draws", "floor", "energy_seconds", "critic_steps")
# distance draws behind a row (a CSV made before the column held one a row); the fitted critic's training steps
# ("" with the true reward; a fitted-critic CSV made before the column is refused: its critic budget is unknown)
OPTIONAL = {"draws": "1", "critic_steps": ""}
_KEY = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "energy_steps", "critic_steps")
_GROUP = ("task", "method", "estimator", "critic", "beta", "seed", "preset", "critic_steps")


@dataclass
class ConvergenceConfig:
    """The energy-steps curve: tasks x method specs x step counts x seeds, at a preset."""

    tasks: tuple[str, ...] = ()  # () = every registered task
    specs: tuple[str, ...] = DEFAULT_SPECS  # qgpo | mse | aepo:<estimator> (see pipeline.estimator_overrides)
    steps: tuple[int, ...] = (2000, 4000, 8000)  # energy step counts, increasing
    seeds: tuple[int, ...] = (0,)  # one curve per seed
    beta: float = 10.0
    critic: str = "reward"  # what every method reads Q from (matched inputs): reward | regression
    critic_steps: int | None = None  # the fitted critic's training steps (None: the preset's; only with regression)
    preset: str = "full"  # everything but energy.steps comes from this preset
    device: str = "auto"
    capture: bool = False  # each training step one CUDA graph (eager on the CPU; the runs' results are the same)
    draws: int | None = None  # distance draws per run (eval.draws; None: the preset's)


def _spec(spec: str) -> tuple[str, dict]:
    method, _, est = spec.partition(":")
    if method not in ("qgpo", "mse", "aepo"):
        raise ValueError(f"specs: expected qgpo, mse or aepo:<estimator>, got {spec!r}")
    if (method == "aepo") != bool(est):
        raise ValueError(f"specs: {spec!r}: aepo needs an estimator (aepo:<estimator>), the others take none")
    return method, (estimator_overrides(est) if est else {})


def spec_configs(cc: ConvergenceConfig) -> list:
    """Every run of the curve as a checked ToyConfig (errors name the bad spec or step count first)."""
    steps = [int(s) for s in cc.steps]
    if not steps or any(s < 1 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"steps: expected increasing positive step counts, got {tuple(cc.steps)}")
    if cc.critic_steps is not None and (cc.critic == "reward" or isinstance(cc.critic_steps, bool)
                                        or not isinstance(cc.critic_steps, int) or cc.critic_steps < 1):
        raise ValueError(f"critic_steps: expected a positive step count of the fitted critic (critic 'regression'), "
                         f"got {cc.critic_steps!r} with critic {cc.critic!r}")
    critic = {"kind": cc.critic} if cc.critic_steps is None else {"kind": cc.critic, "steps": cc.critic_steps}
    seeds = list(cc.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(x, int) or x < 0 for x in seeds):
        raise ValueError(f"seeds: expected distinct non-negative integers, got {tuple(cc.seeds)}")
    out = []
    for seed in seeds:
        for task in cc.tasks or toy.task_names():
            for spec in cc.specs:
                method, over = _spec(spec)
                ev = {} if cc.draws is None else {"eval": {"draws": cc.draws}}
                out += [make_config(task, method, cc.preset, seed=seed, device=cc.device, capture=cc.capture, **ev,
                                    energy=dict(over.get("energy", {}), beta=cc.beta, steps=n),
                                    support=over.get("support"), critic=critic) for n in steps]
    return out


def _row(res: dict, cfg) -> dict:
    """The curve's row of a run; its floor is the expected one (:func:`aepo_lite.toy.tasks.expected_floor`) of the
    run's settings, also for runs evaluated when each recorded one seed's draw."""
    errs, r = res["energy_error"], dict(res["results"][0], floor=run_floor(cfg))
    return dict(task=cfg.task, method=cfg.method, estimator=res["estimator"], critic=res["critic"],
                beta=f"{cfg.energy.beta:g}", seed=cfg.seed, preset=cfg.preset, energy_steps=cfg.energy.steps,
                **{f"err_{t}": f"{errs[t]:.6f}" for t in ("0.05", "0.2", "0.5")},
                err_mean=f"{sum(errs.values()) / len(errs):.6f}", distance=f"{r['distance']:.6f}",
                draws=draws_of(r),
                floor=f"{r['floor']:.6f}", energy_seconds=f"{res['train_info']['energy']['seconds']:.1f}",
                critic_steps=cfg.critic.steps if res["critic"] == "regression" else "")


def _run_dir(cfg, runs_dir) -> Path:
    return default_out(cfg, runs_dir).with_name(default_out(cfg, runs_dir).name + f"-e{cfg.energy.steps}")


def _finished(out: Path, cfg) -> dict | None:
    """The run's results when ``out`` holds a finished run of exactly ``cfg``, evaluated with its ``eval.draws`` (else
    None: run it; a folder evaluated with other draws, or before runs recorded them, is evaluated again)."""
    if not (out / "results.json").exists() or not (out / "config.json").exists():
        return None
    same = not config_diff(read_json(out / "config.json"), to_dict(cfg), ignore=RUN_FIELDS_FREE)
    res = read_json(out / "results.json") if same else None
    if res is not None and draws_of(res["results"][0]) != cfg.eval.draws:
        return None  # evaluated with another number of distance draws: evaluate again (the stages are cached)
    return res


def read_rows(csv_path) -> list[dict]:
    """The curve's rows (none when the CSV does not exist yet)."""
    rows = (read_csv_rows(csv_path, COLUMNS, made_by="aepo-lite toy-convergence", optional=OPTIONAL)
            if Path(csv_path).exists() else [])
    if any(r["critic"] == "regression" and not r["critic_steps"] for r in rows):
        raise ValueError(f"{csv_path}: fitted-critic rows without critic_steps (a CSV made before the column): their "
                         "critic's training budget is unknown; write it into the column (the `full` preset's was 1500 "
                         "steps before session 67) or run the rows again")
    return rows


def merge_rows(csv_path, new_rows: list[dict]) -> list[dict]:
    """Merge rows into the CSV (a row with the same key is replaced, the others kept) and return all of them.
    The CSV is read and written under a lock, so processes that run other parts of the curve into one CSV
    keep each other's rows."""
    return merge_csv_rows(csv_path, new_rows, COLUMNS, _KEY, made_by="aepo-lite toy-convergence", sort_key=_sort_key,
                          optional=OPTIONAL)


def _run_one(cfg, runs_dir, cache_dir, progress: bool, csv_path, threads: int | None = None) -> tuple[dict, float]:
    """One point of the curve: train (or read back) the run, merge its row into the CSV; (row, seconds)."""
    if threads:
        torch.set_num_threads(threads)
    out, t0 = _run_dir(cfg, runs_dir), time.time()
    res = _finished(out, cfg) or run_toy(cfg, out, cache_dir=cache_dir, progress=progress, figure=False, budget=False)
    row = _row(res, cfg)
    merge_rows(csv_path, [row])
    return row, time.time() - t0


def run_convergence(cc: ConvergenceConfig, csv_path="figures/toy2d_convergence.csv", *, runs_dir="runs/convergence",
                    cache_dir=None, progress: bool = True, workers: int = 1) -> list[dict]:
    """Run (or read) every step count of the curve and merge its row into ``csv_path`` after each run (several
    processes may share one CSV); returns the CSV's rows. ``workers`` > 1: that many runs at a time in a
    process pool, the machine's cores shared out as torch threads (no progress bars then; a line per run)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
    cfgs = [check_config(c) for c in spec_configs(cc)]

    def done(i: int, row: dict, seconds: float) -> None:
        print(f"[{i}/{len(cfgs)}] {row['task']} {_label(row)} seed {row['seed']} energy.steps={row['energy_steps']}: "
              f"energy error {float(row['err_mean']):.4f}, distance {float(row['distance']):.4f} ({seconds:.0f} s)",
              flush=True)

    if workers == 1:
        for i, cfg in enumerate(cfgs):
            done(i + 1, *_run_one(cfg, runs_dir, cache_dir, progress, csv_path))
        return read_rows(csv_path)
    import os
    from concurrent.futures import as_completed

    from aepo_lite._procs import process_pool
    threads = max(1, (os.cpu_count() or 1) // workers)
    with process_pool(workers) as pool:  # its workers stop if the grid is killed
        futures = [pool.submit(_run_one, cfg, runs_dir, cache_dir, False, csv_path, threads) for cfg in cfgs]
        for i, f in enumerate(as_completed(futures)):
            done(i + 1, *f.result())
    return read_rows(csv_path)


def _sort_key(r: dict) -> tuple:
    return (r["task"], r["method"], r["estimator"], r["critic"], float(r["beta"]), int(r["seed"]), r["preset"],
            int(r["energy_steps"]), int(r.get("critic_steps") or 0))


def group_of(r: dict) -> tuple:
    """A row's group (:data:`_GROUP`) as strings; a row without ``critic_steps`` (true-reward rows made in memory)
    has none."""
    return tuple(str(r[k]) for k in _GROUP[:-1]) + (str(r.get("critic_steps", "")),)


def _groups(rows: list[dict], value=None) -> dict[tuple, dict[int, float]]:
    """Per row group (:data:`_GROUP`): {step count: ``value(row)``} (default the energy error; rows whose value is
    None are left out)."""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        v = float(r["err_mean"]) if value is None else value(r)
        if v is not None:
            out.setdefault(group_of(r), {})[int(r["energy_steps"])] = v
    return out


def _over_floor(r: dict) -> float | None:
    """A row's sliced-W2 distance over its noise floor (None without both)."""
    try:
        return float(r["distance"]) / float(r["floor"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def matched_top(rows: list[dict]) -> int:
    """The top of the comparison: the largest step count run by at least two methods (method, estimator, critic,
    beta, preset) on every task of the rows, so that one curve carried further than the others' (on some or all
    tasks) does not become the table alone (with a single method in the rows, its largest step count)."""
    return max(matched_budgets(rows))


def matched_budgets(rows: list[dict]) -> list[int]:
    """Every step count run by at least two methods on every task of the rows (one method: each of its counts),
    increasing; an error when there is none."""
    def label(r):
        return tuple(str(r[k]) for k in ("method", "estimator", "critic", "beta", "preset"))
    need = min(2, len({label(r) for r in rows}))
    at: dict = {}
    for r in rows:
        at.setdefault(int(r["energy_steps"]), {}).setdefault(r["task"], set()).add(label(r))
    tasks = {r["task"] for r in rows}
    common = [n for n, by_task in at.items() if set(by_task) == tasks and all(len(v) >= need for v in by_task.values())]
    if not common:
        raise ValueError("energy_steps: no step count at which two methods of the curve were both run on every task")
    return sorted(common)


def _drop(curve: dict[int, float], a: int, b: int) -> float:
    """The relative drop of the energy error from ``a`` to ``b`` steps, (err(a) - err(b)) / err(a)."""
    return (curve[a] - curve[b]) / max(curve[a], 1e-12)


def last_drops(rows: list[dict]) -> dict[tuple, tuple[int, int, float] | None]:
    """Per row group: (N, next, relative drop of the energy error from N to next) for its own last two step counts
    (None with fewer than two)."""
    return {g: steps[-1] if steps else None for g, steps in doublings(rows).items()}


def doublings(rows: list[dict]) -> dict[tuple, list[tuple[int, int, float]]]:
    """Per row group: (N, next, relative drop of the energy error from N to next) for each pair of its
    consecutive step counts, increasing."""
    out = {}
    for g, curve in _groups(rows).items():
        ns = sorted(curve)
        out[g] = [(a, b, _drop(curve, a, b)) for a, b in zip(ns, ns[1:])]
    return out


def improvements(rows: list[dict], steps: int) -> dict[tuple, float | None]:
    """Per row group: the relative drop of the energy error from ``steps`` to the group's next larger step
    count, (err(N) - err(next)) / err(N); None when the group has no row at ``steps`` or none above it."""
    out = {}
    for g, curve in _groups(rows).items():
        above = [n for n in curve if n > steps]
        out[g] = None if steps not in curve or not above else _drop(curve, steps, min(above))
    return out


def _name(g: tuple) -> str:
    d = dict(zip(_GROUP, g))
    label = f"aepo({d['estimator']})" if d["method"] == "aepo" else d["method"]
    return f"{d['task']} {label} (Q: {d['critic']}, beta {d['beta']}, seed {d['seed']}, preset {d['preset']})"


def curve_rows(rows: list[dict], cc: ConvergenceConfig) -> list[dict]:
    """The rows of ``cc``'s curve: its tasks, method specs, beta, critic and preset (a CSV may hold other curves)."""
    cfgs = spec_configs(cc)
    keep = {(c.task, c.method, estimator(c), critic_label(c), f"{c.energy.beta:g}", c.preset) for c in cfgs}
    return [r for r in rows if (r["task"], r["method"], r["estimator"], r["critic"], f"{float(r['beta']):g}",
                                r["preset"]) in keep]


def check_converged(rows: list[dict], steps: int, tol: float = 0.1) -> dict[tuple, float]:
    """Raise ValueError naming every row group whose energy error still falls by more than ``tol`` past
    ``steps`` or past any larger step count of its curve (a plateau from N to 2N followed by a fall is not
    converged at N), and every method none of whose seeds was measured at ``steps`` and above; return the drops
    past ``steps`` when all converged. A seed run at ``steps`` but not past it is a replicate of the budget, not a
    curve: it is checked through the seeds of its method whose curves go on."""
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol: expected a relative drop in (0, 1), got {tol!r}")
    drops = improvements(rows, steps)
    if not drops:
        raise ValueError(f"energy.steps={steps}: no convergence rows to check (run aepo-lite toy-convergence)")
    methods: dict[tuple, list] = {}
    for g, d in drops.items():
        methods.setdefault(_without_seed(g), []).append(d)
    missing = [m for m, ds in methods.items() if all(d is None for d in ds)
               and not _converged_below([r for r in rows if _method_key(r) == m], steps, tol)]
    missing = [_name(m[:5] + ("any",) + m[5:]) for m in missing]
    bad = [f"{_name(g)}: {100 * d:.0f}% lower" for g, d in drops.items() if d is not None and d > tol]
    steps_of = doublings(rows)
    for g, d in drops.items():  # the rest of each curve that passes at ``steps``: every later doubling too
        if d is None or d > tol:
            continue
        bad += [f"{_name(g)}: {100 * x:.0f}% lower from {a} to {b}"
                for a, b, x in steps_of[g] if a > steps and x > tol][:1]
    if missing or bad:
        raise ValueError(f"energy.steps={steps} is not shown converged (tol {100 * tol:.0f}%): "
                         + "; ".join(bad + [f"{m}: no seed with rows at {steps} and past it" for m in missing]))
    return {g: d for g, d in drops.items() if d is not None}


def _without_seed(g: tuple) -> tuple:
    """A row group (:data:`_GROUP`) without its seed: the method's curve on one task, beta and preset."""
    return g[:5] + g[6:]


def _method_key(r: dict) -> tuple:
    """A row's :func:`_without_seed` group."""
    return _without_seed(group_of(r))


def _converged_below(rows: list[dict], steps: int, tol: float) -> bool:
    """Whether one method's rows (one task) are shown converged at a step count below ``steps``: then they are at
    ``steps`` too, by the rule's own definition (no measured doubling from there on lowers the error by ``tol``),
    and a method need not be carried past every budget another method needs."""
    for n in sorted({int(r["energy_steps"]) for r in rows if int(r["energy_steps"]) < steps}):
        try:
            check_converged(rows, n, tol)
            return True
        except ValueError:
            continue
    return False


def converged_budgets(rows: list[dict], tol: float = 0.1) -> dict[str, int | None]:
    """Per task: the smallest step count, among those two methods ran there (one method: its own), at which
    :func:`check_converged` passes on the rows of the methods run at that count (a method whose curve stops below
    it is not compared there); None when no measured budget passes."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        out[task] = None
        try:
            counts = matched_budgets(mine)
        except ValueError:  # no count at which two methods both ran on this task: nothing to compare
            continue
        for n in counts:
            there = {_method_key(r) for r in mine if int(r["energy_steps"]) == n}
            try:
                check_converged([r for r in mine if _method_key(r) in there], n, tol)
            except ValueError:
                continue
            out[task] = n
            break
    return out


def _label(d: dict) -> str:
    return f"aepo({d['estimator']})" if d["method"] == "aepo" else d["method"]


def _signed_percent(x: float) -> str:
    """``x`` as a signed percentage: whole percents, one decimal under 1% so that a small rise is not "-0%"."""
    return f"{100 * x:+.1f}%" if abs(100 * x) < 0.95 else f"{100 * x:+.0f}%"


def convergence_markdown(rows: list[dict], steps: int | None = None, tol: float = 0.1) -> str:
    """The curve as a table: one line per row group, the energy error at each step count, and the drop past
    ``steps`` (default: past each row's own last-but-one step count); a seed column when the rows hold more than
    one seed."""
    groups = _groups(rows)
    counts = sorted({n for c in groups.values() for n in c})
    seeds = len({g[5] for g in groups}) > 1
    head = ("| task | method | " + ("seed | " if seeds else "") + " | ".join(f"{n} steps" for n in counts)
            + " | drop past " + (f"{steps} |" if steps else "its last-but-one |"))
    lines = [head, "|" + "---|" * (len(counts) + 3 + seeds)]
    drops = (improvements(rows, steps) if steps else
             {g: (None if v is None else v[2]) for g, v in last_drops(rows).items()})
    for g, curve in sorted(groups.items(), key=lambda kv: (kv[0][:5], int(kv[0][5]), kv[0][6:])):
        d = dict(zip(_GROUP, g))
        drop = drops[g]
        cells = " | ".join(f"{curve[n]:.3f}" if n in curve else "" for n in counts)
        flag = "" if drop is None else _signed_percent(drop) + (" (not converged)" if drop > tol else "")
        lines.append(f"| {d['task']} | {_label(d)} | " + (f"{d['seed']} | " if seeds else "") + f"{cells} | {flag} |")
    return "\n".join(lines) + "\n"


def distance_markdown(rows: list[dict], steps: int | dict[str, int] | None = None) -> str:
    """The sampler at one step count (default the largest; a dict: one per task, tasks not in it left out): per
    task and method, the distance at w = 1 as mean +- sample std over the seeds run there, the noise floor (the
    expected one, the same for every seed) and the ratios to the floor and to QGPO's distance on the same task."""
    steps = steps if steps is not None else max(int(r["energy_steps"]) for r in rows)
    at = steps if isinstance(steps, dict) else {r["task"]: steps for r in rows}
    cells: dict[tuple, dict[str, tuple[float, float]]] = {}
    for r in rows:
        if int(r["energy_steps"]) == at.get(r["task"]):
            key = (r["task"], _label(r), r["critic"], r["beta"], r["preset"])
            cells.setdefault(key, {})[r["seed"]] = (float(r["distance"]), float(r["floor"]), str(r.get("draws", 1)))
    if not cells:
        raise ValueError(f"energy.steps={steps}: no convergence rows at that step count")
    lines = ["| task | method | seeds | draws | distance (w = 1) | floor | / floor | / QGPO |",
             "|---|---|---|---|---|---|---|---|"]
    for key, by_seed in sorted(cells.items()):
        dist = [v[0] for v in by_seed.values()]
        floor = statistics.mean(v[1] for v in by_seed.values())
        mean, std = statistics.mean(dist), (statistics.stdev(dist) if len(dist) > 1 else 0.0)
        q = cells.get((key[0], "qgpo", *key[2:]))
        q_mean = statistics.mean(v[0] for v in q.values()) if q else None
        seeds = sorted(by_seed, key=int)
        lines.append(f"| {key[0]} | {key[1]} | {', '.join(seeds)} | {', '.join(by_seed[x][2] for x in seeds)} | "
                     f"{mean:.3f} +- {std:.3f} | "
                     f"{floor:.3f} | {mean / floor:.2f} | " + ("" if q_mean is None else f"{mean / q_mean:.2f}") + " |")
    return "\n".join(lines) + "\n"


_SEED_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _plot(rows: list[dict], path, budgets: dict[str, int | None], value=None,
          ylabel: str = "RMS error of f vs exact E_t", hlines: tuple = (), hollow=None,
          note: str | None = None) -> Path | None:
    """The curves of ``value`` (default the energy error; see :func:`_groups`), one panel per task, each task's
    smallest converged budget (``budgets``) marked, grey dotted lines at ``hlines``, the points of rows where
    ``hollow(row)`` is true drawn hollow, ``note`` as the figure's title; None when no row has a value.
    A method has one colour in every panel and a seed one line style and marker; one legend for the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    groups = _groups(rows, value)
    if not groups:
        return None
    open_pts = _groups(rows, lambda r: 1.0 if hollow is not None and hollow(r) else None)
    labels = sorted({_label(dict(zip(_GROUP, g))) for g in groups})
    colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    seeds = sorted({g[5] for g in groups})
    styles = {s: _SEED_STYLES[i % len(_SEED_STYLES)] for i, s in enumerate(seeds)}
    tasks = sorted({g[0] for g in groups})
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows + 0.9), squeeze=False,
                             layout="constrained")
    for ax, task in zip(axes.flat, tasks):
        for g, curve in sorted(groups.items()):
            if g[0] != task:
                continue
            label = _label(dict(zip(_GROUP, g)))
            colour, (ls, marker) = colours[label], styles[g[5]]
            ns = sorted(curve)
            ax.plot(ns, [curve[n] for n in ns], color=colour, ls=ls, marker=marker, ms=4.5, lw=1.3,
                    gid=f"{label} s{g[5]}")  # the curve's method and seed (tests read it)
            if hollow_ns := [n for n in ns if n in open_pts.get(g, {})]:
                ax.plot(hollow_ns, [curve[n] for n in hollow_ns], ls="none", marker=marker, ms=4.5, mfc="white",
                        color=colour)
        if budgets.get(task) is not None:
            ax.axvline(budgets[task], color="0.5", ls="--", lw=1)
        for y in hlines:
            ax.axhline(y, color="0.6", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(task if budgets.get(task) is not None else f"{task}: no converged budget", fontsize=10)
        ax.set_xlabel("energy steps")
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[lab], lw=2, label=lab) for lab in labels]
    if len(seeds) > 1:
        handles += [Line2D([], [], color="0.3", ls=styles[s][0], marker=styles[s][1], ms=4.5, label=f"seed {s}")
                    for s in seeds]
    if any(budgets.get(t) is not None for t in tasks):
        handles.append(Line2D([], [], color="0.5", ls="--", lw=1, label="smallest converged budget"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if note:
        fig.suptitle(note, fontsize=9)
    try:
        return atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def spread_markdown(rows: list[dict]) -> str:
    """Per task and method, the energy error at each step count run on two seeds or more: mean +- sample std
    (seeds), the spread a one-seed drop is read against ("" where fewer than two seeds ran)."""
    cells: dict[tuple, dict[int, list[float]]] = {}
    for g, curve in _groups(rows).items():
        for n, err in curve.items():
            cells.setdefault(_without_seed(g), {}).setdefault(n, []).append(err)
    counts = sorted({n for c in cells.values() for n, v in c.items() if len(v) > 1})
    if not counts:
        return ""
    lines = ["| task | method | " + " | ".join(f"{n} steps" for n in counts) + " |", "|" + "---|" * (len(counts) + 2)]
    for key, by_n in sorted(cells.items()):
        if not any(len(by_n.get(n, [])) > 1 for n in counts):
            continue
        d = dict(zip(_GROUP[:5] + _GROUP[6:], key))
        lines.append(f"| {d['task']} | {_label(d)} | " + " | ".join(
            f"{statistics.mean(v):.3f} +- {statistics.stdev(v):.3f} ({len(v)})" if len(v := by_n.get(n, [])) > 1
            else "" for n in counts) + " |")
    return "\n".join(lines) + "\n"


def _budgets_markdown(rows: list[dict], budgets: dict[str, int | None], tol: float) -> str:
    """The section of each task at the smallest budget shown converged (``budgets``: :func:`converged_budgets`)."""
    shown = {t: n for t, n in budgets.items() if n is not None}
    text = ("\n## Each task at the smallest budget shown converged\n\nPer task, the smallest energy step count at "
            f"which no measured doubling from there on lowered any compared method's energy error by more than "
            f"{100 * tol:.0f}% (`check_converged`; a method already flat from a smaller count counts as converged "
            "there): " + (", ".join(f"{t} {n}" for t, n in shown.items()) or "none") + ". "
            + (f"Not shown converged at any budget measured: {', '.join(t for t, n in budgets.items() if n is None)}"
               " (left out below). " if len(shown) < len(budgets) else "")
            + "Sliced-W2 distance at w = 1, columns as above.\n\n")
    return text + (distance_markdown(rows, shown) if shown else "") + _unconverged_markdown(rows, budgets)


def unconverged_tops(rows: list[dict], budgets: dict[str, int | None]) -> dict[str, int]:
    """Each task not shown converged (``budgets`` None) at the largest step count two methods reached on it
    (:func:`matched_budgets` of its rows); a task with no such count is left out."""
    last = {}
    for task in (t for t, n in budgets.items() if n is None):
        try:
            last[task] = max(matched_budgets([r for r in rows if r["task"] == task]))
        except ValueError:
            continue
    return last


def _unconverged_markdown(rows: list[dict], budgets: dict[str, int | None]) -> str:
    """The tasks not shown converged, each at its :func:`unconverged_tops` budget: where a still-falling curve
    stands, read as not converged; "" when every task converged or none of the rest has a count two methods share."""
    last = unconverged_tops(rows, budgets)
    if not last:
        return ""
    return ("\n## The tasks not shown converged, at their largest matched budget\n\nNot a converged comparison: "
            "no budget measured passed `check_converged` (a method's energy error still fell by more than the "
            "tolerance past each). Per task: " + ", ".join(f"{t} {n}" for t, n in last.items())
            + " energy steps (the seeds run there). Columns as above.\n\n" + distance_markdown(rows, last))


def render(csv_path="figures/toy2d_convergence.csv", figures_dir="figures", tol: float = 0.1) -> list[Path]:
    """``toy2d_convergence.md``, ``.png`` (energy error) and ``_distance.png`` (the samples' distance over the
    noise floor, where the energy error's fall can be set against the samples') from the CSV alone."""
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no convergence rows (run aepo-lite toy-convergence first)")
    d = Path(figures_dir)
    top = matched_top(rows)  # the sampler table compares methods: the largest budget two methods reached
    budgets = converged_budgets(rows, tol)
    text = (f"Energy error vs energy steps, generated from `{Path(csv_path).name}` by "
            "`aepo_lite.toy.convergence.render` (do not edit by hand). Each cell: the RMS error of the trained "
            "f_phi against the exact E_t (mean over t = 0.05, 0.2, 0.5; up to a constant per t, weighted by "
            f"mu_t); one run per step count, each with its own learning-rate schedule. A drop above "
            f"{100 * tol:.0f}% means more steps still help. Our measurement, not the paper's.\n\n"
            + convergence_markdown(rows, tol=tol)
            + f"\n## The sampler at {top} energy steps\n\nSliced-W2 distance to exact target samples at w = 1 "
            "(mean +- std over the seeds run at this step count; each seed's distance is the mean over its draws, "
            "listed per seed: sampler seeds and exact target sets of seed + d); / floor: that mean over the noise "
            "floor (the expected "
            f"distance between two independent exact sample sets, a mean over {toy.FLOOR_PAIRS} pairs: "
            "`toy2d_floor_spread.md`); "
            "/ QGPO: over QGPO's mean on the same task.\n\n"
            + distance_markdown(rows, top) + _budgets_markdown(rows, budgets, tol)
            + ("\n## The seeds' spread\n\nThe energy error over the seeds run at a step count (mean +- sample "
               "std, seeds in brackets): a drop read on one seed's curve is judged against it.\n\n"
               + spread if (spread := spread_markdown(rows)) else ""))
    paths = [atomic_write_text(d / "toy2d_convergence.md", text), _plot(rows, d / "toy2d_convergence.png", budgets),
             _plot(rows, d / "toy2d_convergence_distance.png", budgets, _over_floor,
                   "sliced-W2 distance / noise floor (w = 1)", hlines=(1.0, 2.0),
                   hollow=lambda r: str(r.get("draws", "")) == "1",
                   note="The samples' distance to the exact target over the noise floor (dotted: 1x and 2x). "
                        "Hollow points: one sampling draw; filled: the mean of the run's draws.")]
    return [p for p in paths if p is not None]


def _seed_cells(rows: list[dict], at: dict[str, int]) -> dict[tuple, dict[str, dict]]:
    """{(task, method label, beta, preset, critic steps): {seed: row}} of the rows at their task's step count in
    ``at``."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if int(r["energy_steps"]) == at.get(r["task"]):
            key = (r["task"], _label(r), r["beta"], r["preset"], group_of(r)[-1])
            cells.setdefault(key, {})[str(r["seed"])] = r
    return cells


def _mean_over(cell: dict[str, dict], seeds, value) -> float | None:
    """The mean of ``value(row)`` over the rows of ``cell`` ({seed: row}) of ``seeds``; None without any."""
    vals = [value(cell[s]) for s in seeds]
    return statistics.mean(vals) if vals else None


def critic_pairs(critic_rows: list[dict], reward_rows: list[dict], tol: float = 0.1) -> list[dict]:
    """The fitted critic against the true reward, matched: per task, method (label), beta and preset of
    ``critic_rows`` (the fitted critic's, ``critic`` != ``reward``) at the task's converged budget N of the
    true-reward rows (:func:`converged_budgets` of ``reward_rows``), paired with the true-reward rows of the same
    method and seeds at N. Each: task, method, steps, seeds (the fitted rows' seeds), paired (those the true reward
    has too), fitted / true (mean distance over the floor, each over its own seeds; energy errors likewise), ratio
    (fitted over true on the paired seeds; None without any), vs_qgpo (the fitted mean over the fitted QGPO's on the
    task; None without it). An error when a critic row reads the true reward or no budget pairs anything."""
    bad = sorted({r["critic"] for r in critic_rows if r["critic"] in ("reward", "none")})
    if bad:
        raise ValueError(f"critic rows: expected the fitted critic's rows (critic 'regression'), got critic {bad[0]!r} "
                         "(the true-reward rows belong in the reference CSV, toy2d_convergence.csv)")
    if any(not group_of(r)[-1] for r in critic_rows):
        raise ValueError("critic rows: each needs the fitted critic's training steps (critic_steps), which rows made "
                         "before that column lack")
    reward = [r for r in reward_rows if r["critic"] == "reward"]
    budgets = converged_budgets(reward, tol) if reward else {}
    at = {t: n for t, n in budgets.items() if n is not None}
    fitted, true = _seed_cells(critic_rows, at), _seed_cells(reward, at)
    out = []
    for key, by_seed in sorted(fitted.items(), key=lambda kv: (*kv[0][:4], int(kv[0][4]))):
        task, label = key[0], key[1]
        ref = true.get((*key[:4], ""), {})
        paired = sorted(set(by_seed) & set(ref), key=int)
        mean = _mean_over
        qgpo = fitted.get((task, "qgpo", *key[2:]))
        f_mean = mean(by_seed, list(by_seed), _over_floor)
        q_mean = mean(qgpo, list(qgpo), _over_floor) if qgpo else None
        out.append(dict(task=task, method=label, critic_steps=int(key[4]), steps=at[task],
                        seeds=sorted(by_seed, key=int), paired=paired,
                        fitted=f_mean, true=mean(ref, list(ref), _over_floor) if ref else None,
                        ratio=(mean(by_seed, paired, _over_floor) / mean(ref, paired, _over_floor)) if paired else None,
                        fitted_err=mean(by_seed, list(by_seed), lambda r: float(r["err_mean"])),
                        true_err=mean(ref, list(ref), lambda r: float(r["err_mean"])) if ref else None,
                        vs_qgpo=f_mean / q_mean if q_mean else None))
    if critic_rows and not out:
        raise ValueError("critic rows: none at a task's converged budget of the true-reward rows ("
                         + (", ".join(f"{t} {n}" for t, n in at.items()) or "no task has one") + ")")
    return out


def critic_markdown(critic_rows: list[dict], reward_rows: list[dict], tol: float = 0.1,
                    pairs: list[dict] | None = None) -> str:
    """:func:`critic_pairs` as a table (``pairs``: those already computed from the same rows), and the
    fitted-critic rows left out (not at a converged budget)."""
    pairs = critic_pairs(critic_rows, reward_rows, tol) if pairs is None else pairs

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)
    lines = ["| task | method | critic steps | energy steps | seeds | / floor, true reward | / floor, fitted critic | "
             "fitted / true (paired seeds) | / QGPO, both fitted | energy error, true | energy error, fitted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['task']} | {p['method']} | {p['critic_steps']} | {p['steps']} | {', '.join(p['seeds'])} | "
                     f"{f(p['true'])} | "
                     f"{f(p['fitted'])} | {f(p['ratio'])}" + (f" ({', '.join(p['paired'])})" if p["paired"] else "")
                     + f" | {f(p['vs_qgpo'])} | {f(p['true_err'], '.3f')} | {f(p['fitted_err'], '.3f')} |")
    shown = {(p["task"], p["method"], str(p["critic_steps"]), s, p["steps"]) for p in pairs for s in p["seeds"]}
    left = sorted({(r["task"], _label(r), int(r["energy_steps"])) for r in critic_rows
                   if (r["task"], _label(r), group_of(r)[-1], str(r["seed"]), int(r["energy_steps"])) not in shown})
    return ("\n".join(lines) + "\n"
            + ("\nLeft out (not at a budget the true-reward curve shows converged on their task): "
               + ", ".join(f"{t} {m} at {n}" for t, m, n in left) + ".\n" if left else ""))


def _plot_critic(pairs: list[dict], path) -> Path | None:
    """Per task, each method's distance over the floor with the true reward (plain bar) and the fitted critic
    (hatched), log scale, dotted lines at 1x and 2x the floor; None without pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.patches import Patch
    if not pairs:
        return None
    tasks = sorted({p["task"] for p in pairs})
    methods = sorted({p["method"] for p in pairs})
    budgets = sorted({p["critic_steps"] for p in pairs})  # the fitted critic's training steps, one hatch each
    hatches = {n: ("///", "...", "xxx", "\\\\\\", "+++")[i % 5] for i, n in enumerate(budgets)}
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    width = 0.8 / ((1 + len(budgets)) * len(methods))
    fig, ax = plt.subplots(figsize=(2.4 + 1.5 * len(tasks), 4.2), layout="constrained")
    drawn = set()  # (task, method) whose true-reward bar is drawn
    for p in pairs:
        x0 = tasks.index(p["task"]) - 0.4 + (1 + len(budgets)) * methods.index(p["method"]) * width
        fitted = "fitted" if len(budgets) == 1 else f"fitted {p['critic_steps']}"
        bars = [] if (p["task"], p["method"]) in drawn else [(0, p["true"], None, "true")]
        drawn.add((p["task"], p["method"]))
        bars.append(((1 + budgets.index(p["critic_steps"])) * width, p["fitted"], hatches[p["critic_steps"]], fitted))
        for dx, value, hatch, what in bars:
            if value is not None:
                ax.bar(x0 + dx + width / 2, value, width, color=colours[p["method"]], hatch=hatch,
                       edgecolor="white" if hatch else colours[p["method"]], lw=0,
                       gid=f"{p['task']} {p['method']} {what}")  # tests read it
    for y in (1.0, 2.0):
        ax.axhline(y, color="0.6", ls=":", lw=1)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{next(p['steps'] for p in pairs if p['task'] == t)} steps"
                                      for t in tasks], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("sliced-W2 distance / noise floor\n(w = 1; dotted: 1x, 2x)")
    handles = [Patch(color=colours[m], label=m) for m in methods]
    handles += [Patch(facecolor="0.7", label="true reward")] + [
        Patch(facecolor="0.7", hatch=hatches[n], edgecolor="white",
              label="fitted critic" + (f", {n} steps" if len(budgets) > 1 else "")) for n in budgets]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle("The fitted critic against the true reward,\neach task at its converged budget (mean over seeds)",
                 fontsize=9)
    try:
        return atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def render_critic(csv_path="figures/toy2d_convergence_critic.csv", reference_csv="figures/toy2d_convergence.csv",
                  figures_dir="figures", tol: float = 0.1) -> list[Path]:
    """``<csv stem>.md`` and ``.png``: the fitted-critic rows of ``csv_path`` beside the true-reward rows of
    ``reference_csv`` at each task's converged budget (:func:`critic_markdown`), from the two CSVs alone."""
    rows, reference = read_rows(csv_path), read_rows(reference_csv)
    if not rows:
        raise ValueError(f"{csv_path}: no fitted-critic rows (run aepo-lite toy-convergence --critic regression)")
    if not reference:
        raise ValueError(f"reference_csv: {reference_csv} holds no true-reward rows to compare with (run aepo-lite "
                         "toy-convergence first)")
    d, stem = Path(figures_dir), Path(csv_path).stem
    pairs = critic_pairs(rows, reference, tol)
    budgets = {p["task"]: p["steps"] for p in pairs}
    text = (f"The fitted critic against the true reward, generated from `{Path(csv_path).name}` and "
            f"`{Path(reference_csv).name}` by `aepo_lite.toy.convergence.render_critic` (do not edit by hand). "
            "Every method's target reads Q from a smooth MLP regressed on the true reward e(x) at the data points "
            "(`critic.kind = regression`), trained `critic steps` steps (`toy2d_critic_steps.md`: its error against "
            "e(x) by that budget), instead of e(x) itself; everything else as in the true-reward rows. Each "
            "task at the smallest budget the true-reward curve shows converged ("
            + ", ".join(f"{t} {n}" for t, n in budgets.items()) + "). Sliced-W2 distance at w = 1 over the noise "
            "floor, the mean over each row's own seeds (the true reward's are every seed run at that budget; "
            "`fitted / true` compares the seeds both have, listed); `/ QGPO`: over QGPO's with the same fitted "
            "critic on the same task; energy error: RMS of f_phi against the exact E_t, mean over t = 0.05, 0.2, 0.5. What "
            "the fitted critic costs is the critic part of the error budget (derivation 6b) end to end. Our "
            "measurement, not the paper's.\n\n" + critic_markdown(rows, reference, tol, pairs))
    paths = [atomic_write_text(d / f"{stem}.md", text), _plot_critic(pairs, d / f"{stem}.png")]
    return [p for p in paths if p is not None]
