"""The toy fitted critic by its training budget (``figures/toy2d_critic_steps.{csv,md,png}``).

The fitted-critic rows of the toy comparison (``aepo-lite toy-convergence --critic regression``) read Q from a
smooth MLP regressed on the true reward e(x) at the data points (``critic.kind = "regression"``). How far that
critic is from e(x) is the critic part of the error budget (docs/derivation.md 6b) before any energy is trained:
:func:`measure` trains the critic alone (:func:`aepo_lite.toy.pipeline.train_critic`, the same stage and cache
entry a run trains) for several step counts and records its RMS against e(x) on held-out points of the task.
``scripts/toy_critic_steps.py`` makes the CSV (a rerun skips the rows it has); ``aepo-lite figures`` renders the
table and the figure from it.
"""
from __future__ import annotations

from pathlib import Path

from aepo_lite._io import atomic_save_figure, merge_csv_rows, read_csv_rows, write_table
from aepo_lite.toy import pipeline as P

__all__ = ["COLUMNS", "configs", "measure", "read_rows", "critic_markdown", "render"]

COLUMNS = ("task", "critic_steps", "hidden", "depth", "batch", "lr", "data_seed", "n_data", "heldout_rmse",
           "seconds")  # seconds: the critic's training time
_KEY = ("task", "critic_steps", "hidden", "depth", "batch", "lr", "data_seed", "n_data")
MADE_BY = "python scripts/toy_critic_steps.py"


def configs(tasks, steps, *, preset: str = "full", hidden: int | None = None, device: str = "cpu") -> list:
    """One checked ToyConfig per task and critic step count (the preset's critic, ``hidden`` wide if given)."""
    steps = [int(s) for s in steps]
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"steps: expected positive critic step counts, got {tuple(steps)}")
    over = {"kind": "regression"} if hidden is None else {"kind": "regression", "hidden": hidden}
    return [P.check_config(P.make_config(t, "mse", preset, device=device, critic=dict(over, steps=n)))
            for t in tasks for n in steps]


def _row(cfg, rmse: float, seconds: float) -> dict:
    c = cfg.critic
    return dict(task=cfg.task, critic_steps=c.steps, hidden=c.hidden, depth=c.depth, batch=c.batch, lr=f"{c.lr:g}",
                data_seed=cfg.data_seed, n_data=cfg.n_data, heldout_rmse=f"{rmse:.6f}", seconds=f"{seconds:.2f}")


def read_rows(csv_path) -> list[dict]:
    return read_csv_rows(csv_path, COLUMNS, made_by=MADE_BY)


def measure(cfgs, csv_path, *, cache_dir=None, progress: bool = True) -> list[dict]:
    """Train (or load) each config's critic and merge its row into ``csv_path`` after each one (a config whose row
    the CSV already has is skipped); returns the CSV's rows."""
    have = {tuple(r[k] for k in _KEY) for r in read_rows(csv_path)} if Path(csv_path).exists() else set()
    for cfg in cfgs:
        if tuple(str(_row(cfg, 0.0, 0.0)[k]) for k in _KEY) in have:
            continue
        _, info = P.train_critic(cfg, cache_dir=cache_dir, progress=progress)
        row = _row(cfg, info["heldout_rmse"], info["seconds"])  # its training time, also when loaded from the cache
        merge_csv_rows(csv_path, [row], COLUMNS, _KEY, made_by=MADE_BY,
                       sort_key=lambda r: (r["task"], int(r["hidden"]), int(r["critic_steps"])))
        print(f"{cfg.task} critic.steps={cfg.critic.steps} hidden={cfg.critic.hidden}: held-out RMS "
              f"{info['heldout_rmse']:.4f} ({row['seconds']} s)", flush=True)
    return read_rows(csv_path)


def _curves(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(task, hidden): {critic steps: held-out RMS}}"""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        out.setdefault((r["task"], int(r["hidden"])), {})[int(r["critic_steps"])] = float(r["heldout_rmse"])
    return out


def critic_markdown(rows: list[dict]) -> str:
    curves = _curves(rows)
    steps = sorted({n for c in curves.values() for n in c})
    lines = ["| task | width | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for (task, hidden), c in sorted(curves.items()):
        lines.append(f"| {task} | {hidden} | " + " | ".join(f"{c[n]:.4f}" if n in c else "" for n in steps) + " |")
    return "\n".join(lines) + "\n"


HEADER = ("# The toy fitted critic by its training steps\n\n"
          "Generated from `toy2d_critic_steps.csv` by `aepo_lite.toy.critic_steps.render` (do not edit by hand; the "
          "CSV is made by `python scripts/toy_critic_steps.py`). Each cell: RMS of the fitted critic Q(x) against the "
          "true reward e(x) on 4096 held-out points of the task (the rewards are 0/1 on regions, so the error sits "
          "at their borders), after training the `full` preset's critic (a SiLU MLP of the row's width and the "
          "CSV's depth, batch and learning rate, cosine-decayed to zero over the steps) for that many steps on the "
          "task's training set. Each step count is its own run, not a checkpoint of a longer one. Our measurement "
          "on this CPU, not the paper's.\n\n")


def _plot(rows: list[dict], path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = _curves(rows)
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    tasks = sorted({t for t, _ in curves})
    widths = sorted({h for _, h in curves})
    for (task, hidden), c in sorted(curves.items()):
        n = sorted(c)
        ax.plot(n, [c[k] for k in n], marker="o", ms=3, color=plt.get_cmap("tab10")(tasks.index(task) % 10),
                ls=("-", "--", ":", "-.")[widths.index(hidden) % 4],
                label=task if len(widths) == 1 else f"{task}, width {hidden}", gid=f"{task} {hidden}")
    preset = P.make_config(tasks[0], "mse", "full", critic={"kind": "regression"}).critic.steps
    ax.axvline(preset, color="0.6", ls=":", lw=1, label=f"the full preset's ({preset})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("critic training steps")
    ax.set_ylabel("held-out RMS of Q(x) against e(x)")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.set_title("The toy fitted critic by its training budget", fontsize=9)
    try:
        return atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def render(csv_path, figures_dir) -> list[Path]:
    """``<csv stem>.md`` and ``.png`` from the CSV alone (``aepo-lite figures``)."""
    rows, d, stem = read_rows(csv_path), Path(figures_dir), Path(csv_path).stem
    return write_table(d / f"{stem}.md", rows, HEADER, critic_markdown, csv_path=csv_path,
                       made_by=MADE_BY) + [_plot(rows, d / f"{stem}.png")]
