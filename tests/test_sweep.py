"""Sweeps: the same rows on both backends, resume without redoing finished runs, isolation, bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("minari")

from test_rl_agent import DS, tiny  # noqa: E402,F401  (the tiny local Minari dataset fixture)

from aepo_lite.rl.sweep import RunSpec, SweepConfig, plan, run_one, run_sweep  # noqa: E402

TIMING = ("actions_per_s",)


def _rows(out):
    """Each run's result rows without timings: RL rows, and the toy runs' distances."""
    rows = {}
    for p in sorted(out.rglob("results.json")):
        res = json.loads(p.read_text())
        key = p.parent.relative_to(out).as_posix()
        got = res["rows"] if "rows" in res else res["results"]
        rows[key] = [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("per_s")} for r in got]
    return rows


SMALL = {"behaviour": {"steps": 150}, "critic": {"steps": 60}, "energy": {"steps": 40}}  # shared by RL and toy


def _cfg(out, datasets=(DS,), **kw):
    small = Path(out).parent / f"{Path(out).name}-small.json"
    small.write_text(json.dumps(SMALL))
    return SweepConfig(datasets=datasets, methods=("bc", "mse"), seeds=(0, 1), preset="smoke", out=str(out),
                       overrides=str(small), **kw)


def test_smoke_sweep_gives_identical_rows_on_both_backends(tiny, tmp_path):  # noqa: F811
    """A toy task and a local dataset, 2 methods x 2 seeds, on the process pool and on a local Ray cluster."""
    pytest.importorskip("ray")
    both = (DS, "toy:moons")
    local = run_sweep(_cfg(tmp_path / "local", both), echo=lambda *a: None)
    assert len(local["done"]) == 8 and not local["failed"], local["failed"]
    ray = run_sweep(_cfg(tmp_path / "ray", both, backend="ray", workers=2), echo=lambda *a: None)
    assert len(ray["done"]) == 8 and not ray["failed"], ray["failed"]
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(a) == 8 and a == b


def test_rerun_redoes_no_finished_run_and_resumes_the_unfinished(tiny, tmp_path):  # noqa: F811
    cfg = _cfg(tmp_path / "s", workers=2)
    first = run_sweep(cfg, echo=lambda *a: None)
    assert len(first["done"]) == 4
    # a run killed before its evaluation: results gone, checkpoints kept; another killed mid-training
    runs = [s.run_dir for s in plan(cfg)]
    (tmp_path / "s" / runs[1].split("/s/", 1)[1] / "results.json").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*.pt")}
    t0 = time.perf_counter()
    again = run_sweep(cfg, echo=lambda *a: None)
    assert [r["run_dir"] for r in again["done"]] == [runs[1]]
    assert len(again["skipped"]) == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*.pt")} == mtimes  # nothing retrained
    assert time.perf_counter() - t0 < 60


def test_a_finished_run_of_another_copy_of_its_dataset_is_refused_not_skipped(tiny, tmp_path):  # noqa: F811
    """A sweep rerun into an old --out after the dataset was remade under its id (make-dataset on another CPU) used
    to report the old copy's finished runs as skipped, i.e. as this copy's. A run whose results record another
    data fingerprint is now an error naming its results file, and nothing in it changes; one whose results record
    the copy here, or no fingerprint (written before they were recorded), is skipped as before."""
    from aepo_lite._io import atomic_write_json, read_json
    cfg = SweepConfig(datasets=(DS,), methods=("bc",), seeds=(0, 1), preset="smoke", out=str(tmp_path / "s"),
                      overrides=str(_cfg(tmp_path / "o").overrides))
    assert len(run_sweep(cfg, echo=lambda *a: None)["done"]) == 2
    a, b = (Path(s.run_dir) / "results.json" for s in plan(cfg))
    atomic_write_json(a, {**read_json(a), "data_fingerprint": "0" * 16})  # as if evaluated on another copy
    old = read_json(b)
    del old["data_fingerprint"]
    atomic_write_json(b, old)
    snap = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != "sweep.log"}
    again = run_sweep(cfg, echo=lambda *a: None)
    assert [r["run_dir"] for r in again["failed"]] == [str(a.parent)]
    assert str(a) in again["failed"][0]["error"] and "another copy of " + DS in again["failed"][0]["error"]
    assert [r["run_dir"] for r in again["skipped"]] == [str(b.parent)]
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != "sweep.log"} == snap


def test_a_failed_run_is_isolated_and_logged(tiny, tmp_path):  # noqa: F811
    spec = RunSpec(DS, "aepo", 0, "smoke", str(tmp_path / "bad"), overrides={"energy": {"beta": -1.0}})
    r = run_one(spec)
    assert r["status"] == "failed" and "energy.beta" in r["error"]
    assert "energy.beta" in (tmp_path / "bad" / "sweep.log").read_text()


def test_unavailable_dataset_is_skipped_with_the_reason_and_the_rest_runs(tiny, tmp_path):  # noqa: F811
    cfg = SweepConfig(datasets=("nobody/none/none-v0", DS), methods=("bc",), seeds=(0,), preset="smoke",
                      out=str(tmp_path / "s"))
    res = run_sweep(cfg, echo=lambda *a: None)
    assert [u["dataset"] for u in res["unavailable"]] == ["nobody/none/none-v0"]
    assert "make-dataset" in res["unavailable"][0]["reason"] or "not in the local" in res["unavailable"][0]["reason"]
    assert len(res["done"]) == 1


@pytest.mark.parametrize("kw,match", [(dict(suite="antmase"), "did you mean 'antmaze'"),
                                      (dict(methods=("sac",)), "methods"), (dict(backend="slurm"), "backend"),
                                      (dict(workers=0), "workers")])
def test_bad_sweep_input_is_named(tmp_path, kw, match):
    base = dict(datasets=(DS,), out=str(tmp_path))
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        plan(SweepConfig(**base))


def test_ray_address_that_does_not_answer_fails_fast(tmp_path):
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no Ray cluster answers"):
        run_sweep(SweepConfig(datasets=("toy:8gaussians",), methods=("bc",), seeds=(0,), out=str(tmp_path),
                              backend="ray", address="127.0.0.1:1"), echo=lambda *a: None)
    assert time.perf_counter() - t0 < 30


def test_two_sweeps_into_one_folder_are_refused(tmp_path):
    from aepo_lite.training import RunLock
    with RunLock(tmp_path, name=".sweep.lock"):
        with pytest.raises(ValueError, match="another aepo-lite process"):
            import subprocess
            import sys
            code = ("from aepo_lite.rl.sweep import SweepConfig, run_sweep\n"
                    f"run_sweep(SweepConfig(datasets=('toy:8gaussians',), out={str(tmp_path)!r}))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            raise ValueError(r.stderr)


def test_suite_commands(capsys):
    from aepo_lite.cli import main
    assert main(["suite", "list"]) == 0
    assert "antmaze" in capsys.readouterr().out
    assert main(["suite", "show", "mujoco"]) == 0
    out = capsys.readouterr().out
    assert "mujoco/hopper/medium-v0" in out and "NOT D4RL data" in out
    assert main(["suite", "show", "antmase"]) == 2


def test_stack_seeds_trains_the_seeds_together_and_the_runs_only_evaluate(tiny, tmp_path):  # noqa: F811
    """``stack_seeds``: per dataset and method, seeds 0 and 1 are trained together before the runs (behaviour, critic
    and energy stacked); every run then finds its stages finished, and the rows equal those of a plain sweep up to
    the rounding of the stacked sums."""
    said = []
    got = run_sweep(_cfg(tmp_path / "stacked", stack_seeds=True), echo=said.append)
    assert len(got["done"]) == 4 and not got["failed"], got["failed"]
    for m in ("bc", "mse"):
        assert sum(s.startswith(f"stack_seeds: {DS} {m}: seeds [0, 1] trained together") for s in said) == 1
    for p in (tmp_path / "stacked").rglob("train_stats.json"):
        stats = json.loads(p.read_text())
        assert stats["behaviour"]["stacked_seeds"] == [0, 1], p
        if "mse-" in str(p):
            assert stats["critic"]["stacked_seeds"] == stats["energy"]["stacked_seeds"] == [0, 1]
    plain = run_sweep(_cfg(tmp_path / "plain"), echo=lambda *a: None)
    assert len(plain["done"]) == 4
    a, b = _rows(tmp_path / "stacked"), _rows(tmp_path / "plain")
    assert a.keys() == b.keys()
    for k in a:
        for ra, rb in zip(a[k], b[k]):
            assert ra["return_mean"] == pytest.approx(rb["return_mean"], rel=0.05, abs=1.0), k
    said.clear()
    again = run_sweep(_cfg(tmp_path / "stacked", stack_seeds=True), echo=said.append)
    assert len(again["skipped"]) == 4 and not any(s.startswith("stack_seeds") for s in said)


def _sleeper(session) -> subprocess.Popen:
    """A process whose command line names ``session``, standing in for the GCS server a failed start-up leaves;
    returned once /proc shows that command line (a child just spawned can read as empty for a moment)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(session)])
    cmdline, t0 = Path(f"/proc/{p.pid}/cmdline"), time.monotonic()
    while cmdline.exists() and session.name not in cmdline.read_bytes().decode(errors="replace"):
        assert time.monotonic() - t0 < 30, "the stand-in process did not start"
        time.sleep(0.01)
    return p


def test_ray_start_up_that_times_out_is_tried_again_then_named_with_its_cause(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from aepo_lite.rl import sweep as sw
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp folder: tmp_path / "ray"
    stops = Path("/proc").is_dir()  # where a failed start-up's processes are stopped (Linux)
    other = tmp_path / "ray" / f"session_2025-12-31_00-00-00_000000_{os.getpid()}"  # another's, left alone
    other.mkdir(parents=True)
    bystander = _sleeper(other)
    startup = Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")
    raylet_err = "(raylet) node_manager.cc: Check failed: Timed out waiting for file /x/metrics_agent_port_0a1b"
    calls, made, left = [], [], []

    def init(**kw):  # each failing attempt makes its session, with a raylet log and a process left running
        calls.append(kw)
        if len(calls) > failures:
            return
        session = tmp_path / "ray" / f"session_2026-01-01_00-00-{len(made):02d}_000000_{os.getpid()}"
        (session / "logs").mkdir(parents=True)
        (session / "logs" / "raylet.err").write_text(raylet_err)
        made.append(session)
        left.append(_sleeper(session))
        raise startup
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    failures = 1  # a first attempt that times out: the second starts, and the failed one's processes are stopped
    sw._init_ray({"num_cpus": 2})
    assert len(calls) == 2 and calls[0]["num_cpus"] == 2 and calls[0]["include_dashboard"] is False
    assert not stops or left[0].wait(timeout=30) != 0
    calls.clear()
    failures = 2
    with pytest.raises(ValueError, match=r"backend: Ray's local node did not start, twice .*timed out during startup"
                                         r".*raylet gave up waiting for Ray's dashboard agent \((.*)/logs/raylet.err\)"
                                         r".*ray-project/ray#65983.*--backend local") as e:
        sw._init_ray({"num_cpus": 2})
    assert e.match(re.escape(f"{made[-1]}/logs/raylet.err"))  # the second attempt's
    assert len(calls) == 2 and len(made) == 3 and (not stops or all(p.wait(timeout=30) != 0 for p in left))
    raylet_err = "another failure"  # no known cause: the failed session's logs are named
    calls.clear()
    with pytest.raises(ValueError, match="see the raylet's log in .*/logs; use --backend local") as e:
        sw._init_ray({"num_cpus": 2})
    assert e.match(re.escape(f"see the raylet's log in {made[-1]}/logs"))
    assert bystander.poll() is None  # a session the start-up did not make keeps its processes
    bystander.kill()
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # any other failure is Ray's own, at once
        sw._init_ray({"num_cpus": 2})
    assert len(calls) == 1
    assert sw._ray_sessions() == {other, *made}
    monkeypatch.delattr("ray._common.utils.get_default_ray_temp_dir")  # a Ray without that private helper
    assert sw._ray_sessions() == set()
