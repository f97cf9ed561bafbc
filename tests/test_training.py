"""The stage mechanism: resume from periodic checkpoints, refusals, locks, NaN checks, metrics log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from aepo_lite.core.diffusion import DiffusionModel
from aepo_lite.core.nets import NoiseNet
from aepo_lite.training import BehaviourLearner, RunLock, Stage, StageStore, run_stage, stage_hash
from aepo_lite.training.stages import MetricsLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(steps=60, every_data=None, hook=None, seed=3):
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) * 0.5

    def learner():
        torch.manual_seed(1)
        return BehaviourLearner(DiffusionModel(NoiseNet(2, 0, hidden=16, n_blocks=1)), 1e-2, decay_steps=steps)

    def batches(g):
        if hook is not None:
            hook()
        return {"a": data[torch.randint(0, 512, (32,), generator=g)], "s": None}

    return Stage("behaviour", {"hidden": 16, "batch": 32}, steps, learner, batches, seed=seed)


def _weights(learner):
    return torch.cat([p.detach().flatten() for p in learner.model.parameters()])


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    ref, _ = run_stage(_stage(), StageStore(tmp_path / "a"), log_every=5, checkpoint_every=10, progress=False)
    calls = {"n": 0}

    def interrupt():  # the 37th batch (about 60 % of 60 steps) never arrives: the process "dies"
        calls["n"] += 1
        if calls["n"] == 37:
            raise KeyboardInterrupt

    store = StageStore(tmp_path / "b")
    log = MetricsLog(tmp_path / "b" / "metrics.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_stage(_stage(hook=interrupt), store, log=log, log_every=5, checkpoint_every=10, progress=False)
    ck = store.load("behaviour", stage_hash(_stage()))
    assert ck["step"] == 30  # the last periodic checkpoint before the kill
    resumed, stats = run_stage(_stage(), store, log=log, log_every=5, checkpoint_every=10, progress=False)
    assert stats["resumed_from"] == 30
    assert torch.equal(_weights(resumed), _weights(ref))
    steps = [json.loads(ln)["step"] for ln in log.path.read_text().splitlines()]
    assert steps == list(range(5, 61, 5))  # lines logged after step 30 and before the kill are not duplicated


def test_sigkill_mid_stage_resumes_from_last_checkpoint(tmp_path):
    """A real SIGKILL at about 60 % of a stage: the rerun redoes at most one checkpoint interval."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads(1)  # as the test process (conftest): the same reductions, bit for bit
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_training import _stage, _weights
        from aepo_lite.training import StageStore, run_stage
        slow = (lambda: time.sleep(0.02)) if sys.argv[1] == "slow" else None
        learner, stats = run_stage(_stage(steps=200, hook=slow), StageStore({str(tmp_path / 'run')!r}),
                                   checkpoint_every=20, progress=False)
        torch.save({{"w": _weights(learner), "stats": stats}}, sys.argv[2])
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(tmp_path / "x.pt")], env=env)
    store, h = StageStore(tmp_path / "run"), stage_hash(_stage(steps=200))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = store.load("behaviour", h) if store.path("behaviour", h).exists() else None
        if ck is not None and ck["step"] >= 120:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = store.load("behaviour", h)["step"]
    assert 120 <= killed_at < 200
    subprocess.run([sys.executable, str(script), "fast", str(tmp_path / "resumed.pt")], check=True, env=env)
    resumed = torch.load(tmp_path / "resumed.pt")
    assert resumed["stats"]["resumed_from"] == killed_at
    ref, _ = run_stage(_stage(steps=200), StageStore(tmp_path / "ref"), checkpoint_every=20, progress=False)
    assert torch.equal(resumed["w"], _weights(ref))
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_finished_stage_is_loaded_not_retrained(tmp_path):
    store = StageStore(tmp_path)
    a, _ = run_stage(_stage(steps=20), store, checkpoint_every=10, progress=False)
    b, stats = run_stage(_stage(steps=20, hook=lambda: pytest.fail("retrained")), store, progress=False)
    assert torch.equal(_weights(a), _weights(b))
    assert stats["steps"] == 20


def test_hash_changes_with_config_steps_seed_and_upstream():
    base = stage_hash(_stage())
    assert stage_hash(Stage("behaviour", {"hidden": 17, "batch": 32}, 60, None, None, seed=3)) != base
    assert stage_hash(_stage(steps=61)) != base
    assert stage_hash(_stage(seed=4)) != base
    up = _stage()
    up.upstream = ("abc",)
    assert stage_hash(up) != base


def test_checkpoint_from_another_config_is_refused(tmp_path):
    store = StageStore(tmp_path)
    run_stage(_stage(steps=10), store, progress=False)
    with pytest.raises(ValueError, match="another config"):
        run_stage(_stage(steps=10, seed=9), store, progress=False)


def test_checkpoint_from_older_layout_is_refused(tmp_path):
    store = StageStore(tmp_path)
    torch.save({"stage": "behaviour", "fingerprint": "x", "state": {}}, store.path("behaviour", "h"))
    with pytest.raises(ValueError, match=r"older aepo-lite layout \(format 1.*behaviour\.pt|behaviour\.pt.*older"):
        store.load("behaviour", "h")


def test_unreadable_checkpoint_names_the_file(tmp_path):
    store = StageStore(tmp_path)
    store.path("behaviour", "h").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="behaviour.pt could not be read"):
        store.load("behaviour", "h")


def test_nan_metric_stops_at_logged_step(tmp_path):
    st = _stage(steps=10)
    st.batches = lambda g: {"a": torch.full((8, 2), float("nan")), "s": None}
    with pytest.raises(FloatingPointError, match="behaviour: step 2 has non-finite"):
        run_stage(st, StageStore(tmp_path), log_every=2, progress=False)


def test_keyed_store_keeps_one_file_per_config(tmp_path):
    store = StageStore(tmp_path, keyed=True)
    run_stage(_stage(steps=5), store, progress=False)
    run_stage(_stage(steps=5, seed=8), store, progress=False)
    assert len(list(tmp_path.glob("behaviour-*.pt"))) == 2


def test_second_writer_is_refused_at_once(tmp_path):
    with RunLock(tmp_path):
        code = ("import sys; from aepo_lite.training import RunLock\n"
                f"with RunLock({str(tmp_path)!r}): pass")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode != 0 and "being written by another aepo-lite process" in r.stderr
    with RunLock(tmp_path):  # released: the next writer gets it
        pass
