"""The offline-RL results: saved runs -> ``figures/rl_results.csv`` -> table, figure, README.

``collect`` reads every ``results.json`` under the given run folders; ``render(csv_path,
figures_dir)`` rebuilds the table (``rl_results.md``) and the figure (``rl_results.png``) from the
CSV alone; ``update_readme`` rewrites the README between ``<!-- rl:start -->`` and ``<!-- rl:end -->``.

CSV columns: dataset, method, seed, guidance_scale, return_mean, normalized_score, transitions,
then every setting that changes a result (:data:`SETTINGS`): preset, episodes, candidates
(best-of-N), guidance_t_max, sample_steps, solver. One row per (run, guidance scale); a
``method=dataset`` row per dataset holds the mean episode return of the data itself (seed,
guidance scale and the evaluation settings empty).

Rows that differ in any setting are never averaged together: the tables and the figure group by
all of them. ``collect`` never replaces saved rows by fewer (``force=True`` to do it on purpose)
and refuses to run on no runs at all.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from aepo_lite._io import atomic_save_figure, atomic_write_csv, atomic_write_text, read_json

__all__ = ["COLUMNS", "SETTINGS", "SPEED_COLUMNS", "collect", "render", "summary_rows", "markdown_table", "reference_returns",
           "speed_table", "check_readme", "update_readme"]

# The settings of an evaluation that change its numbers; every row carries them.
SETTINGS = ["preset", "episodes", "candidates", "guidance_t_max", "sample_steps", "solver"]
COLUMNS = ["dataset", "method", "seed", "guidance_scale", "return_mean", "normalized_score", "transitions"] + SETTINGS
SPEED_COLUMNS = ["dataset", "method", "seed", "preset", "stage", "steps", "seconds", "rate", "unit"] + SETTINGS[1:]
_EVAL_SETTINGS = SETTINGS[1:]  # empty on the dataset row and on training-stage speed rows
START, END = "<!-- rl:start -->", "<!-- rl:end -->"


def _result_files(paths) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"runs: {p} does not exist (give run folders made by `aepo-lite train`, or "
                                    "folders holding them)")
        if p.is_file() and p.name == "results.json":
            out.append(p)
        elif p.is_dir():
            out += sorted(p.rglob("results.json"))
        else:
            raise ValueError(f"runs: {p} is neither a run folder nor a results.json file")
    if not out:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise ValueError(f"runs: no results.json under {where}: evaluate runs first (`aepo-lite train ...`, "
                         "`aepo-lite eval --run DIR`) or give the folders that hold them")
    return out


def _critic_of(res: dict) -> str:
    """The critic a results file's run trained: named in its label (``qgpo+iql``), else the method's default."""
    label, method = str(res["label"]), str(res["method"])
    from aepo_lite.core.critics import CRITICS
    for kind in CRITICS:
        if label.endswith(f"+{kind}"):
            return kind
    from aepo_lite.rl.agent import default_critic
    return default_critic(method)


def _label(label: str, t_max: float, candidates: int, w: float = 1.0, critic: str = "") -> str:
    """The run's label (``aepo(tweedie/sampled)``: it names the AEPO estimator), marked with diagnostics.
    Best-of-N at w = 0 uses no energy: behaviour samples ranked by the run's critic (``bc[best-of-16, iql Q]``,
    docs/derivation.md 6c)."""
    if candidates > 1 and w == 0 and critic:
        return f"bc[best-of-{candidates}, {critic} Q]"
    if t_max < 1.0:
        label += f"[t<={t_max:g}]"
    if candidates > 1:
        label += f"[best-of-{candidates}]"
    return label


def _norm(v) -> str:
    """A cell as a comparable string: numbers by value (``1`` == ``1.0``), empty for None."""
    if v is None or v == "":
        return ""
    try:
        return repr(float(v))
    except (TypeError, ValueError):
        return str(v)


def _row_key(r: dict) -> tuple:
    return tuple(_norm(r.get(k)) for k in ("dataset", "method", "seed", "guidance_scale", *SETTINGS))


def _row_order(r: dict) -> tuple:
    return (r["dataset"], r["preset"], r["method"], str(r["seed"]), str(r["guidance_scale"]),
            *(_norm(r.get(k)) for k in _EVAL_SETTINGS))


def _speed_key(r: dict) -> tuple:
    return tuple(_norm(r.get(k)) for k in ("dataset", "method", "seed", "stage", *SETTINGS))


def _eval_rows(f: Path, res: dict) -> list[tuple[dict, dict]]:
    """(CSV row, speed row) for each evaluation row of the results file ``f``; a row without one of the fields
    ``aepo-lite eval`` writes is an error naming the file and the field."""
    ds, method, seed, preset = res["dataset"], res["label"], res["seed"], res["preset"]
    out = []
    try:
        for r in sorted(res["rows"], key=lambda r: (r["guidance_scale"], r["episodes"], r["candidates"])):
            w = float(r["guidance_scale"])
            st = {"preset": preset, "episodes": int(r["episodes"]), "candidates": int(r["candidates"]),
                  "guidance_t_max": float(r["guidance_t_max"]), "sample_steps": int(r["sample_steps"]),
                  "solver": str(r["solver"])}
            label = _label(method, st["guidance_t_max"], st["candidates"], w, _critic_of(res))
            row = {"dataset": ds, "method": label, "seed": seed, "guidance_scale": w, "return_mean": r["return_mean"],
                   "normalized_score": r["normalized_score_mean"], "transitions": res["transitions"], **st}
            out.append((row, {"dataset": ds, "method": label, "seed": seed, "stage": f"eval w={w:g}",
                              "steps": r["episodes"], "seconds": "", "rate": r.get("actions_per_s"),
                              "unit": "actions/s", **st}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"the field {e}" if isinstance(e, KeyError) else f"usable values ({type(e).__name__}: {e})"
        raise ValueError(f"runs: {f} has an evaluation row without {what}: it is not a results file of `aepo-lite "
                         f"eval` (damaged or edited); re-evaluate the run: aepo-lite eval --run {f.parent}") from None
    return out


def collect(run_paths, csv_path, speed_csv: str | Path | None = None, *, force: bool = False,
            merge: bool = False) -> list[dict]:
    """Write the results CSV (and ``rl_speed.csv`` beside it) from saved runs; returns the rows.

    Raises ``FileNotFoundError``/``ValueError`` (and writes nothing) when a run path is missing, when no
    ``results.json`` is found, when two runs give the same row, or when a CSV already holds rows that the
    runs found would drop (unless ``force``: then the saved rows are replaced on purpose). ``merge`` keeps
    the saved rows the runs do not give (new seeds or scales for runs whose folders are gone); it refuses
    runs that give a saved row, or a dataset's mean return, with another value (a remade dataset that
    differs, or other code). Runs of one dataset id evaluated on different copies of it (another mean return,
    transition count, reference scores or data fingerprint: a dataset remade on another CPU) are refused too:
    their rows would be averaged as one dataset's.
    """
    if force and merge:
        raise ValueError("merge: give merge or force, not both (merge keeps the saved rows, force replaces them)")
    rows, speed, datasets, seen, copies = [], [], {}, {}, {}
    for f in _result_files(run_paths):
        res = read_json(f)
        if "rows" not in res or "label" not in res:
            raise ValueError(f"runs: {f} was written by an older aepo-lite (results keyed by scale only); "
                             f"re-evaluate the run: aepo-lite eval --run {f.parent}")
        try:
            ds, method, seed, preset = res["dataset"], res["label"], res["seed"], res["preset"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"runs: {f} lacks {e} (not a results file of `aepo-lite eval`)") from None
        lo, hi, ret = res.get("ref_min_score"), res.get("ref_max_score"), res.get("dataset_mean_return")
        _same_copy(copies, ds, f, {"mean return": ret, "transitions": res.get("transitions"), "ref_min_score": lo,
                                   "ref_max_score": hi, "data fingerprint": res.get("data_fingerprint")})
        for row, sp in _eval_rows(f, res):
            k = _row_key(row)
            if k in seen:
                raise ValueError(f"runs: {seen[k]} and {f} give the same row ({ds}, {row['method']}, seed {seed}, "
                                 f"guidance scale {row['guidance_scale']:g}, same settings): collect only one of them")
            seen[k] = f
            rows.append(row)
            speed.append(sp)
        ns = None if (lo is None or hi is None or ret is None) else 100.0 * (ret - lo) / (hi - lo)
        datasets[(ds, preset)] = {"dataset": ds, "method": "dataset", "seed": "", "guidance_scale": "",
                                  "return_mean": ret, "normalized_score": ns, "transitions": res["transitions"],
                                  "preset": preset}
        stats_p = f.parent / "train_stats.json"
        if stats_p.exists():
            label = method  # training stages do not depend on the evaluation settings
            for stage, st in read_json(stats_p).items():
                rate, unit = (st.get("steps_per_s"), "steps/s") if "steps_per_s" in st else (st.get("actions_per_s"), "actions/s")
                speed.append({"dataset": ds, "method": label, "seed": seed,
                              "stage": stage + (" (copied)" if "copied_from" in st else ""),
                              "steps": st.get("steps", st.get("rows")), "seconds": st.get("seconds"), "rate": rate,
                              "unit": unit, "preset": preset})
    rows += list(datasets.values())
    rows.sort(key=_row_order)
    speed.sort(key=_speed_key)  # the same runs give the same bytes, in whatever order they were given
    speed_csv = Path(speed_csv) if speed_csv else Path(csv_path).with_name("rl_speed.csv")
    if merge:
        rows = _merged(csv_path, rows, COLUMNS, _row_key, _row_order, same=("return_mean", "transitions"))
        speed = _merged(speed_csv, speed, SPEED_COLUMNS, _speed_key, _speed_key, same=())  # times vary run to run
    # every check before the first write: a refused collection leaves both files as they were
    _refuse_fewer(csv_path, rows, COLUMNS, _row_key, force)
    _refuse_fewer(speed_csv, speed, SPEED_COLUMNS, _speed_key, force)
    _write_csv(csv_path, COLUMNS, rows)
    _write_csv(speed_csv, SPEED_COLUMNS, speed)
    return rows


def _same_copy(copies: dict, ds: str, f: Path, what: dict) -> None:
    """Refuse a run of ``ds`` whose dataset facts ``what`` differ from those of the first run of ``ds`` seen (a
    fact a results file lacks, e.g. the fingerprint before it was recorded, is not compared)."""
    first = copies.setdefault(ds, (f, what))
    for k, v in what.items():
        old = first[1].get(k)
        if v is not None and old is not None and v != old:
            raise ValueError(f"runs: {first[0]} and {f} were evaluated on different copies of {ds} (its {k} {old} "
                             f"there, {v} here): a dataset remade since, or on another CPU, is another dataset; "
                             "collect each copy's runs into its own CSV")


def _merged(path, new_rows: list[dict], cols, key, order, same: tuple) -> list[dict]:
    """``new_rows`` plus the rows saved in ``path`` that they do not give (rows matched by ``key``, sorted by
    ``order``); a saved row given again must hold the same values in the columns ``same``."""
    path = Path(path)
    if not path.exists():
        return new_rows
    given = {key(r): r for r in new_rows}
    kept = []
    for old in _read(path, cols):
        new = given.get(key(old))
        if new is None:
            kept.append(old)
        elif any(_norm(old[c]) != _norm(new.get(c)) for c in same):
            what = "its dataset's mean return" if old["method"] == "dataset" else f"seed {old['seed']} at w = " \
                                                                                 f"{old['guidance_scale']}"
            raise ValueError(f"merge: the runs give {old['dataset']} {old['method']} ({what}) as "
                             f"{new.get('return_mean')} where {path} holds {old['return_mean']}: the runs were not "
                             "made from the same dataset and code as the saved rows; collect them into another CSV")
    out = new_rows + kept
    out.sort(key=order)
    return out


def _refuse_fewer(path, new_rows: list[dict], cols, key, force: bool) -> None:
    """Raise unless every row saved in ``path`` is among ``new_rows`` (or ``force``)."""
    path = Path(path)
    if force or not path.exists():
        return
    old = _read(path, cols)
    new_keys = {key(r) for r in new_rows}
    lost = [r for r in old if key(r) not in new_keys]
    if lost:
        ex = lost[0]
        raise ValueError(
            f"{path} holds {len(old)} rows and the runs found give {len(new_rows)}; {len(lost)} saved rows would be "
            f"lost (e.g. {ex.get('dataset')} {ex.get('method')} seed {ex.get('seed') or '-'}): collect every run folder "
            "the file was made from (see the README block's command), or replace it on purpose with force=True "
            "(aepo-lite rl-results --force)")


def _write_csv(path, cols, rows) -> None:
    atomic_write_csv(path, [{k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows], cols)


def _read(csv_path, cols=COLUMNS) -> list[dict]:
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in cols if c not in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path} is not a readable CSV file ({type(e).__name__}: {e}): it is damaged; restore "
                         "it, or delete it and collect the runs again") from None
    if missing:
        raise ValueError(f"{csv_path} lacks the columns {missing} (made by an older aepo-lite, whose rows did not "
                         "record every setting): add them with the values the rows were made with, or collect the "
                         "runs again")
    short = next((i for i, r in enumerate(rows, 2) if None in r.values() or None in r), None)
    if short is not None:  # csv leaves the cells of a cut row None (and puts extra cells under the key None)
        raise ValueError(f"{csv_path} line {short} does not have the header's {len(cols)}+ cells: the file is cut "
                         "short or damaged; restore it, or delete it and collect the runs again")
    return rows


def _num(x):
    return None if x in ("", None) else float(x)


def _mean_std(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def summary_rows(csv_path) -> list[dict]:
    """Per (dataset, method, guidance scale, settings): mean and std over seeds (sample std).

    Rows that differ in any of :data:`SETTINGS` are separate summaries, never averaged together."""
    groups = defaultdict(list)
    for r in _read(csv_path):
        key = (r["dataset"], r["preset"], r["method"], r["guidance_scale"], *(_norm(r[k]) for k in _EVAL_SETTINGS))
        groups[key].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        ds, preset, m, w = key[:4]
        rets = [float(r["return_mean"]) for r in rs if r["return_mean"] != ""]
        ns = [float(r["normalized_score"]) for r in rs if r["normalized_score"] != ""]
        rm, rsd = _mean_std(rets) if rets else (None, None)
        first = rs[0]
        out.append({"dataset": ds, "preset": preset, "method": m, "guidance_scale": _num(w), "seeds": len(rs),
                    "return_mean": rm, "return_std": rsd,
                    "score_mean": _mean_std(ns)[0] if ns and len(ns) == len(rs) else None,
                    "score_std": _mean_std(ns)[1] if ns and len(ns) == len(rs) else None,
                    "transitions": int(float(first["transitions"])),
                    **{k: first[k] for k in _EVAL_SETTINGS}})
    return out


def _eval_text(r: dict) -> str:
    """The evaluation settings of a summary row, as the tables print them."""
    if r["method"] == "dataset" or r.get("episodes") in ("", None):
        return "—"
    return f"{r['episodes']} ep, {r['solver']} {r['sample_steps']} steps"


def _variant(r: dict) -> tuple:
    return (r["method"], *(_norm(r.get(k)) for k in _EVAL_SETTINGS))


def _fmt(m, s):
    return "n/a" if m is None else f"{m:.1f} ± {s:.1f}"


def reference_returns(csv_path) -> dict:
    """Per (dataset, preset): the returns that score 0 and 100 (the dataset's ``ref_min_score`` and
    ``ref_max_score``: random actions and the expert policy for a ``make-dataset`` set), recovered from the rows
    themselves (every row's score is 100 (return - min) / (max - min)), and the data's own mean return."""
    pts = defaultdict(dict)
    data = {}
    for r in _read(csv_path):
        if r["return_mean"] in ("", None) or r["normalized_score"] in ("", None):
            continue
        key = (r["dataset"], r["preset"])
        ret, score = float(r["return_mean"]), float(r["normalized_score"])
        pts[key][round(ret, 9)] = score
        if r["method"] == "dataset":
            data[key] = (ret, score)
    out = {}
    for key, p in pts.items():
        (r0, s0), (r1, s1) = min(p.items(), key=lambda kv: kv[1]), max(p.items(), key=lambda kv: kv[1])
        if s1 - s0 < 1e-6:
            continue  # one score only: the two references are not determined
        span = 100.0 * (r1 - r0) / (s1 - s0)
        lo = r0 - s0 * span / 100.0
        out[key] = {"random": lo, "expert": lo + span, "data": data.get(key)}
    return out


def _reference_lines(csv_path) -> list[str]:
    refs = reference_returns(csv_path)
    if not refs:
        return []
    lines = ["| dataset | preset | return at score 0 (random) | return at score 100 (expert) | data's mean return (score) |",
             "|---|---|---|---|---|"]
    for (ds, preset), v in sorted(refs.items()):
        d = "n/a" if v["data"] is None else f"{v['data'][0]:.1f} ({v['data'][1]:.1f})"
        lines.append(f"| {ds} | {preset} | {v['random']:.1f} | {v['expert']:.1f} | {d} |")
    return lines + [""]


def at_top_of_sweep(w, scales) -> bool:
    """``w`` is the largest of several positive guidance scales swept (None skipped): a best w there may have its
    optimum beyond the sweep, so the tables and summary lines say so."""
    ws = {x for x in scales if x is not None}
    return w is not None and w > 0 and len(ws) > 1 and w == max(ws)


def markdown_table(csv_path) -> str:
    """Headline table (dataset, BC, best guidance scale per guided method) and the full sweep.

    A method evaluated with other settings (episodes, sampler, best-of-N, guidance cut-off) is its
    own line, with those settings in the ``evaluation`` column."""
    rows = summary_rows(csv_path)
    by_ds = defaultdict(list)
    for r in rows:
        by_ds[(r["dataset"], r["preset"])].append(r)
    lines = _reference_lines(csv_path) + [
        "| dataset | preset | transitions | method | evaluation | guidance scale | seeds | normalised score | return |",
        "|---|---|---|---|---|---|---|---|---|"]
    order = {"dataset": 0, "bc": 1}
    for (ds, preset), rs in sorted(by_ds.items()):
        best, swept = {}, defaultdict(set)
        for r in rs:
            v = _variant(r)
            swept[v].add(r["guidance_scale"])
            key = r["score_mean"] if r["score_mean"] is not None else r["return_mean"]
            cur = best.get(v)
            ck = None if cur is None else (cur["score_mean"] if cur["score_mean"] is not None else cur["return_mean"])
            if cur is None or (key is not None and (ck is None or key > ck)):
                best[v] = r
        for v, r in sorted(best.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0])):
            m = r["method"]
            top = ", the largest swept" if at_top_of_sweep(r["guidance_scale"], swept[v]) else ""
            w = "—" if r["guidance_scale"] is None else f"{r['guidance_scale']:g}" + (f" (best{top})" if m not in order else "")
            seeds = "—" if m == "dataset" else str(r["seeds"])
            lines.append(f"| {ds} | {preset} | {r['transitions']} | {m} | {_eval_text(r)} | {w} | {seeds} | "
                         f"{_fmt(r['score_mean'], r['score_std'])} | {_fmt(r['return_mean'], r['return_std'])} |")
    lines += ["", "Full guidance-scale sweep (mean ± std over seeds):", "",
              "| dataset | preset | method | evaluation | guidance scale | seeds | normalised score | return |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["method"] != "dataset"),
                    key=lambda r: (r["dataset"], r["preset"], _variant(r), r["guidance_scale"])):
        lines.append(f"| {r['dataset']} | {r['preset']} | {r['method']} | {_eval_text(r)} | {r['guidance_scale']:g} | "
                     f"{r['seeds']} | {_fmt(r['score_mean'], r['score_std'])} | {_fmt(r['return_mean'], r['return_std'])} |")
    return "\n".join(lines) + "\n"


def speed_table(speed_csv) -> str:
    """Mean rate over seeds per (dataset, preset, method, stage, evaluation settings) from ``rl_speed.csv``."""
    groups = defaultdict(list)
    for r in _read(speed_csv, SPEED_COLUMNS):
        if r["rate"] in ("", None) or "(copied)" in r["stage"]:
            continue
        is_eval = r["stage"].startswith("eval")
        stage = "eval (all scales)" if is_eval else r["stage"]
        if "[t<=" in r["method"] and not is_eval:
            continue  # a re-evaluated copy: its training rows are the original run's
        ev = (f"{r['solver']} {r['sample_steps']} steps, best-of-{r['candidates']}" if is_eval else "—")
        groups[(r["dataset"], r["preset"], r["method"], stage, ev, r["unit"])].append(float(r["rate"]))
    lines = ["| dataset | preset | method | stage | sampler | rate (mean) | runs x scales |",
             "|---|---|---|---|---|---|---|"]
    for (ds, preset, m, stage, ev, unit), v in sorted(groups.items()):
        lines.append(f"| {ds} | {preset} | {m} | {stage} | {ev} | {sum(v) / len(v):.1f} {unit} | {len(v)} |")
    return "\n".join(lines) + "\n"


def _panel_name(r: dict, many: dict) -> str:
    """A row's name in the figure: its method, with its evaluation settings where one method was evaluated
    several ways on that dataset (``many``: variants per method)."""
    return r["method"] + (f" [{_eval_text(r)}]" if many[r["method"]] > 1 else "")


def render(csv_path, figures_dir) -> list[Path]:
    """Rebuild ``rl_results.md`` and ``rl_results.png`` in ``figures_dir`` from the CSV alone.

    An empty CSV is an error (it would draw an empty table over the saved one)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir = Path(figures_dir)
    rows = summary_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no result rows: nothing to render (collect runs with `aepo-lite rl-results "
                         "--runs DIR ...` first)")
    md = atomic_write_text(figures_dir / "rl_results.md", markdown_table(csv_path))
    keys = sorted({(r["dataset"], r["preset"]) for r in rows})
    cols = min(3, max(1, len(keys)))
    nrows = math.ceil(max(1, len(keys)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows + 1.0), squeeze=False, layout="constrained")
    panels, names = [], {}  # names: one colour per row name in every panel, in the order first drawn
    for ds, preset in keys:
        rs = [r for r in rows if r["dataset"] == ds and r["preset"] == preset]
        many = defaultdict(int)
        for v in sorted({_variant(r) for r in rs}):
            many[v[0]] += 1
        panels.append((ds, preset, rs, many))
        for r in sorted(rs, key=_variant):
            if r["method"] not in ("dataset", "bc"):
                names.setdefault(_panel_name(r, many), len(names))
    palette = ([f"C{i}" for i in range(10) if i != 7] if len(names) <= 9  # C7 (grey) is BC's
               else [plt.get_cmap("tab20")(i) for i in range(20) if i not in (14, 15)]  # tab20's greys: 14, 15
               + [plt.get_cmap("tab20b")(i) for i in range(20)])  # 38 distinct before any repeats
    colour = {n: palette[i % len(palette)] for n, i in names.items()}
    handles: dict = {}
    for ax, (ds, preset, rs, many) in zip(axes.flat, panels):
        use_score = all(r["score_mean"] is not None for r in rs)
        val = (lambda r: (r["score_mean"], r["score_std"])) if use_score else (lambda r: (r["return_mean"], r["return_std"]))
        variants = sorted({_variant(r) for r in rs})
        flat = [v for v in variants if v[0] in ("dataset", "bc") or v[0].startswith("bc[")]  # no w axis: lines
        refs = []
        for r in rs:
            if _variant(r) in flat:
                m, s = val(r)
                n = _panel_name(r, many)
                style = {"dataset": ("--", "k"), "bc": (":", "C7")}.get(r["method"], ("-.", colour.get(n, "C7")))
                label = {"dataset": "the dataset's own episodes", "bc": "bc"}.get(r["method"], n)
                line = ax.axhline(m, ls=style[0], color=style[1])
                line.set_gid(None if r["method"] in ("dataset", "bc") else n)
                handles.setdefault(label, line)
                if r["method"] in ("dataset", "bc"):
                    refs.append(f"{'data' if r['method'] == 'dataset' else 'bc'} {m:.1f}")
        seeds = set()
        for v in (v for v in variants if v not in flat):
            pts = sorted((r for r in rs if _variant(r) == v), key=lambda r: r["guidance_scale"])
            x = [r["guidance_scale"] for r in pts]
            y, e = zip(*[val(r) for r in pts])
            n = _panel_name(pts[0], many)
            h = ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2.5, lw=1.3, color=colour[n])
            h.lines[0].set_gid(n)  # the row's name on its curve (tests read it)
            handles.setdefault(n, h)
            seeds.add(pts[0]["seeds"])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel("normalised score (x100)" if use_score else "return")
        n_seeds = "" if not seeds else f"; {min(seeds)}-{max(seeds)} seeds" if len(seeds) > 1 else f"; {min(seeds)} seeds"
        ax.set_title(f"{ds} [{preset}]\n{', '.join(refs)}{n_seeds}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(handles=list(handles.values()), labels=list(handles), loc="outside lower center",
               ncol=min(len(handles), 2 * cols), fontsize=8, frameon=False)
    png = figures_dir / "rl_results.png"
    atomic_save_figure(png, fig, dpi=110)
    plt.close(fig)
    return [md, png]


def check_readme(readme_path) -> str:
    """The text of a README that :func:`update_readme` can rewrite: a missing one (it is made, holding only the
    block) or one holding the block; else a ``ValueError`` (checked before anything is written)."""
    p = Path(readme_path)
    text = p.read_text() if p.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"readme: {p} has no {START} ... {END} block; add the two markers where the table goes")
    return text


def update_readme(readme_path, csv_path, note: str = "") -> Path:
    """Rewrite the README between the rl markers with the table made from ``csv_path``."""
    p = Path(readme_path)
    text = check_readme(p)
    speed = Path(csv_path).with_name("rl_speed.csv")
    body = _README_HEAD + markdown_table(csv_path) + "\n" + (note + "\n" if note else "")
    if speed.exists():
        body += ("\nSpeed on this CPU (1 thread per run, 3 runs and other jobs sharing 2 cores; "
                 "eval = environment actions per second of sampler time):\n\n" + speed_table(speed))
    body += _README_TAIL
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return atomic_write_text(p, head + START + "\n" + body + END + tail)


_README_HEAD = """## Offline RL (Minari)

Generated by `aepo-lite rl-results --runs runs/bench runs/bench-tcut --readme README.md` from `figures/rl_results.csv`;
do not edit by hand. Figure: `figures/rl_results.png`; stage speeds: `figures/rl_speed.csv`.

"""

_README_TAIL = """
What these numbers are, and are not:

- The dataset `local/hopper/medium-v0` is made here (`aepo-lite make-dataset`, below), not D4RL's
  `hopper-medium-v2`: Hopper-v5, 200k transitions from the first snapshot of a 60k-step TD3 ladder
  (stable-baselines3, update-to-data 1/2, 128x128 nets) that reached a third of the ladder's best
  evaluation return, with N(0, 0.1^2) action noise. `ref_min_score` = uniform random actions,
  `ref_max_score` = the ladder's best snapshot, each over 100 episodes: a weak "expert" (a CPU
  budget, not an expert in D4RL's sense), so these normalised scores are not comparable to D4RL tables.
- The `bench` preset, as it was for this first-round table, is what a shared 2-core CPU afforded (6k behaviour,
  4k critic, 2k energy steps, 64-wide networks, 5 evaluation episodes per seed and scale), not QGPO's settings
  (`full`, docs/derivation.md section 7). Scores are the last checkpoint. With so few episodes and steps the
  seed-to-seed spread is large; read the ± columns before the means.
- The "best" guidance scale is the one with the highest mean over seeds, chosen on the same
  evaluation episodes (as QGPO's sweep does): an optimistic choice, shown beside the whole sweep.
- `aepo(tweedie/first)`, the library default, failed here: the IQL critic is steep in the action
  (median |grad_a Q| about 60 after IQL's reward scaling, which multiplies this narrow dataset's
  rewards by about 4), so the first-order variance term (beta^2/2) g^T S_hat g dwarfs beta Q at
  large t, even with S_hat capped at the box's variance bound (I), and the energy regression does
  not fit (loss ~1e6, targets ~1e3). `aepo(tweedie/sampled)` (a
  log-mean-exp over actions clipped to the box, bounded by beta max Q) and `aepo(none/first)` (no
  variance term) are the same behaviour and critic checkpoints with another energy target.
  Guidance scales of 0.3 and above push every method off the data here; QGPO's published sweep
  (1 to 10) does not transfer to this critic scale.
- Rows marked `[t<=0.5]` are a diagnostic, not a method of the paper: the same checkpoints
  evaluated with guidance switched off for t > 0.5 (`aepo-lite eval --sampling.guidance-t-max 0.5`). AEPO's
  target goes through the Tweedie mean a0_hat = (a_t - sigma eps_theta) / alpha, and at large t
  (alpha(1) = 0.0065) a learned eps_theta's error is multiplied by 1/alpha ~ 150, so the regressed
  energy is steep there. The cut-off was chosen after seeing the failure, on the same episodes.
- Normalised score = 100 (return - ref_min) / (ref_max - ref_min); mean ± sample std over seeds
  of each seed's mean over episodes.

Rebuild the dataset and this table (CPU; about an hour on a lightly loaded 2-core machine). These rows were
made with the `bench` preset as it was then (sampler and support actions: dpmpp2m with 5 and 4 steps; 5
episodes per scale; scales 0.03-3); the preset now samples with 15 steps and evaluates 10 episodes
(docs/derivation.md section 6c), so the flags below restore the earlier settings to reproduce these rows:

```bash
export MINARI_DATASETS_PATH=/path/to/minari   # the dataset and the cached TD3 ladder live here
aepo-lite make-dataset --env Hopper-v5 --quality medium --steps 200000 --name local/hopper/medium-v0
D=local/hopper/medium-v0; R=runs/bench/local_hopper_medium-v0
PREV="--sampling.steps 5 --support.steps 4 --support.k 8 --eval.episodes 5 --eval.envs 5"
for s in 0 1 2; do
  aepo-lite train --dataset $D --method bc --preset bench --seed $s $PREV --out $R/bc-bench-s$s
  aepo-lite train --dataset $D --method qgpo --preset bench --seed $s $PREV --out $R/qgpo-bench-s$s \
    --init-behaviour $R/bc-bench-s$s --sampling.guidance-scales 0.03 0.1 0.3 1 3
  for e in "tweedie first" "tweedie sampled" "none first"; do set -- $e
    aepo-lite train --dataset $D --method aepo --preset bench --seed $s $PREV --energy.covariance $1 \
      --energy.expansion $2 --out $R/aepo-$1-$2-bench-s$s --init-behaviour $R/bc-bench-s$s \
      --sampling.guidance-scales 0.03 0.1 0.3 1 3
    aepo-lite eval --run $R/aepo-$1-$2-bench-s$s --sampling.guidance-scales 0.03 0.1 0.3 1 \
      --sampling.guidance-t-max 0.5   # the [t<=0.5] diagnostic: rows beside the others
  done
  aepo-lite eval --run $R/qgpo-bench-s$s --sampling.guidance-scales 0.03 0.1 0.3 1 --sampling.guidance-t-max 0.5
done
aepo-lite rl-results --runs runs/bench --readme docs/results.md
```

With a GPU and internet, the D4RL-port reproduction at QGPO's settings (docs/derivation.md sections 7-8) is
`aepo-lite train --dataset D4RL/door/human-v2 --method aepo --preset full --device cuda --seed 0`
for each dataset, method and seed; `notebooks/03_d4rl_reproduction.py` lists them all.
"""
