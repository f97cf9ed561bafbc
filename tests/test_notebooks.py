"""Every notebooks/*.py executes at smoke scale in a real Jupyter kernel, and its .ipynb pair is
in sync with it (same cells, same sources)."""
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _text_outputs(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _ours_or_orphaned(d: Path) -> bool:
    """A temp folder a finished run left behind: its owner process (aepo_lite.course.notebook.scratch_dir
    writes it) has ended, or it has none. A folder of a run still going on elsewhere is not counted."""
    try:
        pid = int((d / ".owner-pid").read_text())
    except (OSError, ValueError):
        return d.exists()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.name)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py.name} has no paired {ipynb.name}: run `jupytext --sync {py}`"
    a = jupytext.read(py)
    b = nbformat.read(ipynb, as_version=4)
    assert _cells(a) == _cells(b), f"{ipynb.name} is out of sync with {py.name}: run `jupytext --to ipynb {py}`"


@pytest.mark.notebook
@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_at_smoke_scale(py, tmp_path, monkeypatch):
    monkeypatch.setenv("AEPO_SCALE", "smoke")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small tensors: one thread is fastest
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(py)
    tmp = Path(tempfile.gettempdir())
    temp_before = set(tmp.glob("aepo_nb*"))
    t0 = time.time()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(py.parent)}}).execute()
    elapsed = time.time() - t0
    print(f"{py.name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # The temp folders the chapter named in its outputs (chapter 3 prints its Minari root), and any
    # new one a finished run left behind: none may be left.
    named = {Path(m) for m in re.findall(re.escape(str(tmp)) + r"/aepo_nb[^/\s'\"]*", _text_outputs(nb))}
    if py.name.startswith("03_"):
        assert named, "chapter 3 at smoke scale should print its temporary Minari root"
    left = sorted(d for d in named if d.exists())
    left += sorted(d for d in set(tmp.glob("aepo_nb*")) - temp_before - set(left) if _ours_or_orphaned(d))
    assert not left, f"{py.name} left temporary folders behind: {left}"


# ---------------------------------------------------------------- checks that always run, and the scale switch

def _code_cells(py):
    return [c for c in jupytext.read(py).cells if c.cell_type == "code"]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.name)
def test_no_assert_statements_in_notebooks(py):
    """``python -O`` (PYTHONOPTIMIZE) removes ``assert``: every check in a chapter is a ``check`` call."""
    import ast

    found = []
    for i, cell in enumerate(_code_cells(py), 1):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        found += [f"code cell {i}, line {n.lineno}" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assert)]
    assert not found, f"{py.name}: assert statements (use aepo_lite.course.notebook.check): {found}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_prints_the_scale(py):
    assert "course_scale()" in _code_cells(py)[0].source, f"{py.name}: the first code cell must call course_scale()"


def test_check_raises_even_under_python_O():
    import subprocess
    import sys

    code = "from aepo_lite.course.notebook import check; check(1 + 1 == 2, 'fine'); check(2 < 1, 'two < one')"
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "AssertionError: check failed: two < one" in r.stderr, r


def test_course_scale_defaults_to_smoke_and_refuses_other_values(monkeypatch, capsys):
    from aepo_lite.course.notebook import course_scale

    monkeypatch.delenv("AEPO_SCALE", raising=False)
    assert course_scale() == "smoke" and "AEPO_SCALE = smoke (the default" in capsys.readouterr().out
    monkeypatch.setenv("AEPO_SCALE", "full")
    assert course_scale() == "full" and "set in the environment" in capsys.readouterr().out
    monkeypatch.setenv("AEPO_SCALE", "huge")
    with pytest.raises(ValueError, match="AEPO_SCALE"):
        course_scale()


def test_scratch_dir_is_removed_at_exit_or_by_remove_scratch_and_orphans_are_swept(tmp_path):
    """scratch_dir: removed by remove_scratch, or at the process's exit (atexit); a folder whose
    process was killed (no exit handler ran) is removed by the next scratch_dir of the same prefix."""
    from aepo_lite.course.notebook import remove_scratch, scratch_dir

    prefix = f"aepo_nbtest{os.getpid()}_"
    d = scratch_dir(prefix)
    assert d.is_dir() and d.name.startswith(prefix) and remove_scratch(d) and not d.exists()
    assert remove_scratch(d)  # already gone: nothing to do
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (f"from aepo_lite.course.notebook import scratch_dir; d = scratch_dir({prefix!r}); "
            "(d / 'x').write_text('x'); print(d)")
    exited = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                 check=True).stdout.strip())
    assert exited.name.startswith(prefix) and not exited.exists(), "not removed at exit"
    killed = Path(subprocess.run([sys.executable, "-c", code + "; import os; os._exit(0)"], capture_output=True,
                                 text=True, env=env, check=True).stdout.strip())
    assert killed.is_dir(), "os._exit runs no exit handler: the folder should still be there"
    stranger = Path(tempfile.mkdtemp(prefix=prefix))  # no owner file: not ours to remove
    try:
        d2 = scratch_dir(prefix)
        assert not killed.exists(), "the orphan of a process that ended was not removed"
        assert stranger.is_dir() and d2.is_dir()
        remove_scratch(d2)
    finally:
        for p in (killed, stranger):
            remove_scratch(p)
    with pytest.raises(ValueError, match="prefix"):
        scratch_dir("a/b")


@pytest.mark.notebook
def test_scratch_dir_is_removed_when_the_kernel_shuts_down(tmp_path):
    """What a reader does in JupyterLab: run chapter 3's first cells, never the last one, and shut the
    kernel down (or restart it): the folder goes with the kernel."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from aepo_lite.course.notebook import scratch_dir\n"
        "d = scratch_dir('aepo_nb3_')\n(d / 'minari').mkdir()\nprint(d)")])
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        d = Path(nb.cells[0].outputs[0]["text"].strip())
        assert d.is_dir()
    # setup_kernel's exit shuts the kernel down the way JupyterLab does (a shutdown request)
    for _ in range(50):
        if not d.exists():
            break
        time.sleep(0.1)
    assert not d.exists(), f"{d} outlived its kernel"


def test_each_scale_switch_has_one_default_and_says_it(monkeypatch, capsys, tmp_path):
    """The chapters' switch AEPO_SCALE defaults to smoke, and the README says so. ``aepo-lite demo``
    (what ``make run`` runs) has its own ``--scale``, default full: it must rewrite the committed
    figures/closed_form_checks.json unchanged (tests/test_figures.py), so it does not read AEPO_SCALE,
    and its first line says which scale it uses."""
    import inspect
    import json

    from aepo_lite.cli.demo import DemoCommand
    from aepo_lite.course import demo, notebook

    assert notebook.DEFAULT_SCALE == "smoke"
    assert DemoCommand().scale == demo.DEFAULT_SCALE == inspect.signature(demo.run_demo).parameters["scale"].default
    assert json.loads((ROOT / "figures" / "closed_form_checks.json").read_text())["scale"] == demo.DEFAULT_SCALE
    readme = (ROOT / "README.md").read_text()
    assert "`AEPO_SCALE=smoke|full` (default `smoke`, printed by each chapter's first cell)" in readme
    monkeypatch.setenv("AEPO_SCALE", "smoke")
    demo.run_demo(tmp_path, scale="smoke", verbose=True)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"scale = smoke (not the demo's default, {demo.DEFAULT_SCALE}") and "AEPO_SCALE" in first


def test_markdown_table():
    from aepo_lite.course.notebook import markdown_table

    assert markdown_table(["t", "error"], [["0.05", "1.2%"], ["a|b", 3]]) == (
        "| t | error |\n|---:|---:|\n| 0.05 | 1.2% |\n| a\\|b | 3 |")
    assert markdown_table(["name", "x"], [["ddim", 1.5]]).splitlines()[1] == "|:---|---:|"
    with pytest.raises(ValueError, match="rows"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a"], [[1]], align="x")


# ---------------------------------------------------------------- chapter 1's exercises

CHAPTER_1 = ROOT / "notebooks" / "01_closed_form_guidance.py"
CHAPTER_2 = ROOT / "notebooks" / "02_toy_2d_energy.py"
# A wrong answer per exercise: its check cell must raise.
WRONG = {
    CHAPTER_1: {1: "w2_same_as_beta6 = True", 2: "mse_overshoots = not mse_overshoots",
                3: "rel_cov_dpm2_15 = table['dpmpp2m', 15]['rel_cov']"},
    CHAPTER_2: {1: "best_mode_mass = 1 / 8",  # the behaviour's mass, not the target's
                2: "gap = 0 * gap",  # no gap: the MSE target taken for E_t
                3: "best_w = [w for w in SCALES if w != best_w][0]"},
}


def _exercises(nb):
    """{n: (solution code from the <details> block, index of the answer cell, index of the check cell)}."""
    out, solution = {}, None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            blocks = re.findall(r"```python\n(.*?)```", cell.source, re.S)
            solution = blocks[0] if blocks else None
        m = re.match(r"# Exercise (\d+): your answer", cell.source) if cell.cell_type == "code" else None
        if m:
            out[int(m.group(1))] = [solution, i, None]
            solution = None  # each exercise needs its own folded solution
        m = re.match(r"# Exercise (\d+): the check", cell.source) if cell.cell_type == "code" else None
        if m:
            out[int(m.group(1))][2] = i
    return out


@pytest.mark.parametrize("chapter", [CHAPTER_1, CHAPTER_2], ids=lambda p: p.name)
def test_every_exercise_has_a_folded_solution_an_answer_cell_and_a_check(chapter):
    ex = _exercises(jupytext.read(chapter))
    assert sorted(ex) == [1, 2, 3], ex
    for n, (solution, answer, check_cell) in ex.items():
        assert solution and answer is not None and check_cell == answer + 1, (n, ex[n])


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", [CHAPTER_1, CHAPTER_2], ids=lambda p: p.name)
def test_exercise_solutions_pass_their_checks_and_wrong_answers_raise(chapter, monkeypatch):
    """A chapter with each answer cell replaced by its folded solution: every check says correct.
    Then a wrong answer per exercise, in the same kernel: its check cell raises."""
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("AEPO_SCALE", "smoke")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(chapter)
    ex = _exercises(nb)
    for solution, answer, _ in ex.values():
        nb.cells[answer].source = solution
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(chapter.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        for n, (_, _, check_cell) in ex.items():
            text = "".join(o.get("text", "") for o in nb.cells[check_cell].outputs)
            assert f"Exercise {n}: correct" in text, (n, text)
        for n, (solution, answer, check_cell) in ex.items():
            client.execute_cell(nbformat.v4.new_code_cell(WRONG[chapter][n]), answer)  # in place of the answer cell
            with pytest.raises(CellExecutionError, match="check failed"):
                client.execute_cell(nb.cells[check_cell], check_cell)
            client.execute_cell(nbformat.v4.new_code_cell(solution), answer)  # right again, for the next one
