"""The result figures: a method keeps one colour in every panel, and the figure has one legend naming each
method once (rendered from the committed CSVs; the figure is captured before it is saved)."""
from collections import defaultdict
from pathlib import Path

import pytest

from aepo_lite.rl import report as rl_report
from aepo_lite.toy import convergence as conv

ROOT = Path(__file__).resolve().parents[1]


def _captured(monkeypatch, module):
    figs = []

    def save(path, fig, **kw):
        figs.append(fig)
        Path(path).write_bytes(b"png")
        return Path(path)

    monkeypatch.setattr(module, "atomic_save_figure", save)
    return figs


def _colours_by_name(fig) -> dict[str, set]:
    out = defaultdict(set)
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[line.get_gid()].add(line.get_color() if isinstance(line.get_color(), str)
                                        else tuple(line.get_color()))
    return out


def test_rl_figure_one_colour_per_row_name_and_one_legend(monkeypatch, tmp_path):
    figs = _captured(monkeypatch, rl_report)
    rl_report.render(ROOT / "figures" / "rl_6c_big.csv", tmp_path)
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 6  # one panel per dataset, in a grid
    colours = _colours_by_name(fig)
    assert "qgpo" in colours and "bc" not in colours
    assert all(len(c) == 1 for c in colours.values()), colours  # a name, one colour, on every panel
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and no two names share one
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == len(set(labels)) and set(colours) <= set(labels) and "bc" in labels
    assert all(ax.get_legend() is None for ax in fig.axes)


def test_convergence_figure_one_colour_per_method_one_style_per_seed(monkeypatch, tmp_path):
    figs = _captured(monkeypatch, conv)
    conv.render(ROOT / "figures" / "toy2d_convergence.csv", tmp_path)
    fig = figs[0]
    by_name = defaultdict(set)
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                method, seed = line.get_gid().rsplit(" s", 1)
                by_name[method].add(tuple(line.get_color()))
                by_name["seed " + seed].add((line.get_linestyle(), line.get_marker()))
    assert by_name and all(len(v) == 1 for v in by_name.values()), by_name
    methods = [k for k in by_name if not k.startswith("seed ")]
    assert len({next(iter(by_name[m])) for m in methods}) == len(methods)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert set(methods) <= set(labels) and {"seed 0", "seed 1", "seed 2"} <= set(labels)


@pytest.mark.parametrize("n_methods", [3, 12])
def test_rl_figure_colours_stay_distinct_with_many_rows(monkeypatch, tmp_path, n_methods):
    import csv
    src = ROOT / "figures" / "rl_6c_big.csv"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["dataset"] == rows[0]["dataset"]]
    base = [r for r in keep if r["method"] == "qgpo"]
    extra = [dict(r, method=f"m{i}") for i in range(n_methods) for r in base]
    out = tmp_path / "many.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep + extra)
    figs = _captured(monkeypatch, rl_report)
    rl_report.render(out, tmp_path / "fig")
    colours = _colours_by_name(figs[0])
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)


def test_support_oracle_figure_has_a_line_per_kind_of_row_and_bc_from_the_sweep(monkeypatch, tmp_path):
    """scripts/support_oracle.py's plot: one line per kind of row (exact Q, noisy rollouts by horizon, wider
    candidates, the data's policy), and BC at its mean over seeds from the larger-energy sweep's CSV, when that
    CSV sits in the figures folder above (recomputed here from the CSV's BC rows)."""
    import csv
    import shutil

    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import render_support_oracle
    figs = _captured(monkeypatch, io)
    (tmp_path / "rl_6c_ln").mkdir()
    shutil.copy(ROOT / "figures" / "rl_6c_ln" / "support_oracle.csv", tmp_path / "rl_6c_ln")
    render_support_oracle(tmp_path / "rl_6c_ln" / "support_oracle.csv", tmp_path)
    (alone,) = figs
    assert not any(str(line.get_gid()).startswith("BC") for line in alone.axes[0].get_lines())
    shutil.copy(ROOT / "figures" / "rl_6c_big.csv", tmp_path)
    render_support_oracle(tmp_path / "rl_6c_ln" / "support_oracle.csv", tmp_path)
    lines = {line.get_gid(): line for line in figs[1].axes[0].get_lines() if line.get_gid()}
    with open(ROOT / "figures" / "rl_6c_big.csv", newline="") as f:
        bc = [float(r["normalized_score"]) for r in csv.DictReader(f)
              if r["dataset"] == "local/hopper/medium-v0" and r["method"] == "bc"]
    (name,) = [g for g in lines if g.startswith("BC (")]
    assert lines[name].get_ydata()[0] == pytest.approx(sum(bc) / len(bc))
    assert {"the data's actions, exact Q to the end", "3x the data's noise, exact Q to the end",
            "the data's policy (N = 1)", "the data's actions, one noisy rollout of 50 steps"} <= set(lines)
    assert len({lines[g].get_color() for g in lines if not g.startswith(("BC", "default"))}) == len(
        [g for g in lines if not g.startswith(("BC", "default"))])


def test_critic_errors_figure_bars_are_the_seeds_means(monkeypatch, tmp_path):
    """scripts/critic_errors.py's plot: a column of panels per run label and critic; the top panel's bars are the
    seeds' mean exact-pick and critic-pick gains of each w and group, the bottom one's the share of right signs,
    recomputed here from the committed CSV; one legend for the figure."""
    import csv
    import shutil
    import statistics

    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import render_critic_errors
    figs = _captured(monkeypatch, io)
    shutil.copy(ROOT / "figures" / "rl_6c_big" / "critic_errors.csv", tmp_path)
    render_critic_errors(tmp_path / "critic_errors.csv", tmp_path)
    (fig,) = figs
    with open(ROOT / "figures" / "rl_6c_big" / "critic_errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mine = [r for r in rows if r["critic"] == "insupport" and r["guidance_scale"] == "10.0" and r["group"] == "spread 3"
            and float(r["continuation_noise"]) == 0]
    assert len(mine) == 2  # seeds 5 and 6
    n = len(fig.axes) // 2  # row-major: gains on top, signs below, a column per run label, critic and reference
    (j,) = [j for j, ax in enumerate(fig.axes[:n]) if "qgpo" in ax.get_title() and "deterministic" in ax.get_title()]
    top, bottom = fig.axes[j], fig.axes[n + j]
    ticks = [t.get_text() for t in top.get_xticklabels()]
    i = ticks.index("w=10\nspread 3")
    exact = [p for p in top.patches if p.get_gid() == "the exact pick"]
    picked = [p for p in top.patches if p.get_gid() == "the critic's pick"]
    assert exact[i].get_height() == pytest.approx(statistics.mean(float(r["oracle_gain"]) for r in mine))
    assert picked[i].get_height() == pytest.approx(statistics.mean(float(r["critic_gain"]) for r in mine))
    assert bottom.patches[i].get_height() == pytest.approx(statistics.mean(float(r["sign_agree"]) for r in mine))
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["the exact pick", "the critic's pick", "a coin (0.5)"]


def _write_csv(path, columns, rows) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def test_critic_budget_figure_lines_are_the_csv(monkeypatch, tmp_path):
    """scripts/critic_budget.py's plot, from a CSV written here: a column per candidate group; on top each variant's
    and w's critic-pick gain against its steps (and the exact pick's, thick grey), below its share of right signs."""
    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import CRITIC_BUDGET_COLUMNS, render_critic_budget
    figs = _captured(monkeypatch, io)
    rows = [dict(dataset="d", run="r", critic="iql", variant=v, seed=5, steps=s, guidance_scale=w, group=g,
                 probes=10, actions=10, true_adv=0.0, critic_adv=0.0, err_rms=0.1, corr=0.1,
                 sign_agree=0.5 + 0.001 * s + 0.1 * w, critic_gain=0.01 * k + 0.0001 * s, oracle_gain=0.05 + 0.01 * w,
                 horizon=300, gamma=0.99, episodes=2)
            for k, v in enumerate(("run", "hidden=8")) for s in (10, 20, 40) for w in (0.0, 1.0)
            for g in ("spread 1", "policy")]
    _write_csv(tmp_path / "critic_budget.csv", CRITIC_BUDGET_COLUMNS, rows)
    render_critic_budget(tmp_path / "critic_budget.csv", tmp_path)
    (fig,) = figs
    assert [ax.get_title() for ax in fig.axes[:2]] == ["policy", "spread 1"]
    top = {line.get_gid(): line for line in fig.axes[1].get_lines() if line.get_gid()}
    bottom = {line.get_gid(): line for line in fig.axes[3].get_lines() if line.get_gid()}
    assert list(top["gain hidden=8 w=1"].get_xdata()) == [10, 20, 40]
    assert list(top["gain hidden=8 w=1"].get_ydata()) == pytest.approx([0.011, 0.012, 0.014])
    assert list(top["best w=1"].get_ydata()) == pytest.approx([0.06] * 3)
    assert list(bottom["sign run w=0"].get_ydata()) == pytest.approx([0.51, 0.52, 0.54])
    assert fig.axes[3].get_xscale() == "log"
    assert (tmp_path / "critic_budget.md").exists()


def test_critic_data_figure_lines_are_the_csv(monkeypatch, tmp_path):
    """scripts/critic_data.py's plot, from a CSV written here: a column per candidate group; per critic (at its
    largest step count) and w the critic's share of right signs (top) and correlation (bottom) against its training
    transitions (log axis); smaller step counts are the table's only."""
    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import CRITIC_DATA_COLUMNS, render_critic_data
    figs = _captured(monkeypatch, io)
    rows = [dict(dataset="d", run="r", critic="iql", variant=f"big:{e}", seed=5, steps=s, guidance_scale=w, group=g,
                 probes=10, actions=10, true_adv=0.0, critic_adv=0.0, err_rms=0.1, corr=0.001 * e + 0.1 * w,
                 sign_agree=0.5 + 0.0001 * s + 0.001 * e, critic_gain=0.01, oracle_gain=0.05, horizon=300, gamma=0.99,
                 episodes=2, train_dataset="big", train_episodes=e, transitions=100 * e)
            for e in (40, 10, 20) for s in (10, 20) for w in (0.0, 1.0) for g in ("spread 1", "policy")]
    _write_csv(tmp_path / "critic_data.csv", CRITIC_DATA_COLUMNS, rows)
    render_critic_data(tmp_path / "critic_data.csv", tmp_path)
    (fig,) = figs
    assert [ax.get_title() for ax in fig.axes[:2]] == ["policy", "spread 1"]
    top = {line.get_gid(): line for line in fig.axes[1].get_lines() if line.get_gid()}
    bottom = {line.get_gid(): line for line in fig.axes[3].get_lines() if line.get_gid()}
    assert list(top["sign iql 20 w=1"].get_xdata()) == [1000, 2000, 4000]
    assert list(top["sign iql 20 w=1"].get_ydata()) == pytest.approx([0.512, 0.522, 0.542])
    assert list(bottom["corr iql 20 w=1"].get_ydata()) == pytest.approx([0.11, 0.12, 0.14])
    assert not any("iql 10" in gid for gid in top) and fig.axes[3].get_xscale() == "log"
    assert "| big | 10 | 1000 | iql | 10 | 0 |" in (tmp_path / "critic_data.md").read_text()
    wide = [dict(r, train_dataset="wide", train_episodes=30, transitions=5000, corr=0.5) for r in rows
            if r["train_episodes"] == 40]  # another training dataset: its own lines, not joined to big's
    _write_csv(tmp_path / "critic_data.csv", CRITIC_DATA_COLUMNS, rows + wide)
    render_critic_data(tmp_path / "critic_data.csv", tmp_path)
    bottom = {line.get_gid(): line for line in figs[-1].axes[3].get_lines() if line.get_gid()}
    assert list(bottom["corr iql 20 w=1 big"].get_xdata()) == [1000, 2000, 4000]
    assert list(bottom["corr iql 20 w=1 wide"].get_xdata()) == [5000]
    assert list(bottom["corr iql 20 w=1 wide"].get_ydata()) == [0.5]


def test_critic_fit_figure_bars_are_the_csv(monkeypatch, tmp_path):
    """scripts/critic_data.py's fit plot, from a CSV written here: per critic and steps a bar per split, the share of
    pairs ordered right (left) and the centered error over the spread (right)."""
    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import CRITIC_FIT_COLUMNS, render_critic_fit
    figs = _captured(monkeypatch, io)
    rows = [dict(run="r", variant=f"v:{c}", critic=c, steps=80, split=sp, episodes=4, states=50, actions=5,
                 exact_spread=0.2, err_rms=0.2 * f, corr=0.1, sign_agree=0.5 + f / 10)
            for c, f in (("exact+4", 0.9), ("exact+4-within10", 0.5)) for sp, f in (("held-out", f), ("train", f / 2))]
    _write_csv(tmp_path / "fit.csv", CRITIC_FIT_COLUMNS, rows)
    render_critic_fit(tmp_path / "fit.csv", tmp_path)
    (fig,) = figs
    left, right = fig.axes[:2]

    def widths(ax, gid):
        return [p.get_width() for p in ax.patches if p.get_gid() == gid]
    assert widths(left, "pairs train") == pytest.approx([0.545, 0.525])  # critics sorted: exact+4 first
    assert widths(left, "pairs held-out") == pytest.approx([0.59, 0.55])
    assert widths(right, "error train") == pytest.approx([0.45, 0.25])
    assert [t.get_text() for t in left.get_yticklabels()] == ["exact+4, 80 steps", "exact+4-within10, 80 steps"]
    table = (tmp_path / "fit.md").read_text()
    assert table.index("| exact+4 | 80 | train |") < table.index("| exact+4 | 80 | held-out |")
    assert "| exact+4-within10 | 80 | held-out | 4 | 50 | 5 | 0.200 | 0.100 | 0.10 | 0.550 |" in table


def test_critic_seeds_figure_lines_are_the_csv(monkeypatch, tmp_path):
    """scripts/critic_seeds.py's plot, from a CSV written here: a panel per candidate group; per w the correlation
    of the mean of n critics against n (log2 axis) and, dashed, the critics' agreement with each other."""
    import aepo_lite._io as io
    from aepo_lite.rl.diagnostics import CRITIC_SEEDS_COLUMNS, render_critic_seeds
    figs = _captured(monkeypatch, io)
    rows = [dict(dataset="d", run="r", critic="iql", steps=40, guidance_scale=w, group=g, members=n, probes=10,
                 actions=10, agree=0.5 + 0.1 * w, alone=0.1, corr=0.1 + 0.01 * n + 0.1 * w, sign_agree=0.5,
                 critic_gain=0.01, oracle_gain=0.05, near_corr=0.3, true_near_corr=0.0, horizon=300, gamma=0.99,
                 episodes=2)
            for w in (0.0, 1.0) for g in ("spread 1", "policy") for n in (4, 1, 2)]
    _write_csv(tmp_path / "critic_seeds.csv", CRITIC_SEEDS_COLUMNS, rows)
    render_critic_seeds(tmp_path / "critic_seeds.csv", tmp_path)
    (fig,) = figs
    assert [ax.get_title() for ax in fig.axes[:2]] == ["policy", "spread 1"]
    lines = {line.get_gid(): line for line in fig.axes[1].get_lines() if line.get_gid()}
    assert list(lines["corr w=1"].get_xdata()) == [1, 2, 4]
    assert list(lines["corr w=1"].get_ydata()) == pytest.approx([0.21, 0.22, 0.24])
    assert list(lines["agree w=0"].get_ydata()) == pytest.approx([0.5] * 3)
    assert fig.axes[0].get_xscale() == "log"
    assert (tmp_path / "critic_seeds.md").exists()
