"""Every notebooks/*.py executes at smoke scale in a real Jupyter kernel, and its .ipynb pair is
in sync with it (same cells, same sources)."""
import os
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
    temp_before = set(Path(tempfile.gettempdir()).glob("aepo_nb*"))
    t0 = time.time()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(py.parent)}}).execute()
    elapsed = time.time() - t0
    print(f"{py.name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    left = set(Path(tempfile.gettempdir()).glob("aepo_nb*")) - temp_before
    assert not left, f"{py.name} left temporary folders behind: {sorted(left)}"


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
# A wrong answer per exercise: its check cell must raise.
WRONG = {1: "w2_same_as_beta6 = True", 2: "mse_overshoots = not mse_overshoots",
         3: "rel_cov_dpm2_15 = table['dpmpp2m', 15]['rel_cov']"}


def _exercises(nb):
    """{n: (solution code from the <details> block, index of the answer cell, index of the check cell)}."""
    import re

    out, solution = {}, None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            blocks = re.findall(r"```python\n(.*?)```", cell.source, re.S)
            solution = blocks[0] if blocks else None
        m = re.match(r"# Exercise (\d+): your answer", cell.source) if cell.cell_type == "code" else None
        if m:
            out[int(m.group(1))] = [solution, i, None]
        m = re.match(r"# Exercise (\d+): the check", cell.source) if cell.cell_type == "code" else None
        if m:
            out[int(m.group(1))][2] = i
    return out


def test_every_exercise_has_a_folded_solution_an_answer_cell_and_a_check():
    ex = _exercises(jupytext.read(CHAPTER_1))
    assert sorted(ex) == [1, 2, 3], ex
    for n, (solution, answer, check_cell) in ex.items():
        assert solution and answer is not None and check_cell == answer + 1, (n, ex[n])


@pytest.mark.notebook
def test_exercise_solutions_pass_their_checks_and_wrong_answers_raise(monkeypatch):
    """Chapter 1 with each answer cell replaced by its folded solution: every check says correct.
    Then a wrong answer per exercise, in the same kernel: its check cell raises."""
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("AEPO_SCALE", "smoke")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(CHAPTER_1)
    ex = _exercises(nb)
    for solution, answer, _ in ex.values():
        nb.cells[answer].source = solution
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(CHAPTER_1.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        for n, (_, _, check_cell) in ex.items():
            text = "".join(o.get("text", "") for o in nb.cells[check_cell].outputs)
            assert f"Exercise {n}: correct" in text, (n, text)
        for n, (solution, answer, check_cell) in ex.items():
            client.execute_cell(nbformat.v4.new_code_cell(WRONG[n]), answer)  # in place of the answer cell
            with pytest.raises(CellExecutionError, match="check failed"):
                client.execute_cell(nb.cells[check_cell], check_cell)
            client.execute_cell(nbformat.v4.new_code_cell(solution), answer)  # right again, for the next one
