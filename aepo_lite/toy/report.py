"""Tables, figures and the README section of the toy 2D results, regenerated from
``figures/toy2d_results.csv`` alone (no training).

``render(csv_path, figures_dir)`` writes
  - ``toy2d_table.md``: distance to the exact target vs its noise floor, per task and method
    (mean ± std over seeds) at each beta and guidance scale 1;
  - ``toy2d_estimators.md``: every AEPO estimator measured, ranked by distance / floor;
  - ``toy2d_distance.png``: distance / floor per task and method, one panel per beta;
  - ``toy2d_rows.md``: which rows of the grid exist (tasks, seeds per method, beta and scale).
``update_readme(csv_path, readme_path)`` rewrites the README block between
``<!-- toy:start -->`` and ``<!-- toy:end -->``.

Every row records the settings that change its numbers (:data:`SETTINGS`: the preset, the sample
count ``n_eval``, the sampler's ``sample_steps`` and ``solver``). Rows that differ in any of them
are never merged: ``write_results`` keeps both, and every table and figure is drawn per settings
group (a smoke row never lands in a full-preset table). Build rows with :func:`result_rows`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from aepo_lite._io import atomic_save_figure, atomic_write_text, read_csv_rows, results_lock
from aepo_lite.toy.tasks import FLOOR_PAIRS

__all__ = ["COLUMNS", "SETTINGS", "read_results", "write_results", "result_rows", "done_keys", "config_keys",
           "settings_groups", "summarise", "best_estimator", "render", "update_readme", "plot_run", "reward_scatter",
           "README_START", "README_END"]

# The settings of a run that change its numbers; every row carries them, and rows that differ in
# any of them are never averaged, ranked or replaced together.
SETTINGS = ("preset", "n_eval", "sample_steps", "solver")
COLUMNS = ("task", "method", "estimator", "critic", "beta", "guidance_scale", "seed", "distance", "floor",
           "draws") + SETTINGS
KEY = COLUMNS[:7] + SETTINGS
# distance draws behind a row's distance (their mean); a row or CSV made before the column holds one draw
OPTIONAL = {"draws": 1}
README_START, README_END = "<!-- toy:start -->", "<!-- toy:end -->"
TASK_ORDER = ("swissroll", "8gaussians", "moons", "rings", "checkerboard", "2spirals")
REPORT_SCALE = 1.0  # the guidance scale the tables report (w = 1 is exact when f = E_t)


def _row(r: dict, where: str = "row") -> dict:
    r = dict(OPTIONAL, **r)
    missing = [k for k in COLUMNS if r.get(k) is None or (k in SETTINGS and r.get(k) == "")]
    if missing:
        raise ValueError(f"{where}: lacks {missing}; every row records the settings it was made with "
                         f"({', '.join(SETTINGS)}): build rows with aepo_lite.toy.report.result_rows(metrics, cfg)")
    out = {k: r[k] for k in COLUMNS}
    out["estimator"] = out["estimator"] or ""
    out["critic"] = out["critic"] or "none"  # reward | regression (the fitted critic) | none (bc)
    try:
        for k in ("beta", "guidance_scale", "distance", "floor"):
            out[k] = float(out[k])
        for k in ("seed", "draws", "n_eval", "sample_steps"):
            out[k] = int(out[k])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    out["preset"], out["solver"] = str(out["preset"]), str(out["solver"])
    return out


def read_results(csv_path) -> list[dict]:
    """Rows of the results CSV (numbers parsed). A missing file is an error."""
    rows = read_csv_rows(csv_path, COLUMNS, made_by="`aepo-lite toy-grid`", optional=OPTIONAL,
                         hint=f" (made before every row recorded its settings {list(SETTINGS)}): add them with the "
                              "values its rows were made with")
    return [_row(r, f"{csv_path} line {i + 2}") for i, r in enumerate(rows)]


def _key(r: dict) -> tuple:
    return (r["task"], r["method"], r["estimator"] or "", r.get("critic") or "none", float(r["beta"]),
            float(r["guidance_scale"]), int(r["seed"]), str(r["preset"]), int(r["n_eval"]), int(r["sample_steps"]),
            str(r["solver"]))


def _settings(r: dict) -> tuple:
    return tuple(r[k] for k in SETTINGS)


def _run_settings(cfg) -> dict:
    """The settings columns of a toy run's config (:class:`aepo_lite.config.ToyConfig`)."""
    return {"preset": cfg.preset, "n_eval": cfg.eval.n_samples, "sample_steps": cfg.sampling.steps,
            "solver": cfg.sampling.solver}


def result_rows(results: dict, cfg) -> list[dict]:
    """One run's ``results.json`` and its config -> rows of the results CSV, each with the settings that made it."""
    for k in ("task", "method", "seed"):
        if results[k] != getattr(cfg, k):
            raise ValueError(f"cfg: the results are of {k}={results[k]!r}, the config has {k}={getattr(cfg, k)!r}")
    from aepo_lite.toy.pipeline import draws_of
    keep = ("task", "method", "estimator", "critic", "beta", "seed")
    return [_row(dict({k: results[k] for k in keep}, guidance_scale=r["guidance_scale"], distance=r["distance"],
                      floor=r["floor"], draws=draws_of(r), **_run_settings(cfg)))
            for r in results["results"]]


def config_keys(cfg) -> set:
    """The CSV keys one config's run writes (for skipping configs whose rows exist: see :func:`done_keys`)."""
    from aepo_lite.toy.pipeline import critic_label, estimator
    scales = (0.0,) if cfg.method == "bc" else cfg.sampling.guidance_scales
    st = _run_settings(cfg)
    return {_key(dict(task=cfg.task, method=cfg.method, estimator=estimator(cfg), critic=critic_label(cfg),
                      beta=cfg.energy.beta, guidance_scale=w, seed=cfg.seed, **st)) for w in scales}


def done_keys(csv_path) -> set:
    """Keys of the rows already in the CSV (empty when there is none): a config is done when
    ``config_keys(cfg) <= done_keys(csv)``; a smoke run never counts as a full one."""
    return {_key(r) for r in read_results(csv_path)} if Path(csv_path).exists() else set()


def write_results(csv_path, new_rows: list[dict]) -> list[dict]:
    """Merge ``new_rows`` into the CSV: a row with the same task/method/estimator/critic/beta/scale/seed *and*
    settings is replaced; rows made with other settings (another preset, sample count, sampler) are kept. Read
    and written under a lock: processes that share the CSV keep each other's rows."""
    path = Path(csv_path)
    checked = [_row(r, f"new_rows[{i}]") for i, r in enumerate(new_rows)]  # all checked before the file is read
    with results_lock(path):
        return _merge_results(path, checked)


def _merge_results(path: Path, checked: list[dict]) -> list[dict]:
    rows = {_key(r): r for r in (read_results(path) if path.exists() else [])}
    for r in checked:
        rows[_key(r)] = r
    ordered = sorted(rows.values(), key=lambda r: (_settings(r), _task_rank(r["task"]), r["method"], r["estimator"],
                                                   r["critic"], r["beta"], r["guidance_scale"], r["seed"]))
    lines = [",".join(COLUMNS)]
    for r in ordered:
        lines.append(",".join([r["task"], r["method"], r["estimator"], r["critic"], f"{r['beta']:g}",
                               f"{r['guidance_scale']:g}", str(r["seed"]), f"{r['distance']:.6f}", f"{r['floor']:.6f}",
                               str(r["draws"]), r["preset"], str(r["n_eval"]), str(r["sample_steps"]), r["solver"]]))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return ordered


def settings_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by their settings (``SETTINGS`` values), the full preset first, then by size."""
    g = defaultdict(list)
    for r in rows:
        g[_settings(r)].append(r)
    return dict(sorted(g.items(), key=lambda kv: (kv[0][0] != "full", -len(kv[1]), kv[0])))


def _one_settings(rows: list[dict], what: str) -> None:
    """Refuse to summarise rows made with different settings together."""
    found = {_settings(r) for r in rows}
    if len(found) > 1:
        raise ValueError(f"rows: {what} got rows of {len(found)} different settings "
                         f"({'; '.join(settings_text(st) for st in sorted(found))}); split them with "
                         "settings_groups(rows) and summarise each group on its own")


def settings_text(st: tuple) -> str:
    preset, n_eval, steps, solver = st
    return f"preset {preset}, {n_eval} samples per scale, {solver} sampler with {steps} steps"


def _task_rank(t: str) -> tuple:
    return (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t)


def _label(method: str, estimator: str, critic: str = "reward") -> str:
    """``aepo(gaussian-fit/sampled)``, ``qgpo``, ...; `` [fitted Q]`` when the target read the fitted critic."""
    base = f"aepo({estimator})" if method == "aepo" else method
    return base + (" [fitted Q]" if critic == "regression" else "")


def summarise(rows: list[dict], scale: float = REPORT_SCALE) -> dict:
    """{(beta, task, label): (mean distance, std, mean floor, n seeds, mean ratio distance/floor)} at ``scale``
    (bc rows, sampled at scale 0, are included at every scale). The rows must share their settings."""
    _one_settings(rows, "summarise")
    groups = defaultdict(list)
    for r in rows:
        if r["method"] != "bc" and abs(r["guidance_scale"] - scale) > 1e-9:
            continue
        groups[(r["beta"], r["task"], _label(r["method"], r["estimator"], r["critic"]))].append(r)
    out = {}
    for k, rs in groups.items():
        d = [r["distance"] for r in rs]
        f = [r["floor"] for r in rs]
        m = sum(d) / len(d)
        sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else float("nan")
        out[k] = (m, sd, sum(f) / len(f), len(d), sum(a / b for a, b in zip(d, f)) / len(d))
    return out


def best_estimator(rows: list[dict], beta: float = 10.0, scale: float = REPORT_SCALE):
    """The AEPO estimator with the lowest mean distance/floor over the (task, seed) pairs where every
    ranked estimator was run (a like-for-like comparison). Estimators run on one task only are scored
    on what they have but not ranked.

    Returns (estimator, {estimator: (mean ratio, n tasks, n pairs)}) or (None, {}) without AEPO rows.
    The rows must share their settings (:func:`settings_groups`).
    """
    _one_settings(rows, "best_estimator")
    ratio = defaultdict(dict)  # estimator -> {(task, seed): distance / floor}
    for r in rows:
        if r["method"] == "aepo" and r["beta"] == beta and abs(r["guidance_scale"] - scale) < 1e-9:
            ratio[_label("aepo", r["estimator"], r["critic"])][(r["task"], r["seed"])] = r["distance"] / r["floor"]
    if not ratio:
        return None, {}
    # estimators run on a single task are listed but not ranked, unless none was run on two or more
    ranked = [e for e, v in ratio.items() if len({p[0] for p in v}) >= 2] or list(ratio)
    common = set.intersection(*(set(ratio[e]) for e in ranked))
    score = {}
    for e, v in ratio.items():
        pairs = [p for p in (common or v) if p in v] or list(v)
        score[e] = (sum(v[p] for p in pairs) / len(pairs), len({p[0] for p in pairs}), len(pairs))
    best = min(ranked, key=lambda e: (-score[e][2], score[e][0]))
    return best, score


def _fmt(m, sd, n):
    return f"{m:.3f}" if n < 2 or math.isnan(sd) else f"{m:.3f} ± {sd:.3f}"


def grid_estimator(rows: list[dict], beta: float = 10.0) -> str | None:
    """The AEPO estimator with the most (task, seed) rows at ``beta``: the one the main table reports."""
    _one_settings(rows, "grid_estimator")
    count = defaultdict(set)
    for r in rows:
        if r["method"] == "aepo" and r["beta"] == beta:
            count[_label("aepo", r["estimator"], r["critic"])].add((r["task"], r["seed"]))
    if not count:
        return None
    return max(sorted(count), key=lambda e: len(count[e]))


def _main_labels(rows, beta, default_est):
    labels = []
    main = grid_estimator(rows, beta)
    if main:
        labels.append(main)
    present = {_label(r["method"], r["estimator"], r["critic"]) for r in rows if r["beta"] == beta}
    if default_est and default_est != main and default_est in present:
        labels.append(default_est)
    labels += [_label(m, "", c) for m in ("qgpo", "mse") for c in ("reward", "regression")] + ["bc"]
    return [lab for lab in labels if lab in present]


def table_markdown(rows: list[dict], beta: float, default_est: str | None, scale: float = REPORT_SCALE) -> str:
    """Markdown table at one beta: per task the floor and each method's distance (mean ± std, seeds)."""
    s = summarise(rows, scale)
    labels = _main_labels(rows, beta, default_est)
    tasks = sorted({r["task"] for r in rows if r["beta"] == beta}, key=_task_rank)
    head = "| task | floor | " + " | ".join(labels) + " | AEPO within 2x floor | AEPO < MSE |"
    lines = [head, "|" + "---|" * (len(labels) + 4)]
    n_within = n_below = n_tasks = 0
    # the verdict columns follow the best-ranked estimator (best_estimator) where it is in the table
    aepo = default_est if default_est in labels else (labels[0] if labels and labels[0].startswith("aepo") else None)
    for t in tasks:
        cells, floor = [], None
        for lab in labels:
            v = s.get((beta, t, lab))
            if v is None:
                cells.append("—")
                continue
            floor = v[2] if floor is None else floor
            cells.append(f"{_fmt(v[0], v[1], v[3])} ({v[3]})")
        va, vm = s.get((beta, t, aepo)) if aepo else None, s.get((beta, t, "mse"))
        within = "yes" if va and va[0] <= 2 * va[2] else ("no" if va else "—")
        below = ("yes" if va[0] < vm[0] else "no") if (va and vm) else "—"
        if va:
            n_tasks += 1
            n_within += within == "yes"
            n_below += below == "yes"
        lines.append(f"| {t} | {floor:.3f} | " + " | ".join(cells) + f" | {within} | {below} |"
                     if floor is not None else f"| {t} | — | " + " | ".join(cells) + " | — | — |")
    lines.append("")
    lines.append(f"beta = {beta:g}, guidance scale {scale:g} (bc: scale 0). Cells: sliced Wasserstein-2 distance to "
                 "exact target samples, mean ± std over seeds (number of seeds). floor: the expected distance between two "
                 f"independent exact target sets of the same size (mean over {FLOOR_PAIRS} pairs).")
    if aepo:
        has_mse = any(s.get((beta, t, "mse")) for t in tasks)
        lines.append(f"{aepo}: within 2x of the floor on {n_within} of {n_tasks} tasks; "
                     + (f"below MSE on {n_below} of {n_tasks} tasks." if has_mse else "MSE was not run here."))
    return "\n".join(lines) + "\n"


def estimators_markdown(rows: list[dict], beta: float = 10.0, scale: float = REPORT_SCALE) -> str:
    best, score = best_estimator(rows, beta, scale)
    if not best:
        return "No AEPO rows at this beta.\n"
    s = summarise([r for r in rows if r["method"] == "aepo" and r["beta"] == beta], scale)
    tasks = sorted({k[1] for k in s}, key=_task_rank)
    lines = ["| estimator | mean distance/floor (common runs) | tasks | " + " | ".join(tasks) + " |",
             "|" + "---|" * (len(tasks) + 3)]
    for e in sorted(score, key=lambda e: (-score[e][2], score[e][0])):
        cells = []
        for t in tasks:
            v = s.get((beta, t, e))
            cells.append("—" if v is None else f"{v[4]:.2f} ({v[3]})")
        tag = " (best)" if e == best else (" (fewer runs, not ranked)" if score[e][2] < score[best][2] else "")
        lines.append(f"| {e}{tag} | {score[e][0]:.2f} | {score[e][1]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"beta = {beta:g}, guidance scale {scale:g}: distance / floor (1 = as close as two exact sample sets). "
                 "Task cells: mean over the seeds run (number in brackets). The ranking column is the mean over the "
                 "(task, seed) pairs where every estimator was run, so every estimator is scored on the same runs.")
    return "\n".join(lines) + "\n"


def rows_markdown(rows: list[dict]) -> str:
    """Which rows exist: per (settings, method, estimator, beta, guidance scale) the tasks, seeds and the distance
    draws behind a row (their mean is its distance)."""
    g = defaultdict(lambda: (set(), set(), set()))
    for r in rows:
        k = (r["preset"], r["n_eval"], f"{r['solver']} {r['sample_steps']}",
             _label(r["method"], r["estimator"], r["critic"]), r["beta"], r["guidance_scale"])
        g[k][0].add(r["task"])
        g[k][1].add(r["seed"])
        g[k][2].add(r["draws"])
    lines = ["| preset | samples | sampler, steps | method | beta | guidance scale | tasks | seeds | draws |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (preset, n, smp, lab, b, w), (tasks, seeds, draws) in sorted(g.items(),
                                                                     key=lambda kv: (kv[0][0] != "full", kv[0])):
        lines.append(f"| {preset} | {n} | {smp} | {lab} | {b:g} | {w:g} | {len(tasks)} | "
                     f"{','.join(map(str, sorted(seeds)))} | {','.join(map(str, sorted(draws)))} |")
    return "\n".join(lines) + "\n"


def plot_distances(rows: list[dict], path, default_est: str | None = None, scale: float = REPORT_SCALE) -> Path:
    """distance / floor per task and method: one row of panels per settings group, one panel per beta."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = settings_groups(rows)
    ncol = max(len({r["beta"] for r in rs}) for rs in groups.values())
    fig, axes = plt.subplots(len(groups), ncol, figsize=(5.5 * ncol, 3.8 * len(groups)), squeeze=False)
    for gi, (st, rs) in enumerate(groups.items()):
        betas = sorted({r["beta"] for r in rs})
        s = summarise(rs, scale)
        est = best_estimator(rs)[0] if len(groups) > 1 or default_est is None else default_est
        for ax in axes[gi][len(betas):]:
            ax.axis("off")
        for ax, b in zip(axes[gi], betas):
            labels = _main_labels(rs, b, est)
            tasks = sorted({r["task"] for r in rs if r["beta"] == b}, key=_task_rank)
            width = 0.8 / max(len(labels), 1)
            for i, lab in enumerate(labels):
                ys = [s[(b, t, lab)][4] if (b, t, lab) in s else float("nan") for t in tasks]
                ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=lab)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(2.0, color="k", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, fontsize=8)
            ax.set_title(f"beta = {b:g}, scale {scale:g}" + (f"\n{settings_text(st)}" if len(groups) > 1 else ""),
                         fontsize=10 if len(groups) == 1 else 8)
            ax.set_ylabel("distance / floor")
        axes[gi][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)
    return Path(path)


def render(csv_path="figures/toy2d_results.csv", figures_dir="figures") -> list[Path]:
    """Regenerate every toy table and figure in ``figures_dir`` from the CSV. Returns the paths written.

    Each settings group (preset, samples, sampler) gets its own tables; an empty CSV is an error."""
    rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"csv_path: {csv_path} has no rows: nothing to render (run `aepo-lite toy-grid` first)")
    figures_dir = Path(figures_dir)
    groups = settings_groups(rows)
    tables, ests = [], []
    for st, rs in groups.items():
        best, _ = best_estimator(rs)
        head = f"## {settings_text(st)}\n\n" if len(groups) > 1 else ""
        tail = "" if len(groups) > 1 else f"\nSettings: {settings_text(st)}.\n"
        tables.append(head + "\n".join(f"### beta = {b:g}\n\n" + table_markdown(rs, b, best)
                                       for b in sorted({r["beta"] for r in rs})) + tail)
        ests.append(head + estimators_markdown(rs))
    written = [atomic_write_text(figures_dir / "toy2d_table.md", "\n".join(tables)),
               atomic_write_text(figures_dir / "toy2d_estimators.md", "\n".join(ests)),
               atomic_write_text(figures_dir / "toy2d_rows.md", rows_markdown(rows))]
    first = next(iter(groups.values()))
    written.append(plot_distances(rows, figures_dir / "toy2d_distance.png",
                                  best_estimator(first)[0] if len(groups) == 1 else None))
    return written


def readme_section(rows: list[dict], csv_name: str = "figures/toy2d_results.csv") -> str:
    """The README block, from the main settings group (the full preset when the CSV has it); other
    groups are named, and tabulated in ``figures/toy2d_table.md``, never mixed into this one."""
    groups = settings_groups(rows)
    main_st, rows = next(iter(groups.items()))
    others = [settings_text(st) + f" ({len(rs)} rows)" for st, rs in groups.items() if st != main_st]
    best, score = best_estimator(rows)
    parts = ["## Toy 2D tasks: guidance against the exact target", "",
             f"Generated by `aepo-lite toy-grid` from `{csv_name}` (do not edit by hand). On the six 2D tasks of "
             "the QGPO paper the exact target pi ∝ mu exp(beta e) and the exact intermediate energy E_t are "
             "computable (docs/derivation.md section 6), so every guidance method is measured against the truth: the sliced "
             "Wasserstein-2 distance between guided samples and as many exact target samples (2000 each at the "
             "`full` preset), next to its noise floor (the expected distance between two independent exact sets, "
             f"a mean over {FLOOR_PAIRS} pairs). These are our numbers on our "
             "re-implementation of the tasks, not the paper's.", "",
             f"Settings of every row below: {settings_text(main_st)}."
             + (" Rows made with other settings are in `figures/toy2d_table.md`, not here: " + "; ".join(others) + "."
                if others else ""), ""]
    if best:
        main = grid_estimator(rows)
        parts += [f"**AEPO estimator (posterior covariance - expansion of Q) that measured best: `{best}`**, lowest mean "
                  "distance / floor at beta = 10 and guidance scale 1 over the tasks where every estimator ran "
                  f"({score[best][2]} common run(s) on {score[best][1]} task(s)). "
                  "This choice is ours, measured on these toy tasks; it is not the paper's, which publishes no code. "
                  f"The library's offline-RL default (`aepo_lite.config.EnergyConfig`) is `{_lib_default()}`; the estimator run "
                  f"on the whole grid (every task and seed) is `{main}`.", ""]
        others = sorted(score, key=lambda e: score[e][0])
        parts.append("Estimators measured (mean distance / floor over the common runs): " +
                     ", ".join(f"`{e}` {score[e][0]:.2f}" + (" (fewer runs, not ranked)" if score[e][2] < score[best][2] else "")
                               for e in others) + ". On so few runs, differences of a few "
                     "percent between estimators are within seed noise; see `figures/toy2d_estimators.md`.")
        parts.append("")
    betas = sorted({r["beta"] for r in rows})
    for b in betas:
        parts += [f"### beta = {b:g}", "", table_markdown(rows, b, best)]
    parts += ["**What these numbers are not.** The `full` preset is sized for a shared 2-core CPU (behaviour model "
              "3000 Adam steps, energies 600 steps; QGPO trains its toy models far longer), so no method reaches "
              "the noise floor and the issue's target (AEPO within 2x of the floor on 4 of 6 tasks at beta = 10) "
              "is not met: the table says so instead of tuning the metric. Read the columns against each other and "
              "against bc (the unguided behaviour): a method no closer than bc did not guide. The toy tasks "
              "rescale the published point sets by 1/4 and write the published reward labels as functions of x "
              "(`aepo_lite/toy/tasks.py`). Energies of every method see c_in(t) x_t (the Gaussian posterior-mean "
              "scaling) and AEPO also trains on a quarter of uniform box points; every sample is clipped to the "
              "action box. Speeds: `aepo-lite bench`.", "",
              "Rows present in the CSV (the full grid is 6 tasks x methods x beta in {3, 10, 20} x 3 seeds; "
              "rows not listed were not run):", "", rows_markdown(rows),
              "Figures: `figures/toy2d_distance.png`, tables `figures/toy2d_table.md`, `figures/toy2d_estimators.md`.", ""]
    return "\n".join(parts)


def _lib_default() -> str:
    """The library's (offline-RL) default AEPO estimator, as its RL rows name it (K: the full preset's)."""
    from aepo_lite.course.summary import default_aepo_label
    return default_aepo_label("full")


def update_readme(csv_path="figures/toy2d_results.csv", readme_path="README.md") -> Path:
    """Rewrite the README block between the toy markers from the CSV (creating the block if missing)."""
    rows = read_results(csv_path)
    path = Path(readme_path)
    text = path.read_text() if path.exists() else ""
    block = f"{README_START}\n{readme_section(rows)}\n{README_END}"
    if README_START in text and README_END in text:
        pre, rest = text.split(README_START, 1)
        _, post = rest.split(README_END, 1)
        text = pre + block + post
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    return atomic_write_text(path, text)


def reward_scatter(ax, task, x, title: str | None = None, ticks: bool = True, **title_kw):
    """Points ``x`` (n, 2; a tensor or an array) of a toy ``task`` on ``ax``, coloured by its reward (viridis, 0 to
    1), in the action box at equal aspect, as every toy figure and chapter 2 draw them; ``ticks`` False drops the
    axes' ticks. The scatter, for a colour bar."""
    import torch
    x = torch.as_tensor(x)
    sc = ax.scatter(x[:, 0], x[:, 1], s=2, c=task.reward(x.double()), cmap="viridis", vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title, **title_kw)
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    return sc


def plot_run(models, metrics: dict, samples: dict | None, target, path) -> Path:
    """One run's figure: exact target samples beside the guided samples at each guidance scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from aepo_lite.toy import tasks as toy
    task = toy.get_task(metrics["task"])
    samples = samples or {}
    n = 1 + len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
    reward_scatter(axes[0][0], task, target, f"exact target, beta={metrics['beta']:g}", ticks=False, fontsize=9)
    by_w = {r["guidance_scale"]: r for r in metrics["results"]}
    for ax, (w, xs) in zip(axes[0][1:], samples.items()):
        r = by_w[w]
        reward_scatter(ax, task, xs, f"{_label(metrics['method'], metrics['estimator'], metrics['critic'])} w={w:g}\n"
                       f"SW {r['distance']:.3f} (floor {r['floor']:.3f})", ticks=False, fontsize=9)
    fig.suptitle(metrics["task"], fontsize=10)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)
    plt.close(fig)
    return Path(path)
