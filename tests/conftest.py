"""Shared fixtures: random Gaussian behaviours and concave quadratic critics in float64; the scripts as modules."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("AEPO_SCALE", "smoke")
# The tests never download: a dataset not on disk fails at once through Minari's remote (huggingface_hub's own
# offline switch) instead of waiting on its retries; HF_HUB_OFFLINE=0 lets a developer try the download online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Small tensors everywhere: one intra-op thread is fastest and keeps a loaded machine responsive.
torch.set_num_threads(1)

DT = torch.float64
DIMS = (1, 2, 6)
TIMES = (1e-3, 0.5, 1.0)  # t near 0, in the middle, at 1


def make_problem(d: int, seed: int = 0, scale: float = 0.1):
    """A Gaussian behaviour N(m, S) and a concave quadratic critic Q = c + g^T a - a^T H a / 2."""
    g_ = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g_, dtype=DT)
    S = scale * (A @ A.T / d + 0.5 * torch.eye(d, dtype=DT))
    m = 0.3 * torch.randn(d, generator=g_, dtype=DT)
    g = torch.randn(d, generator=g_, dtype=DT)
    B = torch.randn(d, d, generator=g_, dtype=DT)
    H = B @ B.T / d
    return dict(m=m, S=S, c=0.25, g=g, H=H)


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package), registered in
    ``sys.modules`` under ``name`` (dataclasses look their module up while a class is made)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def schedule():
    from aepo_lite.core.schedule import VPSchedule
    return VPSchedule()


# Files whose module-scoped fixtures train or measure something: under pytest-xdist (`make test` runs
# a worker a core, --dist loadgroup) each file stays on one worker, so its fixture is built once.
ONE_WORKER_FILES = ("test_behaviour_share.py", "test_bench.py", "test_plateau.py", "test_rl_agent.py")


def pytest_collection_modifyitems(config, items):
    """Run the browser test last: notebook 2's training stages are then cached by the notebook
    test, and the browser test measures the browser, not the training. Under pytest-xdist the two
    share a group (one worker, this order), and each file of ONE_WORKER_FILES is a group of its own."""
    items.sort(key=lambda item: "test_browser.py" in str(item.fspath))
    for item in items:
        name = item.path.name
        if name == "test_browser.py" or (item.originalname == "test_notebook_executes_at_smoke_scale"
                                         and "02_" in item.name):
            item.add_marker(pytest.mark.xdist_group("toy_cache"))
        elif name in ONE_WORKER_FILES:
            item.add_marker(pytest.mark.xdist_group(name))
