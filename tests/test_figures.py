"""``aepo-lite figures``: every figure and table in figures/ is rebuilt from the committed results
files alone (nothing trains; its time is printed, not asserted: timing lives in benchmarks), and bad input is reported, not crashed on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aepo_lite.cli import figures as F

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
OLD = 1_000_000_000  # an mtime in 2001: anything rewritten by the command is newer


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "aepo_lite", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_figures_rebuilds_every_figure_and_table_from_committed_results(tmp_path):
    missing = [p.results for p in F.PARTS if not p.optional and not (FIGURES / p.results).is_file()]
    assert not missing, f"results files not committed in figures/: {missing}"
    work = tmp_path / "figures"
    shutil.copytree(FIGURES, work)
    files = [p for p in work.rglob("*") if p.is_file()]  # subfolders too (figures/toy2d_long/)
    results = {str(p.relative_to(work)): p.read_bytes() for p in files if p.suffix not in F.OUTPUT_SUFFIXES}
    outputs = sorted(str(p.relative_to(work)) for p in files if p.suffix in F.OUTPUT_SUFFIXES)
    for p in files:
        os.utime(p, (OLD, OLD))

    t0 = time.perf_counter()
    r = _cli("figures", "--figures-dir", str(work))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, f"aepo-lite figures failed:\n{r.stdout}\n{r.stderr}"
    assert "not made by any renderer" not in r.stderr, r.stderr

    stale = [name for name in outputs if (work / name).stat().st_mtime <= OLD]
    assert not stale, f"committed figures/tables that `aepo-lite figures` did not rewrite: {stale}"
    for part in F.PARTS:
        if part.optional and not list(work.glob(part.results)):
            continue
        assert part.name in r.stdout, f"{part.name} was not rendered:\n{r.stdout}\n{r.stderr}"
    # The results files are inputs: never touched.
    for name, data in results.items():
        assert (work / name).read_bytes() == data, f"aepo-lite figures modified the results file {name}"
    print(f"aepo-lite figures: {elapsed:.1f} s for {len(outputs)} figures/tables")


def test_missing_results_are_named_with_the_command_that_makes_them(tmp_path):
    r = _cli("figures", "--figures-dir", str(tmp_path), timeout=120)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    for part in F.PARTS:
        if not part.optional:
            assert part.results in r.stderr and part.made_by in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_figures_folder_is_an_error(tmp_path):
    r = _cli("figures", "--figures-dir", str(tmp_path / "nope"), timeout=120)
    assert r.returncode == 2 and "is not a folder" in r.stderr, r


def test_a_failing_renderer_is_named_and_the_others_still_render(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.csv").write_text("x\n1\n")

    def good(mod, results, figures_dir):
        out = Path(figures_dir) / "b_table.md"
        out.write_text("| x |\n")
        return [out]

    def bad(mod, results, figures_dir):
        raise ValueError("column 'x' is not numeric")

    parts = (F.Part("part A", "json", "a.csv", "make-a", bad), F.Part("part B", "json", "b.csv", "make-b", good),
             F.Part("part C", "aepo_lite.no_such_report", "b.csv", "make-c", good))
    written, problems = F.render_all(tmp_path, parts)
    assert [p.name for p in written] == ["b_table.md"]
    assert len(problems) == 2
    assert "part A" in problems[0] and "json" in problems[0] and "ValueError" in problems[0]
    assert "not numeric" in problems[0]
    assert "aepo_lite.no_such_report" in problems[1]
    err = capsys.readouterr().err
    assert "part A" in err and "part C" in err


def test_outputs_no_renderer_makes_are_reported(tmp_path):
    made, orphan = tmp_path / "made.png", tmp_path / "orphan.md"
    made.write_bytes(b"x")
    orphan.write_text("x")
    (tmp_path / "results.csv").write_text("x")
    assert F.unmade_outputs(tmp_path, [made]) == [orphan]


@pytest.mark.skipif(not (FIGURES / "closed_form_checks.json").is_file(), reason="closed_form_checks.json not committed")
def test_demo_figure_redraw_refuses_results_of_another_problem(tmp_path):
    import json

    from aepo_lite.course import demo

    rec = json.loads((FIGURES / "closed_form_checks.json").read_text())
    rec["problem"]["beta"] = rec["problem"]["beta"] + 1.0
    (tmp_path / "closed_form_checks.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="different problem"):
        demo.render(tmp_path / "closed_form_checks.json", tmp_path)
    assert not (tmp_path / "closed_form_guidance.png").exists()


def test_figures_redraws_the_demo_figure_byte_for_byte(tmp_path):
    """The demo's figure, and the one ``render`` redraws from the demo's JSON alone, are the same bytes;
    and the JSON holds no timing (a second run writes the same file)."""
    from aepo_lite.course import demo

    a, b = tmp_path / "a", tmp_path / "b"
    demo.run_demo(a, scale="smoke", seed=3, verbose=False)
    png, js = (a / "closed_form_guidance.png").read_bytes(), (a / "closed_form_checks.json").read_bytes()
    assert b"matplotlib" not in png, "the PNG carries a software version"
    b.mkdir()
    shutil.copy(a / "closed_form_checks.json", b)
    assert [p.name for p in demo.render(b / "closed_form_checks.json", b)] == ["closed_form_guidance.png"]
    assert (b / "closed_form_guidance.png").read_bytes() == png
    demo.run_demo(a, scale="smoke", seed=3, verbose=False)
    assert (a / "closed_form_checks.json").read_bytes() == js
    assert (a / "closed_form_guidance.png").read_bytes() == png
    # and the seed matters (the check above could not pass with a figure that ignores its data)
    demo.run_demo(b, scale="smoke", seed=4, verbose=False)
    assert (b / "closed_form_guidance.png").read_bytes() != png


def _scratch_repository(dst: Path) -> Path:
    """The working tree as git sees it (tracked, and untracked but not ignored), committed in a new
    repository: ``git status`` there shows exactly what a command changed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch"]):
        subprocess.run(git + cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_make_run_and_figures_leave_the_tree_clean(tmp_path):
    """What ``make run`` runs (``aepo-lite demo --out figures``) and ``aepo-lite figures``, in a copy of
    the repository: afterwards ``git status`` shows nothing changed (results, figures, tables)."""
    repo = _scratch_repository(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for args in (["demo", "--out", "figures"], ["figures"]):
        r = subprocess.run([sys.executable, "-m", "aepo_lite", *args], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"aepo-lite {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout
        assert status == "", f"aepo-lite {' '.join(args)} changed the repository:\n{status}"


def test_support_spread_table_averages_each_policy_and_scale_over_its_seeds():
    """scripts/support_spread.py's table, by hand: the data's row first, then one line per policy and w with the
    seeds' runs averaged (steps summed, the score's std over seeds)."""
    from aepo_lite.rl.diagnostics import support_spread_table
    base = dict(dataset="local/h/m-v0", episodes=10, noise=0.1, score_std=1.0)
    rows = [dict(base, run="", label="data", seed="", guidance_scale="", episodes=50, steps=900, z_rms=0.84,
                 beyond3=0.006, score_mean=60.9),
            dict(base, run="r5", label="aepo(x)", seed=5, guidance_scale=10.0, steps=100, z_rms=4.0, beyond3=0.6,
                 score_mean=64.0),
            dict(base, run="r8", label="aepo(x)", seed=8, guidance_scale=10.0, steps=120, z_rms=5.0, beyond3=0.7,
                 score_mean=66.0),
            dict(base, run="r5", label="aepo(x)", seed=5, guidance_scale=0.0, steps=110, z_rms=1.5, beyond3=0.15,
                 score_mean=61.0),
            dict(base, run="b5", label="bc", seed=5, guidance_scale=0.0, steps=105, z_rms=1.4, beyond3=0.1,
                 score_mean=61.5)]
    lines = support_spread_table(rows).splitlines()[2:]
    assert lines == ["| local/h/m-v0 | data | — | — | 50 | 900 | 0.84 | 0.6% | 60.9 |",
                     "| local/h/m-v0 | aepo(x) | 0 | 5 | 10 | 110 | 1.50 | 15.0% | 61.0 |",
                     "| local/h/m-v0 | aepo(x) | 10 | 5, 8 | 10 | 220 | 4.50 | 65.0% | 65.0 +- 1.4 |",
                     "| local/h/m-v0 | bc | 0 | 5 | 10 | 105 | 1.40 | 10.0% | 61.5 |"]


def test_support_oracle_parts_join_into_the_row_of_one_process_and_nothing_else_joins():
    """scripts/support_oracle.py --first-episode parts: parts of equal settings holding episodes 0..n-1 once each
    become one row (by hand: mean and ddof-0 std of the scores, episode-weighted return and length, seconds
    summed); a gap, an overlap, a part without its scores or another setting stays as it is."""
    import numpy as np
    from aepo_lite.rl.diagnostics import join_oracle_parts, support_oracle_table
    base = dict(dataset="local/h/m-v0", snapshot="medium", search="step", noise=0.1, data_noise=0.1, candidates=256,
                horizon=1000, gamma=1.0, continuation_noise=0.1, continuation_draws=16)

    def part(first, scores, ret, length, sec, **kw):
        return dict(base, first_episode=first, episodes=len(scores), episode_scores=" ".join(map(str, scores)),
                    score_mean=float(np.mean(scores)), score_std=float(np.std(scores)), return_mean=ret,
                    length_mean=length, seconds=sec, **kw)
    a, b, c = part(0, [64.0], 280.0, 130.0, 4000.0), part(1, [66.0, 70.0], 290.0, 134.0, 8100.0), \
        part(2, [61.0], 270.0, 120.0, 10.0)
    other = part(1, [60.0], 260.0, 125.0, 5.0, candidates=64)
    (j, o) = join_oracle_parts([b, other, a])
    assert o is other and j["episodes"] == 3 and j["first_episode"] == 0 and j["candidates"] == 256
    assert j["episode_scores"] == "64.000000 66.000000 70.000000"
    assert j["score_mean"] == 200 / 3 and j["score_std"] == np.std([64.0, 66.0, 70.0])
    assert j["return_mean"] == (280 + 2 * 290) / 3 and j["length_mean"] == (130 + 2 * 134) / 3
    assert j["seconds"] == 12100.0
    assert "| 3 | 286.7 | 66.7 +- 2.5 | 133 | 12100 |" in support_oracle_table([j])
    for rows in ([a, c], [b, c], [a, b, c], [a, dict(b, episode_scores="")], [a, dict(b, noise=0.3)]):
        assert join_oracle_parts(rows) == rows  # a gap, no episode 0, an overlap, scores missing, other settings
    assert "| 2 (from 1) |" in support_oracle_table([b]) and "| 1 |" in support_oracle_table([a])


def test_critic_errors_table_averages_each_group_over_its_seeds():
    """scripts/critic_errors.py's table, by hand: one line per run label, critic, w and group, the policy's own
    action first, the seeds' runs averaged (probes summed)."""
    from aepo_lite.rl.diagnostics import critic_errors_table
    base = dict(dataset="local/h/m-v0", label="aepo(x)", critic="iql", guidance_scale=10.0, actions=1, noise=0.1,
                horizon=300, gamma=0.99, continuation_noise=0.0, rollouts=1, episodes=3, seconds=1.0)
    def row(seed, group, probes, z, t, c, s):
        return dict(base, run=f"r{seed}", seed=seed, group=group, probes=probes, z_rms=z, true_adv=t, critic_adv=c,
                    err_rms=abs(c - t), corr=0.5, sign_agree=s, critic_gain=t / 2, oracle_gain=t)
    rows = [row(5, "spread 3", 40, 3.0, -2.0, 1.0, 0.4), row(5, "policy", 40, 4.0, 1.0, 3.0, 0.7),
            row(8, "policy", 30, 5.0, 2.0, 4.0, 0.9), row(8, "spread 3", 30, 2.8, -1.0, 2.0, 0.6),
            row(5, "spread 1", 40, 1.0, 0.5, 0.5, 0.5)]
    noisy = dict(row(5, "spread 1", 40, 1.0, 0.1, 0.2, 0.6), continuation_noise=0.1, rollouts=8)
    lines = critic_errors_table(rows + [noisy]).splitlines()[2:]
    assert lines == [
        "| local/h/m-v0 | aepo(x) | iql | deterministic | 10 | policy | 5, 8 | 70 | 4.50 | 1.500 | 3.500 | 2.000 | 0.50 | 0.80 | 0.750 | 1.500 |",
        "| local/h/m-v0 | aepo(x) | iql | deterministic | 10 | spread 1 | 5 | 40 | 1.00 | 0.500 | 0.500 | 0.000 | 0.50 | 0.50 | 0.250 | 0.500 |",
        "| local/h/m-v0 | aepo(x) | iql | deterministic | 10 | spread 3 | 5, 8 | 70 | 2.90 | -1.500 | 1.500 | 3.000 | 0.50 | 0.50 | -0.750 | -1.500 |",
        "| local/h/m-v0 | aepo(x) | iql | noise 0.1, 8 rollouts | 10 | spread 1 | 5 | 40 | 1.00 | 0.100 | 0.200 | 0.100 | 0.50 | 0.60 | 0.050 | 0.100 |"]


def test_critic_budget_table_one_line_per_variant_steps_and_scale():
    """scripts/critic_budget.py's table, by hand: a line per dataset, critic, variant, seed, steps and w (sorted),
    the policy group first, a group missing from a line left blank."""
    from aepo_lite.rl.diagnostics import critic_budget_table
    base = dict(dataset="local/h/m-v0", run="r", critic="iql", seed=5, guidance_scale=0.0)

    def row(variant, steps, group, s, c, g, b):
        return dict(base, variant=variant, steps=steps, group=group, sign_agree=s, corr=c, critic_gain=g, oracle_gain=b)
    rows = [row("run", 20, "spread 1", 0.55, 0.1, 0.004, 0.02), row("run", 20, "policy", 0.6, 0.2, 0.01, 0.03),
            row("run", 10, "policy", 0.5, -0.1, -0.002, 0.03), row("run", 10, "spread 1", 0.45, 0.0, 0.0, 0.02),
            row("hidden=8", 10, "policy", 0.7, 0.3, 0.02, 0.03)]
    lines = critic_budget_table(rows).splitlines()
    assert lines[0].startswith("| dataset | critic | variant | seed | steps | w | policy: sign right |")
    assert "spread 1: sign right" in lines[0]
    assert lines[2:] == [
        "| local/h/m-v0 | iql | hidden=8 | 5 | 10 | 0 | 0.70 | 0.30 | 0.020 / 0.030 |  |  |  |",
        "| local/h/m-v0 | iql | run | 5 | 10 | 0 | 0.50 | -0.10 | -0.002 / 0.030 | 0.45 | 0.00 | 0.000 / 0.020 |",
        "| local/h/m-v0 | iql | run | 5 | 20 | 0 | 0.60 | 0.20 | 0.010 / 0.030 | 0.55 | 0.10 | 0.004 / 0.020 |"]


def test_critic_data_table_one_line_per_data_size_steps_and_scale():
    """scripts/critic_data.py's table, by hand: a line per training dataset, episodes (numerically sorted), critic,
    steps and w, the policy group first, a group missing from a line left blank."""
    from aepo_lite.rl.diagnostics import critic_data_table
    base = dict(dataset="local/h/m-v0", run="r", critic="iql", seed=5, guidance_scale=0.0, train_dataset="local/b/m-v0")

    def row(eps, steps, group, s, c, g, b):
        return dict(base, train_episodes=eps, transitions=100 * eps, steps=steps, group=group, sign_agree=s, corr=c,
                    critic_gain=g, oracle_gain=b)
    rows = [row(100, 20, "spread 1", 0.55, 0.1, 0.004, 0.02), row(100, 20, "policy", 0.6, 0.2, 0.01, 0.03),
            row(20, 20, "policy", 0.5, -0.1, -0.002, 0.03), row(20, 20, "spread 1", 0.45, 0.0, 0.0, 0.02),
            row(100, 10, "policy", 0.7, 0.3, 0.02, 0.03)]
    lines = critic_data_table(rows).splitlines()
    assert lines[0].startswith("| train data | episodes | transitions | critic | steps | w | policy: sign right |")
    assert lines[2:] == [
        "| local/b/m-v0 | 20 | 2000 | iql | 20 | 0 | 0.50 | -0.10 | -0.002 / 0.030 | 0.45 | 0.00 | 0.000 / 0.020 |",
        "| local/b/m-v0 | 100 | 10000 | iql | 10 | 0 | 0.70 | 0.30 | 0.020 / 0.030 |  |  |  |",
        "| local/b/m-v0 | 100 | 10000 | iql | 20 | 0 | 0.60 | 0.20 | 0.010 / 0.030 | 0.55 | 0.10 | 0.004 / 0.020 |"]


def test_critic_seeds_table_one_line_per_scale_and_number_averaged():
    """scripts/critic_seeds.py's table, by hand: a line per dataset, critic, steps, w and critics averaged (sorted),
    the policy group first; per group the agreement, one critic alone, the average's corr, signs and gain, and the
    average's and exact advantages' correlation with nearness to mu(s)."""
    from aepo_lite.rl.diagnostics import critic_seeds_table
    base = dict(dataset="local/h/m-v0", run="r", critic="iql", steps=40)

    def row(w, n, group, agree, alone, c, s, g, b, near=0.3, true_near=-0.01):
        return dict(base, guidance_scale=w, members=n, group=group, agree=agree, alone=alone, corr=c, sign_agree=s,
                    critic_gain=g, oracle_gain=b, near_corr=near, true_near_corr=true_near)
    rows = [row(10, 2, "policy", 0.6, 0.2, 0.25, 0.55, 0.012, 0.044), row(0, 1, "spread 1", 0.5, 0.1, 0.1, 0.5, 0.0, 0.02),
            row(0, 1, "policy", 0.6, 0.05, 0.05, 0.52, 0.001, 0.014, near=-0.2, true_near=0.04)]
    lines = critic_seeds_table(rows).splitlines()
    assert lines[0].startswith("| dataset | critic | steps | w | critics averaged | policy: critics agree | each alone |")
    assert lines[2:] == [
        "| local/h/m-v0 | iql | 40 | 0 | 1 | 0.60 | 0.05 | 0.05 | 0.52 | 0.001 / 0.014 | -0.20 / 0.04 | 0.50 | 0.10 | 0.10 "
        "| 0.50 | 0.000 / 0.020 | 0.30 / -0.01 |",
        "| local/h/m-v0 | iql | 40 | 10 | 2 | 0.60 | 0.20 | 0.25 | 0.55 | 0.012 / 0.044 | 0.30 / -0.01 |  |  |  |  |  |  |"]


def test_action_gradient_field_against_planted_slopes():
    """The exact-value summary of scripts/exact_gradients.py on values made here: values linear in the action with
    one slope for every state give R2 1 and every cosine 1, |g| that slope's length; slopes drawn afresh at each
    state give R2 1 and cosines near 0; values with no relation to the action explain as much as when shuffled
    (about d / (m - 1) of the within-state variance); too few actions a state for a plane are refused."""
    import numpy as np

    from aepo_lite.rl.diagnostics import action_gradient_field, action_gradient_table
    rng = np.random.default_rng(1)
    n, m, d = 400, 5, 3
    obs = np.cumsum(rng.normal(size=(n, 4)), 0)  # smooth along each episode
    acts = rng.uniform(-1, 1, size=(n, m, d))
    eps = np.repeat(np.arange(8), n // 8)
    base = rng.normal(size=(n, 1)) * 100  # a state's level: not the action's effect
    g0 = np.array([0.3, -0.4, 1.2])
    same = action_gradient_field(obs, acts, base + acts @ g0, eps)
    assert same["linear_r2"] == pytest.approx(1.0) and (same["states"], same["actions"]) == (n, m)
    for k in ("cos_next", "cos_5", "cos_random", "cos_nearest"):
        assert same[k] == pytest.approx(1.0)
    assert same["grad_p10"] == pytest.approx(np.linalg.norm(g0)) == same["grad_p99"]
    g = rng.normal(size=(n, d))
    fresh = action_gradient_field(obs, acts, base + np.einsum("nmd,nd->nm", acts, g), eps)
    assert fresh["linear_r2"] == pytest.approx(1.0)
    assert all(abs(fresh[k]) < 0.15 for k in ("cos_next", "cos_5", "cos_random"))
    noise = action_gradient_field(obs, acts, base + rng.normal(size=(n, m)), eps)
    assert noise["linear_r2"] == pytest.approx(noise["shuffled_r2"], abs=0.06)
    assert noise["shuffled_r2"] == pytest.approx(d / (m - 1), abs=0.06)
    # two independent estimates of the values (halves of the Monte-Carlo draws): their slopes agree at each state
    # as far as the values carry the slope rather than the draws' noise
    planted = base + np.einsum("nmd,nd->nm", acts, g)
    assert np.isnan(fresh["cos_halves"])
    agree = action_gradient_field(obs, acts, planted, eps, halves=(planted + 1e-3 * rng.normal(size=(n, m)),
                                                                   planted - 1e-3 * rng.normal(size=(n, m))))
    assert agree["cos_halves"] == pytest.approx(1.0, abs=1e-3) and agree["pairs_halves"] > 0.99
    assert np.isnan(agree["cos_det"]) and np.isnan(agree["pairs_det"])
    flipped = action_gradient_field(obs, acts, planted, eps, reference=2 * base - planted)  # every difference reversed
    assert flipped["cos_det"] == pytest.approx(-1.0) and flipped["pairs_det"] == 0.0
    same_ref = action_gradient_field(obs, acts, planted, eps, reference=planted + 5.0)  # a level does not matter
    assert same_ref["cos_det"] == pytest.approx(1.0) and same_ref["pairs_det"] == 1.0
    apart = action_gradient_field(obs, acts, planted, eps, halves=(base + rng.normal(size=(n, m)),
                                                                   base + rng.normal(size=(n, m))))
    assert abs(apart["cos_halves"]) < 0.15 and apart["pairs_halves"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="halves"):
        action_gradient_field(obs, acts, planted, eps, halves=(planted,))
    with pytest.raises(ValueError, match="reference"):
        action_gradient_field(obs, acts, planted, eps, reference=planted[:, :3])
    row = dict(dataset="t", train_episodes=8, scales="1 3", horizon=300, gamma=0.99, **same, sensitivity=0.0)
    wide = dict(row, scales="10", linear_r2=0.5)
    noisy = dict(row, draws=8, linear_r2=0.7, cos_halves=0.9, pairs_halves=0.8, cos_det=0.3, pairs_det=0.65)
    table = action_gradient_table([noisy, wide, row]).splitlines()  # by the spreads (numerically), then the draws
    assert table[2].startswith("| t | 8 | 400 | 5 | 1 3 | 0 | 1.000 |") and table[2].endswith("| 0 |  |  |")
    assert table[3].startswith("| t | 8 | 400 | 5 | 1 3 | 8 | 0.700 |") and table[3].endswith("| 0.900 / 0.800 | 0.300 / 0.650 |")
    assert table[4].startswith("| t | 8 | 400 | 5 | 10 | 0 | 0.500 |")
    with pytest.raises(ValueError, match="actions"):
        action_gradient_field(obs, acts[:, :4], base + acts[:, :4] @ g0, eps)
