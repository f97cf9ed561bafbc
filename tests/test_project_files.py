"""The README's commands, CI, environment.yml and pyproject.toml agree with each other."""
import re
import tomllib
from pathlib import Path

import yaml

from aepo_lite.core import guidance

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_parses_and_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"]
    req = _pyproject()["project"]["requires-python"]
    assert req == ">=3.11", "environment.yml's python must satisfy requires-python"
    assert "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert len(pip) == 1
    m = re.fullmatch(r"-e \.\[([a-z,]+)\]", pip[0])
    assert m, pip
    extras = set(m.group(1).split(","))
    declared = set(_pyproject()["project"]["optional-dependencies"])
    assert extras == declared, f"environment.yml installs {sorted(extras)}, pyproject declares {sorted(declared)}"


def test_setup_script_installs_the_same_extras():
    setup = (ROOT / "scripts/setup.sh").read_text()
    m = re.search(r'-e "\.\[([a-z,]+)\]"', setup)
    assert m and set(m.group(1).split(",")) == set(_pyproject()["project"]["optional-dependencies"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in readme and "make run" in readme
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith(("#", "set ", "cd ", "export "))]
    assert ci_cmds == ["make test"], ci_cmds
    make = (ROOT / "Makefile").read_text()
    assert "bash scripts/setup.sh test" in make and "bash scripts/setup.sh run" in make


def test_console_script_declared():
    assert _pyproject()["project"]["scripts"]["aepo-lite"] == "aepo_lite.cli:main"


def test_library_doc_lists_every_public_guidance_function():
    doc = (ROOT / "docs" / "library.md").read_text()
    missing = [name for name in guidance.__all__ if f"`{name}" not in doc]
    assert not missing, f"docs/library.md does not list: {missing}"


def test_readme_fits_a_newcomer():
    """At most 250 lines, with the generated results summary in its first screen (first 40 lines)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    assert any("<!-- summary:start -->" in ln for ln in lines[:40])
