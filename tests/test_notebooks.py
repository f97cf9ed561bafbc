"""Every notebooks/*.py executes at smoke scale in a real Jupyter kernel, and its .ipynb pair is
in sync with it (same cells, same sources)."""
import os
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
    t0 = time.time()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(py.parent)}}).execute()
    elapsed = time.time() - t0
    print(f"{py.name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
