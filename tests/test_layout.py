"""The library's shape: subpackages by purpose, short functions, one device switch, no dead names."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "aepo_lite"
MAX_LINES = 80


def _functions():
    for path in sorted(LIB.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(LIB.parent), node


def test_no_library_function_longer_than_80_lines():
    long = [f"{p}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in _functions()
            if n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_layout_shows_the_architecture():
    for pkg in ("core", "training", "rl", "toy", "course", "cli"):
        assert (LIB / pkg / "__init__.py").exists(), pkg
    flat = sorted(p.name for p in LIB.glob("*.py"))
    assert flat == sorted(["__init__.py", "__main__.py", "_checks.py", "_io.py", "_procs.py", "bench.py", "config.py",
                           "device.py"])


def test_one_device_switch():
    """No module but device.py names a device: `cuda` appears only as a device type or in comments."""
    bad = []
    for path in LIB.rglob("*.py"):
        if path.name == "device.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""torch\.device\(\s*["']cuda|device\s*=\s*["']cuda["']|\.cuda\(\)|\.to\(\s*["']cuda""", code):
                bad.append(f"{path.relative_to(LIB)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["with_method", "LIBRARY_ESTIMATOR", "main_print", "_self_test",
                                  "recover_eval_env_fn", "dataset_mean_return"])
def test_dead_code_is_gone(name):
    pattern = re.compile(rf"def {name}\b|^{name}\s*=|\b{name}\(|import .*\b{name}\b", re.M)
    hits = [str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if pattern.search(p.read_text())]
    assert not hits, f"{name} is still defined or used in {hits}"
