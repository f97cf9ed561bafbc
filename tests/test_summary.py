"""The generated results summary: its numbers come from the CSVs, and it says where AEPO loses."""
from __future__ import annotations

import csv

import pytest

from aepo_lite.course.summary import rl_summary, summary_markdown, toy_summary, update_readme


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def csvs(tmp_path):
    toy = [dict(task=t, method=m, estimator=e, beta=10, guidance_scale=1, seed=s, distance=d + 0.01 * s, floor=0.02)
           for t, scale in (("a", 1.0), ("b", 2.0)) for s in range(3)
           for m, e, d in (("aepo", "x", 0.05 * scale), ("aepo", "y", 0.03 * scale), ("cep", "", 0.04),
                           ("bc", "", 0.5))]
    rl = [dict(dataset="d", method=m, seed=s, guidance_scale=w, return_mean=0, normalized_score=v + s,
               transitions=10, preset="bench")
          for m, w, v in (("bc", 0, 40), ("qgpo", 0.1, 50), ("qgpo", 1, 30), ("aepo(t/s)", 0.1, 10), ("aepo(t/s)", 1, 60))
          for s in range(3)]
    rl.append(dict(dataset="d", method="dataset", seed="", guidance_scale="", return_mean=0, normalized_score=55,
                   transitions=10, preset="bench"))
    _write(tmp_path / "toy.csv", toy)
    _write(tmp_path / "rl.csv", rl)
    return tmp_path / "toy.csv", tmp_path / "rl.csv"


def test_toy_summary_picks_best_estimator_and_ratios(csvs):
    toy = toy_summary(csvs[0])
    assert toy["a"]["best_aepo"] == "aepo[y]" and toy["a"]["winner"] == "aepo[y]"
    assert toy["a"]["aepo_over_qgpo"] == pytest.approx(0.04 / 0.05)  # (0.03 + 0.01) / (0.04 + 0.01)
    assert toy["b"]["winner"] == "qgpo" and toy["b"]["aepo_over_floor"] == pytest.approx(0.07 / 0.02)


def test_rl_summary_best_scale_per_method(csvs):
    r = rl_summary(csvs[1])[("d", "bench")]
    assert r["methods"]["qgpo"]["w"] == 0.1 and r["methods"]["qgpo"]["mean"] == pytest.approx(51)
    assert r["methods"]["aepo(t/s)"]["w"] == 1 and r["methods"]["aepo(t/s)"]["std"] == pytest.approx(1.0)
    assert r["dataset"] == 55


def test_markdown_states_wins_and_losses(csvs, tmp_path):
    md = summary_markdown(*csvs)
    assert "aepo 1/2" in md and "qgpo 1/2" in md and "within 2x of the noise floor on 1/2" in md
    assert "beats behaviour cloning" in md
    both = summary_markdown(*csvs, matched_csv=csvs[0])
    assert "Toy 2D tasks, matched" in both and both.count("aepo 1/2") == 2
    assert "matched" not in summary_markdown(*csvs, matched_csv=tmp_path / "absent.csv")
    readme = tmp_path / "README.md"
    readme.write_text("# T\n<!-- summary:start -->\nold\n<!-- summary:end -->\nrest\n")
    update_readme(readme, *csvs)
    assert "old" not in readme.read_text() and readme.read_text().endswith("<!-- summary:end -->\nrest\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="summary:start"):
        update_readme(readme, *csvs)


def test_long_grid_summary_filters_its_preset_and_picks_each_methods_best_scale(tmp_path, csvs):
    rows = [dict(task="a", method=m, estimator=e, beta=10, guidance_scale=w, seed=s, distance=d, floor=0.02,
                 preset=p)
            for s in range(2) for p in ("long", "full")
            for m, e, w, d in (("aepo", "particles-K256", 1, 0.06), ("aepo", "particles-K256", 2, 0.03),
                               ("qgpo", "", 1, 0.05), ("qgpo", "", 2, 0.08), ("bc", "", 0, 0.5))]
    rows.append(dict(rows[0], preset="full", distance=9.0))  # another preset never enters the long grid's summary
    _write(tmp_path / "conv.csv", rows)
    at1 = toy_summary(tmp_path / "conv.csv", preset="long")
    best = toy_summary(tmp_path / "conv.csv", w=None, preset="long")
    assert at1["a"]["winner"] == "qgpo" and at1["a"]["aepo_over_qgpo"] == pytest.approx(0.06 / 0.05)
    assert best["a"]["winner"] == "aepo[particles-K256]"  # 0.03 at w = 2 against QGPO's best, 0.05 at w = 1
    assert best["a"]["aepo_over_qgpo"] == pytest.approx(0.03 / 0.05)
    text = summary_markdown(*csvs, long_csv=tmp_path / "conv.csv")
    assert "4000-step energy budget" in text and "best w of 0.5 / 1 / 2" in text and "`long` preset" in text


def test_convergence_line_names_the_winner_at_the_largest_budget_and_what_still_improves(tmp_path, csvs):
    from aepo_lite.toy.convergence import COLUMNS
    rows = []
    for task, curves in (("a", {"qgpo": (1.0, 0.5, 0.06), "aepo": (1.0, 0.9, 0.05)}),
                         ("b", {"qgpo": (1.0, 0.95, 0.04), "aepo": (1.0, 0.98, 0.09)})):
        for m, (e1, e2, d) in curves.items():
            for n, err in ((1000, e1), (2000, e2)):
                rows.append({**{c: "" for c in COLUMNS}, "task": task, "method": m, "critic": "reward", "beta": "10",
                             "estimator": "particles-K256" if m == "aepo" else "", "seed": "0", "preset": "full",
                             "energy_steps": n, "err_mean": err, "distance": d, "floor": 0.03})
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert "energy budget 2000 steps (the convergence curve; seed 0;" in text
    assert "aepo 1/2" in text and "qgpo 1/2" in text
    assert "within 1.25x of QGPO/CEP's distance on 1/2 tasks (ratios 0.83-2.25)" in text
    assert "within 2x of the noise floor on 1/2" in text  # 0.05 / 0.03 and 0.09 / 0.03
    assert "Not converged" in text and "qgpo fell by 5% to 50%" in text and "aepo[particles-K256] fell by 2% to 10%" in text
    assert "error (seed 0): aepo" in text


def test_convergence_line_averages_the_seeds_run_at_the_largest_budget(tmp_path, csvs):
    """More seeds at the top budget only (the curve on seed 0): distances and floors are means over seeds, and
    the drops name the seed they were measured on."""
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "task": "a", "critic": "reward", "beta": "10", "preset": "full"}
    rows = [dict(base, method="qgpo", seed="0", energy_steps=1000, err_mean=1.0, distance=0.08, floor=0.02),
            dict(base, method="aepo", estimator="p", seed="0", energy_steps=1000, err_mean=1.0, distance=0.08,
                 floor=0.02)]
    for s, dq, da, fl in (("0", 0.05, 0.03, 0.02), ("1", 0.07, 0.09, 0.04), ("2", 0.06, 0.06, 0.03)):
        rows += [dict(base, method="qgpo", seed=s, energy_steps=2000, err_mean=0.5, distance=dq, floor=fl),
                 dict(base, method="aepo", estimator="p", seed=s, energy_steps=2000, err_mean=0.6, distance=da,
                      floor=fl)]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert "(the convergence curve; seeds 0, 1, 2;" in text and "mean over 3 seeds, `full` preset with energy.steps = 2000" in text
    # AEPO mean 0.06, QGPO mean 0.06, floor mean 0.03: ratio 1.00 to QGPO, exactly 2x the floor
    assert "within 1.25x of QGPO/CEP's distance on 1/1 tasks (ratios 1.00-1.00)" in text
    assert "within 2x of the noise floor on 1/1" in text
    assert "(seed 0): aepo[p] fell by 40%; qgpo fell by 50%" in text  # one task: one number, not "40% to 40%"


def test_protocol_lines_check_the_default_estimator_against_bc_and_qgpo(tmp_path):
    """The 6c target, by hand: the library default's label (read from the config), BC + 5 on every dataset and
    QGPO or better on 2 of 3; a held-out file gets the rows but no target line."""
    from aepo_lite.course.summary import _rl_protocol_lines, default_aepo_label
    lab = default_aepo_label("bench")
    cells = {"d1": {"bc": 50, "qgpo": 60, lab: 61}, "d2": {"bc": 50, "qgpo": 60, lab: 62},
             "d3": {"bc": 50, "qgpo": 70, lab: 56}}
    rows = [{"dataset": f"local/{d}/m-v0", "method": m, "seed": s, "guidance_scale": 0.0 if m == "bc" else 1.0,
             "return_mean": v, "normalized_score": v + s - 1, "preset": "bench", "sample_steps": 15, "episodes": 10}
            for d, ms in cells.items() for m, v in ms.items() for s in range(3)]
    _write(tmp_path / "r.csv", rows)
    lines = _rl_protocol_lines(tmp_path / "r.csv")
    assert len(lines) == 4 and "BC + 5 on 3/3, QGPO or better on 2/3: reached." in lines[-1]
    assert f"{lab}, reaches BC + 5 (+6.0 points) and is below QGPO (-14.0)" in lines[2]
    cells["d3"][lab] = 54.0  # 4 points above BC: one dataset short
    rows = [r if not (r["dataset"] == "local/d3/m-v0" and r["method"] == lab) else dict(r, normalized_score=53 + r["seed"])
            for r in rows]
    _write(tmp_path / "r.csv", rows)
    assert "BC + 5 on 2/3, QGPO or better on 2/3: **not reached**." in _rl_protocol_lines(tmp_path / "r.csv")[-1]
    assert "where some row" not in _rl_protocol_lines(tmp_path / "r.csv")[-1]  # every dataset has room: no view
    # d3 without room (no row 5 above BC): the view names d1 and d2 and counts the default there
    flat = [dict(r, normalized_score=51 + r["seed"]) if r["dataset"] == "local/d3/m-v0" and r["method"] != "bc" else r
            for r in rows]
    _write(tmp_path / "flat.csv", flat)
    assert _rl_protocol_lines(tmp_path / "flat.csv")[-1].endswith(
        "On the 2 datasets where some row reaches BC + 5 (local/d1/m-v0, local/d2/m-v0): BC + 5 on 2/2, "
        "QGPO or better on 2/2.")
    held = _rl_protocol_lines(tmp_path / "r.csv", "held-out", target=False)
    assert len(held) == 3 and all(line.startswith("- **held-out, local/") for line in held)
    # five datasets: 2 of 3 becomes ceil(10 / 3) = 4 of 5 (QGPO or better on d1, d2, d4, d5: reached)
    more = [dict(r, dataset=r["dataset"].replace("d1", d)) for d in ("d4", "d5") for r in rows
            if r["dataset"] == "local/d1/m-v0"]
    fixed = [dict(r, normalized_score=56 + r["seed"]) if r["dataset"] == "local/d3/m-v0" and r["method"] == lab
             else r for r in rows]
    _write(tmp_path / "r5.csv", fixed + more)
    assert _rl_protocol_lines(tmp_path / "r5.csv")[-1].endswith(
        "QGPO on 4 of 5): BC + 5 on 5/5, QGPO or better on 4/5: reached.")


def test_the_layer_norm_critic_sweep_gets_its_own_rows_and_target_line(tmp_path, csvs):
    """rl_6c_ln.csv (the 6c sweep with the LayerNorm critic) is summarised beside rl_6c.csv (the former bench
    critic), each with its own verdict: the same rows in both files give two target lines, each named after its
    critic."""
    from aepo_lite.course.summary import (BIG_ENERGY, BIG_TITLE, LN_CRITIC, LN_TITLE, OLD_CRITIC, OLD_TITLE,
                                          default_aepo_label)
    lab = default_aepo_label("bench", fit="squared")  # the older tables' default: the squared fit, named "then"
    assert lab == "aepo(particles-K8-centered)" and default_aepo_label("bench") == lab[:-1] + "-softmax)"

    def table(label):
        return [{"dataset": "local/d1/m-v0", "method": m, "seed": s, "guidance_scale": 0.0 if m == "bc" else 1.0,
                 "return_mean": v, "normalized_score": v + s, "preset": "bench", "sample_steps": 15, "episodes": 10}
                for m, v in (("bc", 50), ("qgpo", 52), (label, 58)) for s in range(3)]
    rows = table(lab)
    _write(tmp_path / "rl_6c.csv", rows)
    _write(tmp_path / "rl_6c_ln.csv", [dict(r, normalized_score=r["normalized_score"] - 7) if r["method"] == lab
                                       else r for r in rows])
    toy = csvs[0]
    md = summary_markdown(toy, tmp_path / "absent.csv", rl_protocol_csv=tmp_path / "rl_6c.csv",
                          rl_ln_csv=tmp_path / "rl_6c_ln.csv")
    assert f"**{OLD_TITLE}, local/d1/m-v0**" in md and f"**Offline RL target, {OLD_CRITIC}**" in md
    assert "BC + 5 on 1/1, QGPO or better on 1/1: reached." in md.split(LN_TITLE)[0]
    assert f"The default AEPO estimator then, {lab}, reaches BC + 5" in md.split(LN_TITLE)[0]
    assert f"**{LN_TITLE}, local/d1/m-v0**" in md
    assert f"**Offline RL target, {LN_CRITIC}** (the default AEPO estimator" in md
    assert md.split(LN_TITLE)[1].count("BC + 5 on 0/1, QGPO or better on 0/1: **not reached**.") == 1
    assert LN_TITLE not in summary_markdown(toy, tmp_path / "absent.csv", rl_protocol_csv=tmp_path / "rl_6c.csv")
    # the larger energy's table (rl_6c_big.csv) has a third verdict of its own, after the LayerNorm table's
    _write(tmp_path / "rl_6c_big.csv", [dict(r, normalized_score=r["normalized_score"] - 3) if r["method"] == "qgpo"
                                        else r for r in table(default_aepo_label("bench"))])
    md = summary_markdown(toy, tmp_path / "absent.csv", rl_ln_csv=tmp_path / "rl_6c_ln.csv",
                          rl_big_csv=tmp_path / "rl_6c_big.csv")
    # today's table first, the LayerNorm table's verdict folded under it with the other earlier lines
    big_part, ln_part = md.split("<details>")
    assert f"**{BIG_TITLE}, local/d1/m-v0**" in big_part and LN_TITLE not in big_part
    assert "**not reached**" in ln_part and f"**Offline RL target, {BIG_ENERGY}** (the default" in big_part
    assert "qgpo 50.0 +- 1.0" in big_part and "BC + 5 on 1/1, QGPO or better on 1/1: reached." in big_part
    assert f"The default AEPO estimator, {default_aepo_label('bench')}, reaches" in big_part  # today's default
    # the held-out dataset run again at today's preset (rl_6c_heldout_big.csv): its rows name today's default
    # (no "then"), and it has no target line of its own (nothing was tuned on it, it checks the default)
    from aepo_lite.course.summary import HELDOUT_BIG_TITLE
    held = [dict(r, dataset="local/held/m-v0") for r in table(default_aepo_label("bench"))]
    _write(tmp_path / "rl_6c_heldout_big.csv", held)
    md = summary_markdown(toy, tmp_path / "absent.csv", rl_big_csv=tmp_path / "rl_6c_big.csv",
                          rl_heldout_big_csv=tmp_path / "rl_6c_heldout_big.csv")
    big_part, held_part = md.split(f"**{HELDOUT_BIG_TITLE}, local/held/m-v0**")
    assert "Offline RL target" in big_part and "Offline RL target" not in held_part
    assert f"The default AEPO estimator, {default_aepo_label('bench')}, reaches BC + 5 (+8.0 points)" in held_part
    assert "and is at or above QGPO (+6.0)" in held_part and "qgpo 53.0 +- 1.0" in held_part


def test_a_one_seed_probe_is_no_candidate_for_best_estimator(csvs, tmp_path):
    """An AEPO estimator run on fewer seeds than the task's best-covered AEPO row (a one-seed probe) is shown
    but never AEPO's best or the winner: its one lucky seed would pass for a better estimator. The floor is
    the mean over seeds, not over rows, so extra rows of one seed do not tilt it."""
    with open(csvs[0], newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [dict(r, floor=0.01 * (int(r["seed"]) + 1)) for r in rows]  # each seed its own reference sets
    rows.append(dict(rows[0], estimator="probe", seed=0, distance=0.001, floor=0.01))  # task a, seed 0 only
    _write(tmp_path / "probe.csv", rows)
    toy = toy_summary(tmp_path / "probe.csv")
    assert toy["a"]["methods"]["aepo[probe]"] == pytest.approx(0.001)
    assert toy["a"]["best_aepo"] == "aepo[y]" and toy["a"]["winner"] == "aepo[y]"
    assert toy["a"]["floor"] == pytest.approx(0.02)  # over rows it would be 0.25 / 13, tilted to seed 0


@pytest.mark.parametrize("preset,steps", [("xlong", 16000), ("xxlong", 32000)])
def test_long_grids_add_only_their_best_scale_line(tmp_path, csvs, preset, steps):
    # the grid's w = 1 line is the convergence curve's; only each method's best w is added, from its preset
    rows = [dict(task="a", method=m, estimator=e, beta=10, guidance_scale=w, seed=s, distance=d, floor=0.02,
                 preset=p)
            for s in range(3) for p in (preset, "long")
            for m, e, w, d in (("aepo", "particles-K64-centered", 1, 0.05), ("aepo", "particles-K64-centered", 2, 0.07),
                               ("qgpo", "", 1, 0.06), ("qgpo", "", 0.5, 0.045))]
    rows.append(dict(rows[3], preset="long", distance=0.001))  # the long preset's rows are not this grid's
    _write(tmp_path / "grid.csv", rows)
    text = summary_markdown(*csvs, **{f"{preset}_csv": tmp_path / "grid.csv"})
    line = next(ln for ln in text.splitlines() if f"{steps}-step energy budget" in ln)
    assert "best w of 0.5 / 1 / 2" in line and f"`{preset}` preset" in line and "qgpo 1/1" in line
    ratio = next(ln for ln in text.splitlines()[text.splitlines().index(line):] if "1.25x" in ln)
    assert "ratios 1.11-1.11" in ratio  # AEPO's best 0.05 (w = 1) over QGPO's best 0.045 (w = 0.5)
    assert f"{steps}-step" not in summary_markdown(*csvs, **{f"{preset}_csv": tmp_path / "absent.csv"})
    other, o_steps = {"xlong": ("xxlong", 32000), "xxlong": ("xlong", 16000)}[preset]  # nor this preset's rows
    assert (f"at a {o_steps}-step energy budget (true reward for every method): no results yet."
            in summary_markdown(*csvs, **{f"{other}_csv": tmp_path / "grid.csv"}))


def test_convergence_line_stays_at_the_matched_budget_and_names_a_curve_carried_further(tmp_path, csvs):
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "seed": "0",
            "floor": 0.02}
    rows = []
    for task, e4000 in (("a", 0.38), ("b", 0.30)):  # aepo alone at 4000: 5% and 25% below its 2000-step error
        rows += [dict(base, task=task, method="qgpo", energy_steps=n, err_mean=e, distance=0.05)
                 for n, e in ((1000, 1.0), (2000, 0.5))]
        rows += [dict(base, task=task, method="aepo", estimator="p", energy_steps=n, err_mean=e, distance=d)
                 for n, e, d in ((1000, 0.8, 0.05), (2000, 0.4, 0.04), (4000, e4000, 0.01))]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert "energy budget 2000 steps" in text and "ratios 0.80-0.80" in text  # 0.04 / 0.05, not the 4000-step 0.01
    assert ("Carried further, aepo[p] from 2000 to 4000 steps (seed 0 on 2 tasks): its energy error fell by 5% to "
            "25%, by more than 10% on 1 (b seed 0).") in text


def test_convergence_line_names_every_doubling_past_the_matched_budget(tmp_path, csvs):
    # aepo carried two doublings past the matched 2000 on one task: a fall of 25% then a 3% rise, both named
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "seed": "0",
            "floor": 0.02}
    rows = [dict(base, task="a", method="qgpo", energy_steps=n, err_mean=e, distance=0.05)
            for n, e in ((1000, 1.0), (2000, 0.5))]
    rows += [dict(base, task="a", method="aepo", estimator="p", energy_steps=n, err_mean=e, distance=0.04)
             for n, e in ((1000, 0.8), (2000, 0.4), (4000, 0.3), (8000, 0.309))]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert ("Carried further, aepo[p] from 2000 to 4000 steps (seed 0 on a): its energy error fell by 25%, "
            "by more than 10% on 1 (a seed 0). Carried further, aepo[p] from 4000 to 8000 steps (seed 0 on a): its "
            "energy error rose by 3%, by no more than 10% (converged there).") in text


def test_convergence_line_gathers_the_seeds_of_one_doubling(tmp_path, csvs):
    # aepo carried from 2000 to 4000 on task a (seeds 0, 1, 2: 20%, 4%, 30% lower) and on b (seed 0: 2% lower):
    # one sentence for the doubling, the curves by seed, the ones over 10% named with their seeds
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "floor": 0.02}
    rows = []
    for task, seed, e4000 in (("a", "0", 0.32), ("a", "1", 0.384), ("a", "2", 0.28), ("b", "0", 0.392)):
        rows += [dict(base, task=task, seed=seed, method="qgpo", energy_steps=n, err_mean=e, distance=0.05)
                 for n, e in ((1000, 1.0), (2000, 0.5))]
        rows += [dict(base, task=task, seed=seed, method="aepo", estimator="p", energy_steps=n, err_mean=e,
                      distance=0.04) for n, e in ((1000, 0.8), (2000, 0.4), (4000, e4000))]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert text.count("Carried further") == 1
    assert ("Carried further, aepo[p] from 2000 to 4000 steps (seed 0 on b; seeds 0, 1, 2 on a): its energy error "
            "fell by 2% to 30%, by more than 10% on 2 (a seeds 0, 2).") in text


def test_convergence_lines_name_a_rise_as_a_rise(tmp_path, csvs):
    # a curve whose error rose on one task: the words say so instead of "fell by -4%"
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "seed": "0",
            "floor": 0.02}
    rows = []
    for task, e2000, e4000 in (("a", 0.5, 0.475), ("b", 0.3, 0.312)):  # aepo at 4000: 5% lower on a, 4% higher on b
        rows += [dict(base, task=task, method="qgpo", energy_steps=n, err_mean=e, distance=0.05)
                 for n, e in ((1000, 1.0), (2000, 0.5))]
        rows += [dict(base, task=task, method="aepo", estimator="p", energy_steps=n, err_mean=e, distance=0.04)
                 for n, e in ((1000, 0.6 if task == "a" else 0.27), (2000, e2000), (4000, e4000))]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert ("from 2000 to 4000 steps (seed 0 on 2 tasks): its energy error fell by up to 5% (and rose by up to 4% "
            "on another task), by no more than 10% (converged there).") in text
    # 1000 -> 2000: aepo 17% lower on a, 11% higher on b; qgpo 50% lower on both
    assert ("still lowered the energy error (seed 0): aepo[p] fell by up to 17% (and rose by up to 11% on another "
            "task); qgpo fell by 50% (each a task and seed's own curve).") in text
    rows = [r for r in rows if r["task"] == "b"]  # b alone: a rise everywhere
    _write(tmp_path / "b.csv", rows)
    assert "its energy error rose by 4%, by no more than 10%" in summary_markdown(
        *csvs, convergence_csv=tmp_path / "b.csv")
    assert "fell by -" not in text


def test_convergence_lines_keep_the_budget_replicated_on_most_seeds(tmp_path, csvs):
    # three seeds at 2000 steps, seed 0 carried to 4000 by both methods: the 2000-step line (3 seeds) comes first
    # and names what still fell past it; the 4000-step line (1 seed) follows
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "floor": 0.02}
    rows = [dict(base, task="a", method=m, estimator=e, seed=str(s), energy_steps=2000, err_mean=0.5,
                 distance=d + 0.01 * s) for s in range(3) for m, e, d in (("qgpo", "", 0.05), ("aepo", "p", 0.03))]
    rows += [dict(base, task="a", method="qgpo", seed="0", energy_steps=4000, err_mean=0.3, distance=0.01),
             dict(base, task="a", method="aepo", estimator="p", seed="0", energy_steps=4000, err_mean=0.48,
                  distance=0.02)]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    first = text.index("energy budget 2000 steps (the convergence curve; seeds 0, 1, 2")
    assert first < text.index("energy budget 4000 steps (the convergence curve; seed 0;")
    line = text[first:].splitlines()
    assert ("Past 2000 steps (the seeds carried further) the energy error fell by more than 10% on a qgpo (seed 0, "
            "40%).") in line[0]  # aepo's 4% drop is converged
    assert "ratios 0.67-0.67" in line[1]  # mean 0.04 over mean 0.06 at 2000 steps, not seed 0's 0.02 / 0.01 at 4000
    # with one seed everywhere only the top's line is written
    _write(tmp_path / "one.csv", [r for r in rows if r["seed"] == "0"])
    one = summary_markdown(*csvs, convergence_csv=tmp_path / "one.csv")
    assert "energy budget 4000 steps" in one and "energy budget 2000 steps" not in one
    # seeds 1 and 2 carried to 4000 on task a only: 4000 is not replicated on every task, 2000 stays first
    rows = [dict(r, task=t) for r in rows for t in ("a", "b")]
    rows += [dict(r, seed=s) for r in rows if r["task"] == "a" and r["energy_steps"] == 4000 for s in ("1", "2")]
    _write(tmp_path / "part.csv", rows)
    part = summary_markdown(*csvs, convergence_csv=tmp_path / "part.csv")
    assert "energy budget 2000 steps (the convergence curve; seeds 0, 1, 2" in part
    assert part.index("energy budget 2000 steps") < part.index("energy budget 4000 steps (the convergence curve; seeds 0, 1, 2")


def test_seed_counts_are_per_task_and_a_mixed_grid_says_so(tmp_path, csvs):
    # task a has three seeds, task b one: b's row counts one seed and the line names the spread, not "3 seeds"
    rows = [dict(task=t, method=m, estimator="x" if m == "aepo" else "", beta=10, guidance_scale=1, seed=s,
                 distance=0.05, floor=0.02)
            for t, seeds in (("a", range(3)), ("b", [2])) for s in seeds for m in ("aepo", "qgpo")]
    _write(tmp_path / "mixed.csv", rows)
    toy = toy_summary(tmp_path / "mixed.csv")
    assert (toy["a"]["n_seeds"], toy["b"]["n_seeds"]) == (3, 1)
    line = summary_markdown(tmp_path / "mixed.csv", csvs[1]).splitlines()[0]
    assert "mean over 1-3 seeds by task (3 on a)" in line
    assert "mean over 3 seeds" in summary_markdown(*csvs).splitlines()[0]
    # on task b qgpo has seeds 0-2 and aepo seed 2 only: the count is the one both have, and the line names each
    rows += [dict(r, seed=s) for r in rows if r["task"] == "b" and r["method"] == "qgpo" for s in (0, 1)]
    _write(tmp_path / "uneven.csv", rows)
    toy = toy_summary(tmp_path / "uneven.csv")
    assert toy["b"]["n_seeds"] == 1 and toy["b"]["seeds_by_method"] == {"aepo[x]": 1, "qgpo": 3}
    line = summary_markdown(tmp_path / "uneven.csv", csvs[1]).splitlines()[0]
    assert "mean over 1-3 seeds by task (3 on a; b: aepo[x] 1, qgpo 3)" in line


def test_convergence_lines_put_each_task_at_its_smallest_converged_budget(tmp_path, csvs):
    # task a: both methods flat from 2000 (qgpo 4% lower to 4000, aepo 2%); task b: qgpo still 40% lower from 2000
    # to 4000, so b has no converged budget and is named, not counted
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "floor": 0.025}
    rows = []
    for s in range(3):
        for task, qgpo_4000 in (("a", 0.48), ("b", 0.3)):
            rows += [dict(base, task=task, method="qgpo", seed=str(s), energy_steps=n, err_mean=e,
                          distance=d + 0.01 * s) for n, e, d in ((1000, 1.0, 0.2), (2000, 0.5, 0.05),
                                                                   (4000, qgpo_4000, 0.01))]
            rows += [dict(base, task=task, method="aepo", estimator="p", seed=str(s), energy_steps=n, err_mean=e,
                          distance=d + 0.01 * s) for n, e, d in ((1000, 0.8, 0.1), (2000, 0.5, 0.03),
                                                                   (4000, 0.49, 0.5))]
    _write(tmp_path / "conv.csv", rows)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    line = text[text.index("each at the smallest energy budget shown converged"):].splitlines()
    assert line[0].startswith("each at the smallest energy budget shown converged (a 2000 steps;")
    assert ("Not shown converged at any budget measured, so not counted here: b (1 of 2 tasks counted)."
            in line[0])
    # b where it stands at 4000, the largest budget both methods reached there: the seeds' mean distance over the
    # floor (aepo 0.51 / 0.025, qgpo 0.02 / 0.025), said not to be a converged comparison
    assert line[0].endswith(" Where it stands, not a converged comparison: b at its largest matched budget, 4000 "
                            "steps (seeds 0, 1, 2): aepo[p] 20.40x the floor, qgpo 0.80x the floor (AEPO/QGPO 25.50).")
    assert "mean over 3 seeds" in line[0] and "aepo 1/1" in line[0]
    # a at 2000: aepo mean 0.04 over qgpo mean 0.06 and over the floor 0.025 (1.6x); not the 4000-step distances
    assert "on 1/1 tasks (ratios 0.67-0.67) and within 2x of the noise floor on 1/1" in line[1]


def test_fitted_critic_line_gives_each_method_fitted_over_true_and_aepo_over_qgpo(tmp_path, csvs):
    # reference: task a converged from 2000 (both flat past it); fitted rows at a's 2000: qgpo seeds 0-1, aepo seed 0
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "floor": 0.02}
    ref = [dict(base, task="a", method=m, estimator=e, seed=str(s), energy_steps=n, err_mean=err, distance=d)
           for s in range(3) for m, e, d in (("qgpo", "", 0.04), ("aepo", "p", 0.03))
           for n, err in ((1000, 1.0), (2000, 0.5), (4000, 0.49))]
    fit = [dict(base, task="a", method="qgpo", critic="regression", seed="0", energy_steps=2000, err_mean=0.6,
                distance=0.05), dict(base, task="a", method="qgpo", critic="regression", seed="1", energy_steps=2000,
                                     err_mean=0.6, distance=0.06),
           dict(base, task="a", method="aepo", estimator="p", critic="regression", seed="0", energy_steps=2000,
                err_mean=0.6, distance=0.033)]
    fit = [dict(r, critic_steps="1500") for r in fit]
    _write(tmp_path / "conv.csv", ref)
    _write(tmp_path / "crit.csv", fit)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv", convergence_critic_csv=tmp_path / "crit.csv")
    (line,) = [x for x in text.splitlines() if "the fitted critic trained 1500 steps for every method" in x]
    # qgpo: (0.05 + 0.06) / (0.04 + 0.04) = 1.375 on seeds 0-1; aepo: 0.033 / 0.03 = 1.10 on seed 0;
    # AEPO over QGPO, both fitted: (0.033 / 0.02) / (0.055 / 0.02) = 0.60
    assert ("fitted critic over true reward on the same seeds: aepo[p] 1.10 on 1 task (seed 0 on a); qgpo 1.38 on 1 "
            "task (seeds 0, 1 on a); AEPO's best over QGPO, both with the fitted critic: a 0.60 (aepo[p], 1.65x the "
            "floor).") in line
    # without the true-reward curve there is nothing to set the fitted rows beside: no line
    assert "the fitted critic trained" not in summary_markdown(*csvs, convergence_critic_csv=tmp_path / "crit.csv")
    # a second critic budget: a line of its own, QGPO's ratio taken within it
    longer = [dict(fit[0], critic_steps="24000", distance=0.03), dict(fit[2], critic_steps="24000", distance=0.02)]
    _write(tmp_path / "crit.csv", fit + longer)
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv", convergence_critic_csv=tmp_path / "crit.csv")
    lines = [x for x in text.splitlines() if "the fitted critic trained" in x]
    assert len(lines) == 2 and "trained 1500 steps" in lines[0] and line == lines[0]
    assert ("trained 24000 steps for every method" in lines[1] and "aepo[p] 0.67 on 1 task (seed 0 on a); qgpo 0.75 "
            "on 1 task (seed 0 on a); AEPO's best over QGPO, both with the fitted critic: a 0.67 (aepo[p], 1.00x the "
            "floor).") in lines[1]


def test_current_lines_come_first_and_the_earlier_ones_are_folded(tmp_path, csvs):
    """With a result of today's budgets (the convergence curve, the larger-energy sweep, its held-out check) the
    summary opens with it, and every earlier line (the committed grid, the first RL round, the former tables)
    follows inside one closed <details> block, each line once; without one, nothing is folded."""
    from aepo_lite.course.summary import BIG_TITLE, EARLIER, OLD_TITLE, default_aepo_label
    plain = summary_markdown(*csvs)
    assert "<details>" not in plain and plain.startswith("- **Toy 2D tasks, committed grid**")
    label = default_aepo_label("bench")
    rows = [{"dataset": "local/d1/m-v0", "method": m, "seed": s, "guidance_scale": 0.0 if m == "bc" else 1.0,
             "return_mean": v, "normalized_score": v + s, "preset": "bench", "sample_steps": 15, "episodes": 10}
            for m, v in (("bc", 50), ("qgpo", 52), (label, 58)) for s in range(3)]
    _write(tmp_path / "rl_6c_big.csv", rows)
    _write(tmp_path / "rl_6c.csv", rows)
    md = summary_markdown(*csvs, rl_protocol_csv=tmp_path / "rl_6c.csv", rl_big_csv=tmp_path / "rl_6c_big.csv")
    first, rest = md.split(f"<details><summary>{EARLIER}</summary>")
    assert first.lstrip().startswith("**Offline RL at a glance**") and "committed grid" not in first
    assert f"\n- **{BIG_TITLE}, local/d1/m-v0**" in first
    assert OLD_TITLE not in first and f"**{OLD_TITLE}, local/d1/m-v0**" in rest
    assert rest.rstrip().endswith("</details>") and md.count("<details>") == 1
    earlier = [ln for ln in plain.splitlines() if ln.startswith("- ")]
    assert earlier and all(rest.count(ln) == 1 for ln in earlier)  # every earlier line, once, inside the block
    assert "\n\n- **Toy 2D tasks, committed grid**" in rest  # a blank line after <summary>: Markdown inside renders


def test_plateau_line_names_the_part_each_run_is_at_fault_with_means_over_t(tmp_path, csvs):
    from aepo_lite.toy import plateau
    base = dict(method="aepo", critic="reward", beta="10", preset="full", draws="32", target_sd="0.5")
    rows = []
    for t, (f, reg64, tgt64, tgt256) in {"0.05": (0.25, 0.0, 0.24, 0.07), "0.2": (0.01, 0.0, 0.01, 0.008)}.items():
        rows += [dict(base, task="c", estimator="particles-K64-centered", seed="0", energy_steps="256000", k="64", t=t,
                      vs_exact=f, vs_target=reg64, target_bias=tgt64),
                 dict(base, task="c", estimator="particles-K64-centered", seed="0", energy_steps="256000", k="256",
                      t=t, vs_exact=f, vs_target=0.2, target_bias=tgt256),
                 # a run the regression still limits: 0.3 from its target, which is 0.1 from E_t
                 dict(base, task="c", estimator="particles-K256-centered", seed="0", energy_steps="1000", k="256",
                      t=t, vs_exact=0.35, vs_target=0.3, target_bias=0.1),
                 # within 1.25x of each other: neither part named as the larger
                 dict(base, task="c", estimator="particles-K256-centered", seed="0", energy_steps="2000", k="256",
                      t=t, vs_exact=0.2, vs_target=0.11, target_bias=0.1)]
    plateau.write_rows(tmp_path / "p.csv", rows)
    text = summary_markdown(*csvs, plateau_csv=tmp_path / "p.csv")
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Where a toy energy's error comes from**"))
    assert ("c aepo[particles-K64-centered] (reward), seed 0 at 256000 steps: energy error 0.130, its regression "
            "0.000 from its target, the target 0.125 from E_t: mostly its target's own error (the approximation "
            "part: more steps cannot lower it); the same target's own error with K = 256: 0.039") in line
    assert ("c aepo[particles-K256-centered] (reward), seed 0 at 1000 steps: energy error 0.350, its regression "
            "0.300 from its target, the target 0.100 from E_t: mostly the regression") in line
    assert ("seed 0 at 2000 steps: energy error 0.200, its regression 0.110 from its target, the target 0.100 from "
            "E_t: the regression and its target's own error about equally") in line
    assert "plateau" not in summary_markdown(*csvs, plateau_csv=tmp_path / "absent.csv")
    # a row at a time outside the convergence table's error times (0.05, 0.2, 0.5) is not averaged in
    plateau.write_rows(tmp_path / "p.csv", [dict(rows[0], t="0.9", vs_exact=9.0, vs_target=9.0, target_bias=9.0)])
    again = summary_markdown(*csvs, plateau_csv=tmp_path / "p.csv")
    line2 = next(ln for ln in again.splitlines() if ln.startswith("- **Where a toy energy's error comes from**"))
    assert line2 == line and "means over t = 0.05, 0.2, 0.5," in line


def test_oracle_line_says_what_the_support_holds_where_the_default_misses(tmp_path):
    """The support oracle's line: only datasets where the default misses BC + 5, only its exact-Q rows, the best
    in-support score against BC (by hand) and the verdict either way; wider candidates named by their noise ratio."""
    from aepo_lite.course.summary import _oracle_lines, default_aepo_label
    lab = default_aepo_label("bench")
    cells = {"miss": {"bc": 60, lab: 63}, "pass": {"bc": 50, lab: 70}}
    rl = [{"dataset": d, "method": m, "seed": s, "guidance_scale": 0.0 if m == "bc" else 1.0, "return_mean": v,
           "normalized_score": v + s - 1, "preset": "bench", "sample_steps": 15, "episodes": 10}
          for d, ms in cells.items() for m, v in ms.items() for s in range(3)]
    _write(tmp_path / "rl.csv", rl)
    base = dict(snapshot="medium", data_noise=0.1, horizon=1000, gamma=1.0, continuation_noise=0.0,
                continuation_draws=1, episodes=10, return_mean=0, score_std=1, length_mean=100, seconds=1)
    orc = [dict(base, dataset="miss", noise=0.1, candidates=4, score_mean=61.0),
           dict(base, dataset="miss", noise=0.1, candidates=16, score_mean=62.5),
           dict(base, dataset="miss", noise=0.1, candidates=64, score_mean=99.0, continuation_noise=0.1),  # not exact
           dict(base, dataset="miss", noise=0.2, candidates=16, score_mean=66.0),
           dict(base, dataset="pass", noise=0.1, candidates=16, score_mean=51.0)]
    _write(tmp_path / "o.csv", orc)
    (line,) = _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv")
    assert "pass:" not in line and "N = 64" not in line and "99.0" not in line and "whole trajectories" not in line
    assert ("miss: the best of N = 4 / 16 of the data's own actions scores 61.0 / 62.5 against BC's 60.0 (at best "
            "BC +2.5), so one step of improvement within the data's support gives less than BC + 5 there") in line
    assert "candidates with 2x the data's noise (N = 16): 66.0 (BC +6.0); the default scores 63.0 (BC +3.0)." in line
    # the sequence search's rows (the data's noise in every step; a wider one is not in the line), by N
    seq = dict(base, dataset="miss", noise=0.1, continuation_noise=0.1, search="sequence")
    orc_seq = [dict(r, search="step") for r in orc] + [dict(seq, candidates=16, score_mean=63.5),
                                                       dict(seq, candidates=4, score_mean=62.0),
                                                       dict(seq, candidates=8, noise=0.3, score_mean=90.0)]
    _write(tmp_path / "o.csv", orc_seq)
    (line,) = _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv")
    assert ("less than BC + 5 there; searching whole trajectories of the data's policy instead (the best of N = 4 / "
            "16, replanned at every step, the best kept: several steps of improvement, every action one the data's "
            "policy could draw): 62.0 / 63.5 (at best BC +3.5, still under BC + 5); candidates with 2x") in line
    assert "90.0" not in line
    # the data policy's own Q: candidates of the data's noise ranked by the mean of several noisy rollouts, by N
    own = dict(base, dataset="miss", noise=0.1, continuation_noise=0.1, search="step")
    _write(tmp_path / "o.csv", orc_seq + [dict(own, candidates=16, continuation_draws=8, score_mean=61.5),
                                          dict(own, candidates=4, continuation_draws=16, score_mean=60.5),
                                          dict(own, candidates=4, noise=0.3, continuation_draws=16, score_mean=80.0),
                                          dict(own, candidates=16, continuation_draws=4, score_mean=70.0)])  # fewer
    (line,) = _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv")
    assert ("less than BC + 5 there; ranked instead by the data policy's own Q (the mean of 8-16 noisy rollouts a "
            "candidate, N = 4 / 16): 60.5 / 61.5 (at best BC +1.5); searching whole") in line
    assert "80.0" not in line and "99.0" not in line  # wider candidates, or one noisy rollout, are not these
    assert "70.0" not in line  # at one N, the row with the most draws
    orc_seq[-2]["score_mean"] = 65.5
    _write(tmp_path / "o.csv", orc_seq)
    assert "62.0 / 63.5" not in _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv")[0]
    assert "65.5 / 63.5 (at best BC +5.5: BC + 5 lies within the support)" in _oracle_lines(
        tmp_path / "o.csv", tmp_path / "rl.csv")[0]
    orc[1]["score_mean"] = 66.0  # now the support holds BC + 5: the verdict turns
    _write(tmp_path / "o.csv", orc)
    assert "data's support holds BC + 5 there" in _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv")[0]
    cells["miss"][lab] = 66  # the default passes: no line
    _write(tmp_path / "rl.csv", [dict(r, normalized_score=65 + r["seed"]) if r["dataset"] == "miss" and r["method"] == lab
                                 else r for r in rl])
    assert _oracle_lines(tmp_path / "o.csv", tmp_path / "rl.csv") == []


def test_a_best_scale_at_the_top_of_the_sweep_is_named_as_such(tmp_path):
    """Best at the largest swept scale (of several) is flagged in the protocol lines and the RL table, with a
    sentence for the default; best inside the sweep, or a method swept at one scale, is not."""
    from aepo_lite.course.summary import _rl_protocol_lines, default_aepo_label
    from aepo_lite.rl.report import COLUMNS, _write_csv, markdown_table
    lab = default_aepo_label("bench")
    means = {"bc": {0.0: 50}, "qgpo": {1.0: 60, 3.0: 55}, lab: {1.0: 58, 3.0: 62}}  # QGPO peaks inside, AEPO at the top
    rows = [dict(dataset="local/d/m-v0", method=m, seed=s, guidance_scale=w, return_mean=v + s - 1,
                 normalized_score=v + s - 1, transitions=10, preset="bench", episodes=10, candidates=1,
                 guidance_t_max=1.0, sample_steps=15, solver="dpmpp2m")
            for m, by_w in means.items() for w, v in by_w.items() for s in range(3)]
    _write(tmp_path / "r.csv", rows)
    r = rl_summary(tmp_path / "r.csv")[("local/d/m-v0", "bench")]["methods"]
    assert r[lab]["edge"] and r[lab]["w"] == 3.0
    assert not r["qgpo"]["edge"] and not r["bc"]["edge"]  # inside the sweep; one scale only
    line = _rl_protocol_lines(tmp_path / "r.csv")[0]
    assert f"{lab} 62.0 +- 1.0 (w=3, the largest swept)" in line and "qgpo 60.0 +- 1.0 (w=1)" in line
    assert line.endswith("Its best w is the largest swept; larger w is not in this table.")
    _write_csv(tmp_path / "t.csv", COLUMNS, rows)
    table = markdown_table(tmp_path / "t.csv")
    assert f"| {lab} | 10 ep, dpmpp2m 15 steps | 3 (best, the largest swept) |" in table
    assert "| qgpo | 10 ep, dpmpp2m 15 steps | 1 (best) |" in table and "| bc | 10 ep, dpmpp2m 15 steps | 0 |" in table
    # the top scale losing: no flag, no sentence
    _write(tmp_path / "r.csv", [dict(r, normalized_score=r["normalized_score"] - 10) if r["method"] == lab and
                                r["guidance_scale"] == 3.0 else r for r in rows])
    assert "largest swept" not in _rl_protocol_lines(tmp_path / "r.csv")[0]


def test_rl_glance_table_puts_each_method_at_its_best_scale_and_marks_the_defaults_misses(tmp_path):
    """The at-a-glance table, by hand: each method's mean at its own best w, the default's margins over BC and
    QGPO (a miss of BC + 5 or of QGPO in bold), fewer seeds named, the held-out dataset marked."""
    from aepo_lite.course.summary import GAUSSIAN, _rl_glance_lines, default_aepo_label
    lab = default_aepo_label("bench")
    means = {"d1": {"bc": {0.0: 50}, "qgpo": {1.0: 60, 3.0: 54}, lab: {1.0: 58, 3.0: 62}, "mse": {1.0: 51}},
             "d2": {"bc": {0.0: 50}, "qgpo": {1.0: 57}, lab: {1.0: 53, 3.0: 52}, GAUSSIAN: {0.1: 40}}}
    rows = [dict(dataset=f"local/{d}/m-v0", method=m, seed=s, guidance_scale=w, return_mean=0,
                 normalized_score=v + s - 1, preset="bench", sample_steps=15, episodes=10)
            for d, by_m in means.items() for m, by_w in by_m.items() for w, v in by_w.items()
            for s in (range(2) if m == "mse" else range(3))]
    rows.append(dict(rows[0], method="dataset", seed="", guidance_scale="", normalized_score=47.5))
    _write(tmp_path / "r.csv", rows)
    _write(tmp_path / "h.csv", [dict(r, dataset="local/h/m-v0") for r in rows if r["dataset"] == "local/d2/m-v0"])
    lines = _rl_glance_lines(tmp_path / "r.csv", tmp_path / "h.csv")
    table = [ln for ln in lines if ln.startswith("| local/")]
    assert table == [
        "| local/d1/m-v0 | 3 | 47.5 | 50.0 | 50.5 (2 seeds) | 60.0 | — | 62.0 (w=3, the largest swept) | +12.0 | +2.0 |",
        "| local/d2/m-v0 | 3 | — | 50.0 | — | 57.0 | 40.0 | 53.0 (w=1) | **+3.0** (under + 5) | **-4.0** |",
        "| local/h/m-v0 (held out) | 3 | — | 50.0 | — | 57.0 | 40.0 | 53.0 (w=1) | **+3.0** (under + 5) | **-4.0** |"]
    assert lines[0] == "" and lines[-1] == ""  # a table between bullets needs blank lines around it
    assert _rl_glance_lines(tmp_path / "missing.csv") == []


def test_paired_interval_is_the_normal_interval_for_many_seeds_and_refuses_too_few():
    """The bootstrap interval of a mean of paired differences against the closed form it tends to (mean +- 1.96 x
    the population std / sqrt(n)) for 400 seeds; one seed, or a NaN, refused with the argument named."""
    import numpy as np

    from aepo_lite.course.summary import paired_interval
    d = np.random.default_rng(3).normal(3.0, 1.0, 400)
    mean, low, high = paired_interval(d)
    se = d.std() / np.sqrt(len(d))
    assert mean == pytest.approx(d.mean()) and low == pytest.approx(mean - 1.96 * se, abs=0.01)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.01) and paired_interval(d) == (mean, low, high)
    assert paired_interval([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    for bad in ([1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="diffs"):
            paired_interval(bad)


def test_rl_glance_says_whether_a_miss_is_more_than_the_seeds_luck(tmp_path):
    """Under the at-a-glance table, each miss with at least 5 seeds shared: the default (at its best w) minus BC or
    QGPO seed by seed. A gap of exactly 3 on every seed has the interval [3, 3], under BC + 5; a gap that swings
    from -5 to +15 leaves BC + 5 inside it; a miss on 3 seeds, and a dataset that meets both targets, say nothing."""
    from aepo_lite.course.summary import _rl_glance_lines, default_aepo_label
    lab = default_aepo_label("bench")
    gaps = {"steady": [3.0] * 6, "swings": [-5.0, 15.0, 3.0, 0.0, 10.0, -3.0], "few": [3.0] * 3, "met": [8.0] * 6,
            "underq": [8.0] * 5}  # BC + 8, but QGPO 2 higher on every seed
    rows = []
    for d, gap in gaps.items():
        for s, g in enumerate(gap):
            base = dict(dataset=f"local/{d}/m-v0", seed=s, return_mean=0, preset="bench", sample_steps=15, episodes=10)
            rows += [dict(base, method="bc", guidance_scale=0.0, normalized_score=50.0 + s),
                     dict(base, method="qgpo", guidance_scale=1.0, normalized_score=60.0 + s if d == "underq" else 40.0),
                     dict(base, method=lab, guidance_scale=3.0, normalized_score=50.0 + s + g),
                     dict(base, method=lab, guidance_scale=1.0, normalized_score=0.0)]  # not its best w
    _write(tmp_path / "r.csv", rows)
    lines = _rl_glance_lines(tmp_path / "r.csv")
    (said,) = [ln for ln in lines if ln.startswith("**Is a miss")]
    assert "local/steady/m-v0, the default minus BC: +3.0 [+3.0, +3.0] over 6 seeds; BC + 5 lies above the " \
           "interval: more than the seeds' luck" in said
    swing = said.split("local/swings/m-v0, the default minus BC: +3.3 [")[1]
    assert swing.split("]")[1].startswith(" over 6 seeds; BC + 5 lies inside it: the seeds cannot tell;")
    assert "local/underq/m-v0, the default minus QGPO: -2.0 [-2.0, -2.0] over 5 seeds; QGPO lies above the interval" in said
    assert "local/few/" not in said and "local/met/" not in said and "underq/m-v0, the default minus BC" not in said
    assert lines[-1] == ""


def test_energy_or_critic_square_uses_the_seeds_all_four_cells_share(tmp_path):
    """The 2 x 2 of energy by critic, by hand: each cell at its own best w over the seeds all four share (seeds 0
    and 4, run by two cells only, would move every mean by 4 if they were counted), the energy's part and the
    critic's part as differences of cells; a dataset missing a cell is left out."""
    from aepo_lite.course.summary import _square_lines, default_aepo_label
    lab = default_aepo_label("bench")
    cells = {lab: ({1.0: 60, 3.0: 63}, range(5)), lab + "+insupport": ({3.0: 61, 10.0: 64}, (1, 2, 3)),
             "qgpo+iql": ({1.0: 58}, (1, 2, 3)), "qgpo": ({1.0: 62, 3.0: 59}, range(5)), "bc": ({0.0: 50}, range(5))}
    rows = [dict(dataset=d, method=m, seed=s, guidance_scale=w, return_mean=0, preset="bench",
                 normalized_score=v + (10 if s in (0, 4) else s - 2))
            for d in ("local/d1/m-v0", "local/d2/m-v0") for m, (by_w, seeds) in cells.items()
            if not (d == "local/d2/m-v0" and m == "qgpo+iql") for w, v in by_w.items() for s in seeds]
    rows.append(dict(rows[0], method="dataset", seed="", guidance_scale="", normalized_score=47.5))
    _write(tmp_path / "r.csv", rows)
    lines = _square_lines(tmp_path / "r.csv")
    assert lines[0].startswith("**Energy or critic?**") and lines[1] == "" and lines[-1] == ""
    assert [ln for ln in lines if ln.startswith("| local/")] == [
        "| local/d1/m-v0 | 3 | 63.0 (w=3) | 64.0 (w=10) | 58.0 (w=1) | 62.0 (w=1) | +5.0 / +2.0 | +1.0 / +4.0 |"]
    _write(tmp_path / "one.csv", [r for r in rows if r["method"] != "qgpo+iql"])
    assert _square_lines(tmp_path / "one.csv") == []  # no dataset with all four cells: no table


def test_gradient_line_sets_values_beside_gradients_and_the_distance_of_the_same_run(tmp_path, csvs):
    """The plateau CSV's gradient errors at t = 0.2, per task, sorted by gradient error, with the run's energy error
    in values and, where a convergence CSV has the very run (same critic budget, seed, energy steps), its distance
    over the floor; a row of another t, a row of the true reward in the critic's place, or a row without a
    gradient error is not quoted."""
    from aepo_lite.toy import convergence as conv
    from aepo_lite.toy import plateau
    base = dict(method="aepo", estimator="g", critic="regression", beta="10", preset="full", draws="32",
                target_sd="0.5", k="", task="m", energy_steps="1000", vs_target="0.0", target_bias="0.1")
    rows = [dict(base, seed="0", critic_steps="1500", t="0.2", vs_exact="0.098", grad_vs_exact="0.34"),
            dict(base, seed="0", critic_steps="24000", t="0.2", vs_exact="0.134", grad_vs_exact="0.74"),
            dict(base, seed="0", critic_steps="24000", t="0.2", vs_exact="0.134", grad_vs_exact="0.74",
                 target_q="reward", target_bias="0.2"),
            dict(base, seed="0", critic_steps="24000", t="0.05", vs_exact="0.6", grad_vs_exact="0.56"),
            dict(base, seed="1", critic_steps="24000", t="0.2", vs_exact="0.131", grad_vs_exact="0.86"),
            dict(base, task="c", method="qgpo", estimator="", seed="0", critic_steps="24000", t="0.2",
                 vs_exact="0.021", grad_vs_exact="0.07", vs_target="", target_bias="", target_sd="", draws=""),
            dict(base, task="c", seed="0", critic="reward", critic_steps="", t="0.2", vs_exact="0.5",
                 grad_vs_exact="")]  # measured before gradients were: no gradient to quote
    plateau.write_rows(tmp_path / "p.csv", rows)
    conv_row = dict(method="aepo", estimator="g", critic="regression", beta="10", seed="0", preset="full",
                    energy_steps="1000", draws="4", floor="0.013", energy_seconds="1", task="m")
    cr = [dict(conv_row, critic_steps="24000", distance="0.1885"), dict(conv_row, critic_steps="1500",
                                                                       distance="0.0715")]
    cr = [{c: r.get(c, "0.1") for c in conv.COLUMNS} for r in cr]  # the energy errors: not read here
    _write(tmp_path / "critic.csv", cr)
    text = summary_markdown(*csvs, plateau_csv=tmp_path / "p.csv", convergence_critic_csv=tmp_path / "critic.csv")
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Values and gradients of trained toy energies**"))
    assert ("c: qgpo (critic 24000 steps, seed 0) 0.021 / 0.07; m: aepo[g] (critic 1500 steps, seed 0) 0.098 / 0.34 "
            "/ 5.5x, aepo[g] (critic 24000 steps, seed 0) 0.134 / 0.74 / 14.5x, aepo[g] (critic 24000 steps, seed 1) "
            "0.131 / 0.86.") in line
    assert "0.56" not in line and "0.500" not in line and line.count("(critic 24000 steps, seed 0) 0.134") == 1
    # the earlier line keeps to the runs that read the true reward (task c's) and names none of the critic's
    earlier = next(ln for ln in text.splitlines() if ln.startswith("- **Where a toy energy's error comes from**"))
    assert "c aepo[g] (reward), seed 0 at 1000 steps: energy error 0.500" in earlier and "m aepo" not in earlier


def test_toy_glance_table_sets_each_task_at_its_converged_budget_over_the_floor(tmp_path, csvs):
    """The toy table, by hand: each task at its smallest converged budget (b, still falling, left out), each
    method's mean distance over the floor with the closest in bold and fewer seeds named, then AEPO's best over the
    floor and over QGPO with a miss of the toy target (2x the floor; 1.25x QGPO) in bold; first in the summary."""
    from aepo_lite.course.summary import _toy_glance_lines
    from aepo_lite.toy.convergence import COLUMNS
    base = {**{c: "" for c in COLUMNS}, "critic": "reward", "beta": "10", "preset": "full", "floor": 0.025}
    # task: {method: (error at 1000 / 2000 / 4000 steps, distance at 2000 for seed 0; seed s adds 0.01 s)}
    curves = {"a": {("qgpo", ""): ((1.0, 0.5, 0.48), 0.05), ("aepo", "p"): ((0.8, 0.5, 0.49), 0.03),
                    ("aepo", "g"): ((0.8, 0.6, 0.59), 0.09), ("mse", ""): ((1.0, 0.9, 0.9), 0.2)},
              "c": {("qgpo", ""): ((1.0, 0.5, 0.5), 0.03), ("aepo", "p"): ((0.8, 0.5, 0.5), 0.05)},
              "b": {("qgpo", ""): ((1.0, 0.5, 0.3), 0.05), ("aepo", "p"): ((0.8, 0.5, 0.49), 0.03)}}
    rows = [dict(base, task=task, method=m, estimator=e, seed=str(s), energy_steps=n, err_mean=err,
                 distance=(d if n == 2000 else 0.5) + 0.01 * s)
            for task, by_m in curves.items() for (m, e), (errs, d) in by_m.items()
            for s in (range(1) if m == "mse" else range(3)) for n, err in zip((1000, 2000, 4000), errs)]
    _write(tmp_path / "conv.csv", rows)
    lines = _toy_glance_lines(tmp_path / "conv.csv")
    assert lines[0].startswith("**Toy 2D at a glance**") and lines[1] == "" and lines[-1] == ""
    assert lines[2] == ("| task | energy steps | seeds | MSE | QGPO | AEPO g | AEPO p | AEPO best / floor | "
                        "AEPO best / QGPO |")
    # a at 2000: means 0.06 (qgpo), 0.04 (p), 0.10 (g), 0.20 (mse, seed 0 alone) over 0.025; p / qgpo = 0.67
    # c at 2000: qgpo 0.04 (1.60x), p 0.06 (2.40x: over 2x), p / qgpo = 1.50 (over 1.25)
    assert lines[4:-1] == ["| a | 2000 | 3 | 8.00 (1 seed) | 2.40 | 4.00 | **1.60** | 1.60 | 0.67 |",
                           "| c | 2000 | 3 | — | **1.60** | — | 2.40 | **2.40** (over 2x) | **1.50** (over 1.25) |"]
    text = summary_markdown(*csvs, convergence_csv=tmp_path / "conv.csv")
    assert text.startswith("**Toy 2D at a glance**") and "\n| a | 2000 | 3 |" in text
    _write(tmp_path / "none.csv", [dict(r, energy_steps=n) for r, n in zip(rows[:2], (1000, 2000))])
    assert _toy_glance_lines(tmp_path / "none.csv") == []  # no task shown converged: no table
