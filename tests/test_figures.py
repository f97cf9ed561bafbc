"""``aepo-lite figures``: every figure and table in figures/ is rebuilt from the committed results
files alone, quickly (nothing trains), and bad input is reported, not crashed on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from aepo_lite.cli import figures as F

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
BUDGET_S = 60.0
OLD = 1_000_000_000  # an mtime in 2001: anything rewritten by the command is newer


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "aepo_lite", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_figures_rebuilds_every_figure_and_table_from_committed_results(tmp_path):
    missing = [p.results for p in F.PARTS if not p.optional and not (FIGURES / p.results).is_file()]
    assert not missing, f"results files not committed in figures/: {missing}"
    work = tmp_path / "figures"
    shutil.copytree(FIGURES, work)
    results = {p.name: p.read_bytes() for p in work.iterdir() if p.suffix not in F.OUTPUT_SUFFIXES}
    outputs = sorted(p.name for p in work.iterdir() if p.suffix in F.OUTPUT_SUFFIXES)
    for p in work.iterdir():
        os.utime(p, (OLD, OLD))

    t0 = time.perf_counter()
    r = _cli("figures", "--figures-dir", str(work))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, f"aepo-lite figures failed:\n{r.stdout}\n{r.stderr}"
    assert elapsed < BUDGET_S, f"aepo-lite figures took {elapsed:.1f} s (budget {BUDGET_S:.0f} s)\n{r.stdout}"
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

    rec = json.loads((FIGURES / "closed_form_checks.json").read_text())
    rec["problem"]["beta"] = rec["problem"]["beta"] + 1.0
    (tmp_path / "closed_form_checks.json").write_text(json.dumps(rec))
    demo = __import__("aepo_lite.course.demo", fromlist=["x"])
    fake = types.SimpleNamespace(**{k: getattr(demo, k) for k in dir(demo) if not k.startswith("__") and k != "render"})
    with pytest.raises(ValueError, match="different problem"):
        F._render_demo(fake, tmp_path / "closed_form_checks.json", tmp_path)
