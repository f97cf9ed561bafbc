"""Reliability (issue 14): no data loss, no silently wrong result, no traceback for a user's mistake.

One test per fault found by a user, named after the fault."""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from aepo_lite._checks import check_seed
from aepo_lite._io import atomic_write_json, atomic_write_text, read_json, torch_load
from aepo_lite.cli import main
from aepo_lite.cli.errors import run_command
from aepo_lite.rl import report as rl_report
from aepo_lite.toy import report as toy_report

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers: runs, datasets

def _run(folder: Path, method="qgpo", seed=0, scales=(0.1, 1.0), episodes=5, candidates=1, t_max=1.0,
         steps=5, solver="dpmpp2m", preset="bench", ret=100.0) -> Path:
    """A run folder as `aepo-lite train` + `eval` leave it (results.json and config.json)."""
    folder.mkdir(parents=True)
    rows = [{"guidance_scale": float(w), "return_mean": ret + w, "return_std": 1.0,
             "normalized_score_mean": (ret + w) / 10, "normalized_score_std": 0.1, "episodes": episodes,
             "actions_per_s": 50.0, "candidates": candidates, "eval_seed": 0, "sample_steps": steps, "solver": solver,
             "guidance_t_max": t_max, "max_episode_steps": None} for w in scales]
    label = "qgpo" if method == "qgpo" else f"{method}(tweedie/sampled)"
    atomic_write_json(folder / "results.json", {
        "dataset": "t/hopper/medium-v0", "method": method, "label": label, "seed": seed, "preset": preset,
        "transitions": 400, "ref_min_score": 0.0, "ref_max_score": 1000.0, "ref_source": "dataset metadata",
        "dataset_mean_return": 250.0, "rows": rows})
    atomic_write_json(folder / "config.json", {"method": method, "seed": seed, "preset": preset})
    return folder


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("AEPO_POLICY_CACHE", str(tmp_path / "policies"))
    return tmp_path / "minari"


def _episodes(rng, lengths=(5, 7, 4), obs_dim=11, act_dim=3):
    return [{"observations": rng.normal(size=(T + 1, obs_dim)).astype(np.float32),
             "actions": rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
             "rewards": rng.normal(1.0, 0.5, size=T), "terminations": np.r_[np.zeros(T - 1, bool), True],
             "truncations": np.zeros(T, bool)} for T in lengths]


def _write_dataset(name, eps, **kw):
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer
    bufs = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                          terminations=e["terminations"], truncations=e["truncations"], infos={})
            for i, e in enumerate(eps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(name, bufs, env="Hopper-v5", author="t", author_email="t@t", **kw)


def _one_error_line(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"aepo-lite {cmd}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- data loss

def test_rl_results_with_no_runs_found_is_an_error_and_keeps_the_results(tmp_path, capsys):
    figs = tmp_path / "figures"
    _run(tmp_path / "runs" / "a")
    assert main(["rl-results", "--runs", str(tmp_path / "runs"), "--csv", str(figs / "rl_results.csv"),
                 "--figures", str(figs)]) == 0
    saved = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert {"rl_results.csv", "rl_speed.csv", "rl_results.md", "rl_results.png"} <= set(saved)
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for runs in (tmp_path / "runs" / "typo", tmp_path / "empty"):  # a typo, a folder without runs
        rc = main(["rl-results", "--runs", str(runs), "--csv", str(figs / "rl_results.csv"), "--figures", str(figs)])
        assert rc == 2
        line = _one_error_line(capsys.readouterr().err, "rl-results")
        assert str(runs) in line
        assert {p.name: p.read_bytes() for p in figs.iterdir()} == saved  # csv, speed csv, table, figure kept


def test_rl_results_never_replaced_by_fewer_rows_without_force(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "qgpo-s0", seed=0)
    _run(runs / "qgpo-s1", seed=1)
    csv_path = tmp_path / "figs" / "rl_results.csv"
    rows = rl_report.collect([runs], csv_path)
    assert len(rows) == 5  # 2 seeds x 2 scales + the dataset row
    before = csv_path.read_bytes(), csv_path.with_name("rl_speed.csv").read_bytes()
    with pytest.raises(ValueError, match=r"rl_results\.csv holds 5 rows and the runs found give 3; 2 saved rows"):
        rl_report.collect([runs / "qgpo-s0"], csv_path)
    assert (csv_path.read_bytes(), csv_path.with_name("rl_speed.csv").read_bytes()) == before
    assert len(rl_report.collect([runs], csv_path)) == 5  # the same runs again: fine
    _run(runs / "qgpo-s2", seed=2)
    assert len(rl_report.collect([runs], csv_path)) == 7  # more rows: fine
    assert len(rl_report.collect([runs / "qgpo-s0"], csv_path, force=True)) == 3  # on purpose
    with pytest.raises(ValueError, match="give the same row"):  # two copies of one run would count twice
        rl_report.collect([runs / "qgpo-s0", runs / "qgpo-s0" / "results.json"], tmp_path / "x.csv")


def test_rl_results_merge_adds_new_seeds_to_saved_rows_and_refuses_other_numbers(tmp_path):
    runs, csv_path = tmp_path / "runs", tmp_path / "figs" / "rl_results.csv"
    _run(runs / "qgpo-s0", seed=0)
    _run(runs / "qgpo-s1", seed=1)
    rl_report.collect([runs], csv_path)
    saved = rl_report._read(csv_path)
    new = tmp_path / "new"  # the first runs' folders are gone; seed 2 and a rerun of seed 1 are made again
    _run(new / "qgpo-s1", seed=1)
    _run(new / "qgpo-s2", seed=2, scales=(0.1, 1.0, 3.0))
    assert len(rl_report.collect([new], csv_path, merge=True)) == len(saved) + 3  # seed 1, dataset row: once
    both = rl_report._read(csv_path)
    by_seed = sorted((r["seed"], float(r["guidance_scale"])) for r in both if r["method"] == "qgpo")
    assert by_seed == [("0", 0.1), ("0", 1.0), ("1", 0.1), ("1", 1.0), ("2", 0.1), ("2", 1.0), ("2", 3.0)]
    assert [r for r in both if r["seed"] != "2"] == saved  # the saved rows kept as they were, in their order
    before = csv_path.read_bytes()
    _run(tmp_path / "other" / "qgpo-s1", seed=1, ret=90.0)  # the same row with another return: other data or code
    with pytest.raises(ValueError, match=r"merge: the runs give t/hopper/medium-v0 qgpo \(seed 1 at w = 0\.1\) as"):
        rl_report.collect([tmp_path / "other"], csv_path, merge=True)
    res = _run(tmp_path / "remade" / "qgpo-s3", seed=3) / "results.json"  # a new seed on a remade, other dataset
    atomic_write_json(res, {**read_json(res), "dataset_mean_return": 251.0})
    with pytest.raises(ValueError, match=r"medium-v0 dataset \(its dataset's mean return\) as 251\.0 where"):
        rl_report.collect([tmp_path / "remade"], csv_path, merge=True)
    assert csv_path.read_bytes() == before
    with pytest.raises(ValueError, match="merge or force, not both"):
        rl_report.collect([new], csv_path, merge=True, force=True)


def test_rl_results_refuse_runs_of_one_dataset_id_made_from_different_copies(tmp_path):
    """Runs of one id on two copies of a dataset (remade on another CPU: same id, other numbers) would be averaged
    as one dataset's rows: collect names both files and what differs, and writes nothing."""
    csv_path = tmp_path / "figs" / "rl_results.csv"
    for i, change in enumerate(({"dataset_mean_return": 251.0}, {"ref_max_score": 990.0}, {"transitions": 401},
                                {"data_fingerprint": "b" * 16})):
        runs = tmp_path / f"case{i}"
        first = _run(runs / "qgpo-s0", seed=0) / "results.json"
        atomic_write_json(first, {**read_json(first), "data_fingerprint": "a" * 16})
        res = _run(runs / "qgpo-s1", seed=1) / "results.json"
        atomic_write_json(res, {**read_json(res), "data_fingerprint": "a" * 16, **change})
        key = next(iter(change))
        with pytest.raises(ValueError, match=r"qgpo-s0/results\.json and .*qgpo-s1/results\.json were evaluated on "
                                             r"different copies of t/hopper/medium-v0"):
            rl_report.collect([runs], csv_path)
        assert not csv_path.exists()
        atomic_write_json(res, {**read_json(res), key: read_json(first)[key]})
        assert len(rl_report.collect([runs], csv_path)) == 5  # the same copy: collected
        csv_path.unlink()
        csv_path.with_name("rl_speed.csv").unlink()
    # results written before fingerprints were recorded are compared on what they hold
    runs = tmp_path / "older"
    _run(runs / "qgpo-s0", seed=0)
    res = _run(runs / "qgpo-s1", seed=1) / "results.json"
    atomic_write_json(res, {**read_json(res), "data_fingerprint": "c" * 16})
    assert len(rl_report.collect([runs], csv_path)) == 5


# ---------------------------------------------------------------- silently wrong

def _toy_rows(preset, n_eval, distance):
    return [dict(task=t, method=m, estimator="gaussian-fit/sampled" if m == "aepo" else "",
                 critic="none" if m == "bc" else "reward", beta=10.0,
                 guidance_scale=0.0 if m == "bc" else 1.0, seed=s, distance=distance, floor=0.02, preset=preset,
                 n_eval=n_eval, sample_steps=20, solver="dpmpp2m")
            for t in ("moons", "rings") for m in ("aepo", "mse", "bc") for s in (0, 1)]


def test_toy_grid_smoke_rows_never_merge_into_full_rows(tmp_path):
    csv_path = tmp_path / "toy2d_results.csv"
    toy_report.write_results(csv_path, _toy_rows("full", 2000, 0.03))
    toy_report.write_results(csv_path, _toy_rows("smoke", 1000, 0.9))  # same tasks, methods, seeds, beta
    rows = toy_report.read_results(csv_path)
    assert len(rows) == 24 and {r["preset"] for r in rows} == {"full", "smoke"}  # nothing replaced
    assert {r["distance"] for r in rows if r["preset"] == "full"} == {0.03}
    with pytest.raises(ValueError, match="2 different settings"):
        toy_report.summarise(rows)
    groups = toy_report.settings_groups(rows)
    assert [st[0] for st in groups] == ["full", "smoke"]
    s = toy_report.summarise(groups[("full", 2000, 20, "dpmpp2m")])
    assert s[(10.0, "moons", "mse")][0] == pytest.approx(0.03)  # not averaged with the smoke 0.9
    toy_report.render(csv_path, tmp_path)
    table = (tmp_path / "toy2d_table.md").read_text()
    assert "## preset full, 2000 samples" in table and "## preset smoke, 1000 samples" in table
    readme = tmp_path / "README.md"
    toy_report.update_readme(csv_path, readme)
    text = readme.read_text()
    body = text.split("Settings of every row below: preset full")[1].split("What these numbers are not")[0]
    assert "0.030" in body and "0.900" not in body  # the README block is the full preset's alone
    # rows that do not say how they were made are refused, before the file is touched
    before = csv_path.read_bytes()
    old_style = {k: v for k, v in _toy_rows("full", 2000, 0.5)[0].items() if k not in toy_report.SETTINGS}
    with pytest.raises(ValueError, match=r"lacks \['preset', 'n_eval', 'sample_steps', 'solver'\]"):
        toy_report.write_results(csv_path, [old_style])
    assert csv_path.read_bytes() == before


def test_toy_rows_built_from_a_run_carry_its_settings_and_skip_only_the_same_settings(tmp_path):
    from aepo_lite.toy.pipeline import make_config
    cfg = make_config("moons", "mse", "smoke", energy=dict(beta=10.0), sampling=dict(guidance_scales=(1.0,)))
    results = {"task": "moons", "method": "mse", "estimator": "", "critic": "reward", "beta": 10.0, "seed": 0,
               "results": [{"guidance_scale": 1.0, "distance": 0.1, "floor": 0.02}]}
    rows = toy_report.result_rows(results, cfg)
    assert rows[0]["preset"] == "smoke" and rows[0]["n_eval"] == cfg.eval.n_samples
    assert rows[0]["solver"] == cfg.sampling.solver
    csv_path = tmp_path / "r.csv"
    toy_report.write_results(csv_path, rows)
    assert toy_report.config_keys(cfg) <= toy_report.done_keys(csv_path)
    full = make_config("moons", "mse", "full", energy=dict(beta=10.0), sampling=dict(guidance_scales=(1.0,)))
    assert not toy_report.config_keys(full) & toy_report.done_keys(csv_path)  # a smoke row is not a full row


def test_eval_with_other_candidates_or_episodes_never_merges_with_plain_rows(tmp_path):
    runs = tmp_path / "runs"
    for s in (0, 1):
        _run(runs / f"plain-s{s}", seed=s, ret=100.0)
    _run(runs / "best-of-8-s0", seed=0, candidates=8, episodes=1, ret=900.0)  # `eval --candidates 8 --episodes 1`
    _run(runs / "one-episode-s1", seed=1, episodes=1, ret=500.0)  # `eval --episodes 1`
    csv_path = tmp_path / "rl_results.csv"
    rl_report.collect([runs], csv_path)
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert {r["candidates"] for r in got if r["method"] != "dataset"} == {"1", "8"}
    summ = [r for r in rl_report.summary_rows(csv_path) if r["method"] != "dataset" and r["guidance_scale"] == 1.0]
    by = {(r["method"], r["episodes"]): (r["seeds"], r["return_mean"]) for r in summ}
    assert by == {("qgpo", "5"): (2, 101.0), ("qgpo[best-of-8]", "1"): (1, 901.0), ("qgpo", "1"): (1, 501.0)}
    table = rl_report.markdown_table(csv_path)
    # swept at 0.1 and 1, best at 1: the table says it is the largest swept
    assert "| qgpo | 5 ep, dpmpp2m 5 steps | 1 (best, the largest swept) | 2 |" in table
    assert "| qgpo | 1 ep, dpmpp2m 5 steps | 1 (best, the largest swept) | 1 |" in table


def test_best_of_n_at_w0_is_labelled_as_behaviour_samples_ranked_by_the_runs_critic(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "qgpo-s0", seed=0, candidates=16, scales=(0.0, 1.0), ret=300.0)  # QGPO's default: in-support Q
    iql = _run(runs / "qgpo-iql-s0", seed=0, candidates=16, scales=(0.0,), ret=200.0)
    res = json.loads((iql / "results.json").read_text())
    atomic_write_json(iql / "results.json", {**res, "label": "qgpo+iql"})  # `--critic.kind iql`
    _run(runs / "mse-s1", method="mse", seed=1, candidates=4, scales=(0.0,), ret=100.0)  # mse's default: IQL
    csv_path = tmp_path / "rl_results.csv"
    rl_report.collect([runs], csv_path)
    with open(csv_path) as f:
        got = {(r["method"], r["guidance_scale"]): float(r["return_mean"]) for r in csv.DictReader(f)
               if r["method"] != "dataset"}
    # w = 0 reads no energy: the row is the behaviour model's samples ranked by the critic, named after it;
    # with w > 0 the guided run keeps its own label
    assert got == {("bc[best-of-16, insupport Q]", "0.0"): 300.0, ("bc[best-of-16, iql Q]", "0.0"): 200.0,
                   ("qgpo[best-of-16]", "1.0"): 301.0, ("bc[best-of-4, iql Q]", "0.0"): 100.0}
    rl_report.render(csv_path, tmp_path / "fig")  # drawn as lines beside BC's, without failing
    assert "| bc[best-of-4, iql Q] | 5 ep, dpmpp2m 5 steps | 0 (best) | 1 |" in rl_report.markdown_table(csv_path)


def test_committed_results_record_the_settings_they_were_made_with():
    toy = toy_report.read_results(ROOT / "figures" / "toy2d_results.csv")
    assert {(r["preset"], r["n_eval"], r["sample_steps"], r["solver"]) for r in toy} == {("full", 2000, 20, "dpmpp2m")}
    with open(ROOT / "figures" / "rl_results.csv") as f:
        rl = list(csv.DictReader(f))
    assert set(rl[0]) == set(rl_report.COLUMNS)
    runs = [r for r in rl if r["method"] != "dataset"]
    assert {(r["preset"], r["episodes"], r["candidates"], r["sample_steps"], r["solver"]) for r in runs} == \
        {("bench", "5", "1", "5", "dpmpp2m")}
    assert all((float(r["guidance_t_max"]) == 0.5) == ("[t<=0.5]" in r["method"]) for r in runs)
    with open(ROOT / "figures" / "rl_speed.csv") as f:
        assert set(next(csv.DictReader(f))) == set(rl_report.SPEED_COLUMNS)


def test_identical_episode_returns_refuse_the_locomotion_scaling():
    from aepo_lite.rl.data import from_episodes
    eps = _episodes(np.random.default_rng(0), lengths=(4, 4, 4))
    for e in eps:
        e["rewards"] = np.full(4, 0.25)  # every episode returns 1.0: 1000 / span would be ~1e9 or inf
    with pytest.raises(ValueError, match=r"reward_scaling: .*'t/hopper/flat-v0' .*same return.*reward_scaling='none'"):
        from_episodes("t/hopper/flat-v0", eps, -np.ones(3), np.ones(3))
    eps[1]["rewards"] = eps[1]["rewards"] + 1e-7  # rounding noise is not a spread either
    with pytest.raises(ValueError, match="same return"):
        from_episodes("t/hopper/flat-v0", eps, -np.ones(3), np.ones(3))
    d = from_episodes("t/hopper/flat-v0", eps, -np.ones(3), np.ones(3), reward_scaling="none")
    np.testing.assert_allclose(d.scaled_rewards()[:4], 0.25)


# ---------------------------------------------------------------- broken state

@pytest.mark.parametrize("name", ["lo cal/hö pper/random-v0", "../../escape-v0", "local/../../escape-v0",
                                  "local/hopper/random", "/abs/hopper/random-v0", "hopper-v0", "local//x-v0",
                                  "local/" + "h" * 300 + "-v0"])
def test_make_dataset_refuses_a_bad_name_before_any_work(minari_root, tmp_path, capsys, name):
    rc = main(["make-dataset", "--env", "Hopper-v5", "--quality", "random", "--steps", "10", "--name", name])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "make-dataset")
    assert "name:" in line and ("NAMESPACE/NAME-vN" in line or "most file systems allow 255" in line)
    assert not minari_root.exists() and not (tmp_path / "policies").exists()  # nothing was made
    assert not any(p.name == "escape-v0" for p in tmp_path.parent.rglob("escape-v0"))


def test_a_failed_make_leaves_nothing_behind(minari_root, monkeypatch):
    pytest.importorskip("stable_baselines3")
    from aepo_lite.rl import datasets as D
    from aepo_lite.rl.data import load_minari
    kw = dict(train_steps=200, eval_every=100, learning_starts=100, eval_episodes=2, ref_episodes=4, n_envs=4)
    real = D._create

    def create_then_fail(*a):
        real(*a)  # Minari has written the dataset (and its namespaces) ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... and then the disk fills up

    monkeypatch.setattr(D, "_create", create_then_fail)
    with pytest.raises(OSError):
        D.make_dataset(D.DatasetRecipe("Hopper-v5", "random", 60, "new/hopper/random-v0", **kw), progress=False)
    assert not (minari_root / "new").exists()  # neither the dataset nor the namespace it created
    monkeypatch.setattr(D, "_create", real)
    D.make_dataset(D.DatasetRecipe("Hopper-v5", "random", 60, "new/hopper/random-v0", **kw), progress=False)
    before = load_minari("new/hopper/random-v0")[0]
    monkeypatch.setattr(D, "_create", create_then_fail)
    with pytest.raises(OSError):  # --overwrite that fails: the old dataset comes back
        D.make_dataset(D.DatasetRecipe("Hopper-v5", "random", 80, "new/hopper/random-v0", **kw),
                       progress=False, overwrite=True)
    after = load_minari("new/hopper/random-v0")[0]
    assert after.n == before.n == 60
    np.testing.assert_array_equal(after.actions, before.actions)
    assert [p.name for p in (minari_root / "new" / "hopper").iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- tracebacks

@pytest.mark.parametrize("exc, code, fragment", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/runs/x"), 2, "permission denied (/srv/runs/x)"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "runs/file/x"), 2, "runs/file/x is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "figures"), 2, "figures is a folder where a file"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/a/ckpt.pt"), 1, "no space left on the device"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "runs/" + "x" * 300), 2, "file name is too long"),
    (FloatingPointError("aepo_target_first: 3 non-finite values"), 1, "non-finite (aepo_target_first"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1099511627776 bytes."), 1, "out of memory"),
    (MemoryError(), 1, "out of memory"),
    (OSError("Unable to synchronously open file (truncated file: eof = 16484, stored_eof = 32968)"), 1,
     "the file is damaged"),
    (pickle.UnpicklingError("invalid load key, 'x'."), 1, "is damaged"),
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"), 1,
     "is damaged"),
    (ValueError("seed: expected an integer in [0, 2**63-1], got 1e+20"), 2, "seed: expected an integer"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/config.json"), 2, "runs/x/config.json"),
    (KeyError("bogus"), 1, "internal error (KeyError"),
])
def test_cli_failures_are_one_line_without_traceback(exc, code, fragment, capsys, monkeypatch):
    monkeypatch.delenv("AEPO_DEBUG", raising=False)

    def fail():
        raise exc

    assert run_command("train", fail) == code
    line = _one_error_line(capsys.readouterr().err, "train")
    assert fragment in line
    if code == 1 and "internal" in fragment:
        assert "--debug" in line  # a bug: say how to see where


def test_damaged_file_named_from_the_traceback(tmp_path, capsys):
    import torch
    bad = tmp_path / "behaviour.pt"
    bad.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert run_command("eval", lambda: torch.load(bad, weights_only=False)) == 1
    assert str(bad) in _one_error_line(capsys.readouterr().err, "eval")
    with pytest.raises(ValueError, match=r"behaviour\.pt cannot be read .*delete it"):
        torch_load(bad)
    cfg = tmp_path / "config.json"
    cfg.write_text('{"method": "aepo", "se')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*damaged"):
        read_json(cfg)
    cfg.write_text("")
    with pytest.raises(ValueError, match=r"config\.json is empty"):
        read_json(cfg)


def test_debug_flag_or_env_prints_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AEPO_DEBUG", raising=False)
    argv = ["rl-results", "--runs", str(tmp_path / "typo"), "--csv", str(tmp_path / "r.csv"), "--figures", str(tmp_path)]
    assert main(["--debug"] + argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("aepo-lite rl-results: error: runs:")
    monkeypatch.setenv("AEPO_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("AEPO_DEBUG", "0")
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_ends_with_a_short_message_and_130(capsys, monkeypatch):
    monkeypatch.delenv("AEPO_DEBUG", raising=False)

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("toy-grid", interrupted) == 130
    assert "interrupted" in _one_error_line(capsys.readouterr().err, "toy-grid")


def test_cli_error_in_a_real_process_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AEPO_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "aepo_lite", "rl-results", "--runs", str(tmp_path / "typo"),
                        "--csv", str(tmp_path / "r.csv"), "--figures", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2
    _one_error_line(r.stderr, "rl-results")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- unclear messages

@pytest.mark.parametrize("bad", [1e20, -1, 2**63, True, "3", 3.0, None])
def test_seed_check_names_the_seed(bad):
    with pytest.raises(ValueError, match=r"^seed: expected an integer"):
        check_seed("seed", bad)


def test_seed_check_accepts_the_whole_range():
    assert check_seed("seed", 0) == 0 and check_seed("seed", 2**63 - 1) == 2**63 - 1
    assert check_seed("seed", np.int64(7)) == 7


def test_make_dataset_negative_seed_is_named(minari_root, capsys):
    rc = main(["make-dataset", "--env", "Hopper-v5", "--quality", "random", "--steps", "10", "--name",
               "t/hopper/random-v0", "--seed", "-1"])
    assert rc == 2
    assert "seed: expected an integer in [0, " in _one_error_line(capsys.readouterr().err, "make-dataset")
    assert not (minari_root / "t").exists()


def test_truncated_metadata_is_reported_as_damaged_not_as_a_failed_download(minari_root):
    from aepo_lite.rl.data import load_minari
    _write_dataset("t/hopper/meta-v0", _episodes(np.random.default_rng(1)))
    meta = minari_root / "t" / "hopper" / "meta-v0" / "data" / "metadata.json"
    meta.write_text(meta.read_text()[:100])
    with pytest.raises(ValueError, match=r"local copy of 't/hopper/meta-v0' .*damaged.*delete the folder") as e:
        load_minari("t/hopper/meta-v0")
    assert "downloading it failed" not in str(e.value)


def test_a_format_whose_package_is_missing_is_named_not_called_damaged(minari_root, monkeypatch):
    """Minari reads arrow and parquet datasets with pyarrow, which the rl extra does not install: such a copy is
    whole, and the error says what to install instead of telling the user to delete it."""
    from minari.dataset import _storages
    from aepo_lite.rl.data import load_minari
    _write_dataset("t/hopper/arrow-v0", _episodes(np.random.default_rng(1)))
    meta = minari_root / "t" / "hopper" / "arrow-v0" / "data" / "metadata.json"
    meta.write_text(meta.read_text().replace('"data_format": "hdf5"', '"data_format": "arrow"'))

    def no_pyarrow():
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
    monkeypatch.setitem(_storages._registry, "arrow", no_pyarrow)
    with pytest.raises(ValueError, match=r"'t/hopper/arrow-v0' needs a package that is not installed .*pyarrow.*"
                                         r"minari\[arrow\]") as e:
        load_minari("t/hopper/arrow-v0")
    assert "damaged" not in str(e.value) and "delete" not in str(e.value)


def test_truncated_or_garbled_dataset_file_is_named(minari_root):
    from aepo_lite.rl.data import load_minari
    _write_dataset("t/hopper/cut-v0", _episodes(np.random.default_rng(2)))
    h5 = next((minari_root / "t" / "hopper" / "cut-v0" / "data").glob("*.hdf5"))
    raw = h5.read_bytes()
    h5.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"'t/hopper/cut-v0' .*cut-v0 cannot be read \(OSError.*damaged"):
        load_minari("t/hopper/cut-v0")
    h5.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="damaged"):
        load_minari("t/hopper/cut-v0")


def test_folder_left_by_a_failed_make_is_named(minari_root):
    from aepo_lite.rl.data import load_minari
    (minari_root / "t" / "hopper" / "half-v0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"half-v0 exists but holds no Minari dataset.*delete the folder"):
        load_minari("t/hopper/half-v0")


def test_zero_length_or_other_size_episode_is_named():
    from aepo_lite.rl.data import from_episodes
    rng = np.random.default_rng(3)
    eps = _episodes(rng)
    eps[1] = {"observations": rng.normal(size=(1, 11)), "actions": np.zeros((0, 3)), "rewards": np.zeros(0),
              "terminations": np.zeros(0, bool), "truncations": np.zeros(0, bool)}
    with pytest.raises(ValueError, match=r"episode 1 of 'x/hopper/z-v0' is empty"):
        from_episodes("x/hopper/z-v0", eps, -np.ones(3), np.ones(3))
    eps = _episodes(rng)
    eps[2]["observations"] = rng.normal(size=(5, 9))
    with pytest.raises(ValueError, match=r"episode 2 of 'x/hopper/z-v0' has 9-dim observations, episode 0 has 11"):
        from_episodes("x/hopper/z-v0", eps, -np.ones(3), np.ones(3))
    eps = _episodes(rng)
    eps[0]["observations"] = [[0.0, 1.0], [2.0]]  # ragged
    with pytest.raises(ValueError, match=r"episode 0 of 'x/hopper/z-v0' holds arrays that are not"):
        from_episodes("x/hopper/z-v0", eps, -np.ones(3), np.ones(3))


@pytest.mark.parametrize("refs, match", [
    (dict(ref_min_score=5.0, ref_max_score=5.0), "equals ref_min_score"),
    (dict(ref_min_score=50.0, ref_max_score=5.0), "inverted"),
])
def test_reference_score_problems_are_found_when_loading(minari_root, refs, match):
    from aepo_lite.rl.data import load_minari
    _write_dataset("t/hopper/refs-v0", _episodes(np.random.default_rng(4)), **refs)
    with pytest.raises(ValueError, match=rf"'t/hopper/refs-v0' has ref_max_score=.*{match}"):
        load_minari("t/hopper/refs-v0")


def test_reference_score_metadata_checks():
    from aepo_lite.rl.evaluation import check_reference_scores, reference_scores
    with pytest.raises(ValueError, match="has ref_min_score but no ref_max_score"):
        check_reference_scores("a/b-v0", {"ref_min_score": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        check_reference_scores("a/b-v0", {"ref_min_score": 1.0, "ref_max_score": float("inf")})
    with pytest.raises(ValueError, match="not numbers"):
        reference_scores("a/b-v0", {"ref_min_score": "low", "ref_max_score": 2.0})
    assert check_reference_scores("a/b-v0", {"ref_min_score": 1, "ref_max_score": 2}) == (1.0, 2.0)


def test_atomic_writer_cleans_its_temp_file_on_any_exception(tmp_path):
    from aepo_lite import _io
    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": 1})

    def disk_full(f):
        f.write(b"{\"new\": ")
        raise OSError(errno.ENOSPC, "No space left on device")

    def ctrl_c(f):
        raise KeyboardInterrupt

    for writer, exc in ((disk_full, OSError), (ctrl_c, KeyboardInterrupt)):
        with pytest.raises(exc):
            _io._atomic(target, writer)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
        assert read_json(target) == {"old": 1}


def test_a_rerun_keeps_a_json_result_that_agrees_to_the_tolerance_and_rewrites_one_that_moved(tmp_path):
    """What ``make run`` relies on: another CPU's rounding (last digits) leaves the committed file's bytes alone;
    a number that moved, a changed key or string, or a file that is not JSON gets the new result written."""
    from aepo_lite._io import json_close, write_json_unless_close
    target = tmp_path / "checks.json"
    result = {"value": 1.7896938013990804, "n": 3, "ok": True, "xs": [0.0046226682552849814, 0.1], "name": "a"}
    assert write_json_unless_close(target, result, rtol=1e-9)
    before = target.read_bytes()
    rounded = {**result, "value": 1.7896938014047268, "xs": [0.004622668255297343, 0.1]}  # 3e-12 relative
    assert not write_json_unless_close(target, rounded, rtol=1e-9)
    assert target.read_bytes() == before
    for changed in ({**result, "value": 1.7897}, {**result, "xs": [0.0046226682552849814]},
                    {**result, "name": "b"}, {**result, "ok": False}, {**result, "extra": 1}):
        assert write_json_unless_close(target, changed, rtol=1e-9)
        assert read_json(target) == changed
    target.write_text("{not json")
    assert write_json_unless_close(target, result, rtol=1e-9) and read_json(target) == result
    # zero is compared exactly (no absolute slack), booleans are not numbers, ints and floats alike
    assert not json_close(0.0, 1e-300, rtol=1e-9) and not json_close(True, 1, rtol=1e-9)
    assert json_close(3, 3.0, rtol=0.0) and json_close({"a": [1.0]}, {"a": [1.0 + 1e-12]}, rtol=1e-9)
    # an absolute tolerance for residuals that are rounding themselves (3.9e-13 on one CPU, 1.2e-12 on another)
    residual = {**result, "res": 3.9e-13}
    assert write_json_unless_close(target, residual, rtol=1e-9)
    assert write_json_unless_close(target, {**residual, "res": 1.2e-12}, rtol=1e-9)  # relative: moved
    assert not write_json_unless_close(target, {**residual, "res": 3.9e-13}, rtol=1e-9, atol=1e-10)
    assert json_close(0.0, 1e-11, rtol=0.0, atol=1e-10) and not json_close(0.0, 1e-9, rtol=0.0, atol=1e-10)


def test_orphan_temp_of_a_killed_writer_is_removed_at_the_next_write(tmp_path):
    target = tmp_path / "metrics.json"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from aepo_lite import _io; "
            "_io._atomic(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), print('writing', flush=True), "
            "time.sleep(600)))")
    p = subprocess.Popen([sys.executable, "-c", code, str(target), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    orphans = list(tmp_path.glob(".metrics.json.*.tmp"))
    assert len(orphans) == 1 and not target.exists()  # SIGKILL: nobody could clean up
    recent = tmp_path / ".metrics.json.x1.999999999.tmp"  # a writer that started a moment ago
    recent.write_bytes(b"in progress")
    alive = tmp_path / f".metrics.json.x2.{os.getpid()}.tmp"  # an old temp whose writer still runs
    alive.write_bytes(b"in progress")
    old = time.time() - 3600
    for q in (orphans[0], alive):
        os.utime(q, (old, old))
    atomic_write_text(target, "{}\n")
    assert not orphans[0].exists() and recent.exists() and alive.exists()
    assert target.read_text() == "{}\n"


# ---------------------------------------------------------------- found by scripts/fault_campaign.py
# Each test is named after a case of the campaign that was not refused cleanly; each failed before its fix.

def test_sweep_command_parses_its_options(tmp_path, capsys):
    """`aepo-lite sweep ...` (any options) was an internal NameError: tyro could not resolve SweepConfig."""
    assert main(["sweep", "--datasets", "a/hopper/b-v0", "--methods", "foo", "--out", str(tmp_path / "s")]) == 2
    assert "methods: unknown method(s) ['foo']" in _one_error_line(capsys.readouterr().err, "sweep")
    assert main(["sweep", "--help"]) == 0
    assert "--overrides" in capsys.readouterr().out


@pytest.mark.parametrize("argv, cmd, named", [
    (["train", "--preset", "smoke", "--seed", "abc"], "train", "Error parsing --seed"),
    (["train", "--preset", "smoke", "--energy.bta", "3"], "train", "perhaps you meant --energy.beta"),
    (["toy", "--preset", "smoke", "--bogus"], "toy", "--bogus"),
    (["eval", "--run", "x", "--eval.envs", "many"], "eval", "--eval.envs"),
    (["bench", "--tiny", "--seed", "x"], "bench", "--seed"),
    (["demo", "--scale", "huge"], "demo", "'--scale'"),
    (["sweep", "--seeds", "x"], "sweep", "--seeds"),
])
def test_a_bad_flag_of_a_config_command_is_one_line_naming_the_flag(argv, cmd, named, capsys, monkeypatch):
    """tyro's usage errors were a box of 5-12 lines (with the flag's help text) on stderr."""
    monkeypatch.delenv("AEPO_DEBUG", raising=False)
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, cmd)
    assert named in line and f"(see aepo-lite {cmd} --help)" in line


@pytest.mark.parametrize("argv, prog, named", [
    (["toy-grid", "--seeds", "x"], "aepo-lite toy-grid", "argument --seeds: invalid int value: 'x'"),
    (["toy-grid", "--bogus"], "aepo-lite toy-grid", "unrecognized arguments: --bogus"),
    (["make-dataset", "--steps", "3"], "aepo-lite make-dataset", "required: --env, --quality, --name"),
    (["lab", "--port", "x"], "aepo-lite lab", "argument --port"),
    (["nosuchcmd"], "aepo-lite", "invalid choice: 'nosuchcmd'"),
    (["train", "--dataset", "a/b/c-v0", "--preset"], "aepo-lite train", "argument --preset: expected one argument"),
    (["eval", "--run"], "aepo-lite eval", "argument --run: expected one argument"),
])
def test_a_usage_error_of_an_argparse_command_is_one_line_naming_the_command(argv, prog, named, capsys):
    """argparse printed its usage block before the error; an unknown option was reported by `aepo-lite` (not the
    command), and `train --preset` without a value by a parser calling itself `__main__.py`."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits; a config command's pre-parser's exit is main's return value
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and named in lines[0], err


@pytest.mark.parametrize("over, named", [
    (dict(critic=dict(gamma=2.0)), "critic.gamma"), (dict(critic=dict(tau_target=5.0)), "critic.tau_target"),
    (dict(critic=dict(expectile=1.5)), "critic.expectile"), (dict(critic=dict(beta_q=-1.0)), "critic.beta_q"),
    (dict(energy=dict(clip=-1.0)), "energy.clip"), (dict(energy=dict(clip=float("nan"))), "energy.clip"),
    (dict(energy=dict(grad_clip=0.0)), "energy.grad_clip"), (dict(energy=dict(cover=2.0)), "energy.cover"),
    (dict(eval=dict(max_episode_steps=0)), "eval.max_episode_steps"),
    (dict(eval=dict(max_episode_steps=-1)), "eval.max_episode_steps"),
])
def test_critic_clip_and_episode_settings_are_refused_before_any_data_is_read(over, named):
    """A negative clip or a zero gradient clip trained anyway (silently wrong), a NaN clip crashed inside eigh,
    -1 episode steps evaluated, and gamma/tau/expectile were refused only after loading the data, without the part."""
    from aepo_lite.rl.agent import make_config
    with pytest.raises(ValueError, match=rf"^{named}: expected"):
        make_config("t/hopper/none-v0", "qgpo", "smoke", **over)


def test_a_network_too_large_for_memory_is_refused_before_allocating_it():
    """--behaviour.hidden 100000000 allocated (and initialised) gigabytes for minutes instead of refusing."""
    from aepo_lite.rl.agent import make_config
    with pytest.raises(ValueError, match=r"^behaviour\.hidden: 100000000 needs about .* GiB"):
        make_config("t/hopper/none-v0", "bc", "smoke", behaviour=dict(hidden=10**8))
    with pytest.raises(ValueError, match=r"^critic\.batch: "):
        make_config("t/hopper/none-v0", "aepo", "smoke", critic=dict(batch=10**12))
    make_config("t/hopper/none-v0", "aepo", "full")  # QGPO's sizes pass


@pytest.mark.parametrize("saved, named", [
    ({"energy": {"beta": "x"}}, "energy.beta: expected a number, got 'x'"),
    ({"sampling": {"guidance_scales": "1 2"}}, "sampling.guidance_scales: expected a list"),
    ({"eval": {"max_episode_steps": "a"}}, "eval.max_episode_steps: expected an integer, got 'a'"),
    ({"compile": 1}, "compile: expected true or false"),
])
def test_a_config_file_value_of_the_wrong_type_names_the_field(saved, named, tmp_path, capsys):
    """`"beta": "x"` in --config FILE reached check_config and was an internal TypeError."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(saved))
    assert main(["train", "--preset", "smoke", "--dataset", "a/b/c-v0", "--config", str(cfg)]) == 2
    assert named in _one_error_line(capsys.readouterr().err, "train")


def _fake_run(folder: Path, method: str) -> Path:
    """A run folder with its config.json and nothing trained (no checkpoints, no dataset)."""
    from aepo_lite.config import to_dict
    from aepo_lite.rl.agent import make_config
    folder.mkdir(parents=True)
    atomic_write_json(folder / "config.json", to_dict(make_config("t/hopper/none-v0", method, "smoke")))
    return folder


@pytest.mark.parametrize("content", ["[1, 2]", '{"rows": 5}'])
def test_eval_refuses_a_results_file_that_is_not_results_and_keeps_it(content, tmp_path, capsys):
    """results.json holding a list (or rows that are not a list) was an internal AttributeError/TypeError."""
    run = _fake_run(tmp_path / "r", "qgpo")
    (run / "results.json").write_text(content)
    assert main(["eval", "--quiet", "--run", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"{run / 'results.json'} is not a results file" in line
    assert (run / "results.json").read_text() == content


def test_eval_of_a_bc_run_at_guidance_scales_is_refused_not_evaluated_at_0(tmp_path, capsys):
    """`eval --run BC --sampling.guidance-scales 1 2` evaluated only w=0 and exited 0 (silently wrong)."""
    run = _fake_run(tmp_path / "bc", "bc")
    assert main(["eval", "--quiet", "--run", str(run), "--sampling.guidance-scales", "1", "2"]) == 2
    assert "sampling.guidance_scales: the bc method has no energy" in _one_error_line(capsys.readouterr().err, "eval")
    assert main(["eval", "--quiet", "--run", str(run)]) == 2  # its own saved scales are not a request
    assert "bc method" not in capsys.readouterr().err


def test_rl_results_checks_the_readme_and_figures_folder_before_writing_anything(tmp_path, capsys):
    """A README without the rl block (or --figures naming a file) was refused after the CSV had been rewritten."""
    _run(tmp_path / "runs" / "a")
    (tmp_path / "R.md").write_text("# mine\n")
    (tmp_path / "f").write_text("keep")
    base = ["rl-results", "--runs", str(tmp_path / "runs"), "--csv", str(tmp_path / "figs" / "rl_results.csv")]
    assert main(base + ["--figures", str(tmp_path / "figs"), "--readme", str(tmp_path / "R.md")]) == 2
    assert "R.md has no <!-- rl:start -->" in _one_error_line(capsys.readouterr().err, "rl-results")
    assert main(base + ["--figures", str(tmp_path / "f")]) == 2
    assert "figures: " in _one_error_line(capsys.readouterr().err, "rl-results")
    assert not (tmp_path / "figs").exists() and (tmp_path / "R.md").read_text() == "# mine\n"
    assert (tmp_path / "f").read_text() == "keep"


def test_rl_results_row_without_a_field_or_a_garbled_csv_is_named(tmp_path, capsys):
    """A results row without return_mean was an internal KeyError; a CSV of binary junk a bare UnicodeDecodeError."""
    run = _run(tmp_path / "runs" / "a")
    res = read_json(run / "results.json")
    for row in res["rows"]:
        del row["return_mean"]
    atomic_write_json(run / "results.json", res)
    with pytest.raises(ValueError, match=r"results\.json has an evaluation row without the field 'return_mean'"):
        rl_report.collect([tmp_path / "runs"], tmp_path / "r.csv")
    _run(tmp_path / "good" / "a")
    (tmp_path / "r.csv").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(ValueError, match=r"r\.csv is not a readable CSV file"):
        rl_report.collect([tmp_path / "good"], tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_bytes() == b"\x00\xff" * 50


def test_binary_junk_in_a_results_csv_names_the_file(tmp_path, capsys):
    """toy-grid --render-only on a CSV of binary junk said only "'utf-8' codec can't decode byte 0xff"."""
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(b"\x00\xff" * 300)
    assert main(["toy-grid", "--render-only", "--csv", str(csv_path), "--figures-dir", str(tmp_path / "f"),
                 "--readme", ""]) == 1
    assert f"{csv_path} is not readable text or CSV" in _one_error_line(capsys.readouterr().err, "toy-grid")


def test_a_csv_of_ones_own_never_rewrites_the_projects_tables_or_readme(tmp_path, monkeypatch, capsys):
    """toy-grid and toy-convergence on a CSV elsewhere rendered into figures/ (and toy-grid rewrote README.md's toy
    block) by default, replacing the project's tables with those of a few rows."""
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "mine"
    toy_report.write_results(own / "grid.csv", _toy_rows("full", 2000, 0.03))
    cols = ["task", "method", "estimator", "critic", "beta", "seed", "preset", "energy_steps", "err_0.05", "err_0.2",
            "err_0.5", "err_mean", "distance", "draws", "floor", "energy_seconds"]
    rows = [dict(zip(cols, ["moons", "qgpo", "", "reward", 10, 0, "full", n, e, e, e, e, 0.02, 1, 0.01, 1.0]))
            for n, e in ((1000, 0.2), (2000, 0.1))]
    with open(own / "conv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    assert main(["toy-grid", "--render-only", "--csv", str(own / "grid.csv")]) == 0
    assert main(["toy-convergence", "--render-only", "--csv", str(own / "conv.csv")]) == 0
    assert (own / "grid" / "toy2d_table.md").exists() and (own / "toy2d_convergence.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no figures/, no README.md
    assert "README" not in capsys.readouterr().out


def test_figures_in_a_folder_without_results_is_one_line(tmp_path):
    """An empty --figures-dir printed one line per missing results file (three lines)."""
    from aepo_lite.cli.figures import PARTS
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "aepo_lite", "figures", "--figures-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    line = _one_error_line(r.stderr, "figures")
    assert all(p.results in line and p.made_by in line for p in PARTS if not p.optional)


def test_lab_check_without_notebooks_is_refused_not_a_pass(tmp_path, monkeypatch, capsys):
    """`lab --check --root EMPTY` ran no notebook, called that a pass and started JupyterLab."""
    from aepo_lite.course import lab

    def no_server(*a, **k):
        raise AssertionError("a server was started")

    monkeypatch.setattr(lab.subprocess, "Popen", no_server)
    assert main(["lab", "--no-browser", "--check", "--root", str(tmp_path)]) == 2
    assert "holds no chapters" in _one_error_line(capsys.readouterr().err, "lab")


def test_demo_seed_beyond_the_range_is_named(tmp_path, capsys):
    """`demo --seed 1e20` said only "Overflow when unpacking long long"."""
    assert main(["demo", "--scale", "smoke", "--seed", str(10**20), "--out", str(tmp_path / "o")]) == 2
    assert "seed: expected an integer in [0, 2**63-1]" in _one_error_line(capsys.readouterr().err, "demo")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw, named", [
    (dict(preset="huge"), "preset: expected one of"), (dict(datasets=("../../x",)), "'../../x' is not a Minari"),
    (dict(gpus_per_run=-1.0), "gpus_per_run"), (dict(overrides="OVER"), "energy.betta: not a config field"),
])
def test_sweep_settings_and_overrides_are_checked_before_the_first_run(kw, named, tmp_path):
    """A bad preset or override failed every run one by one (exit 1, the reason in each log), and a malformed id
    or a negative GPU fraction was accepted."""
    from aepo_lite.rl.sweep import SweepConfig, plan
    (tmp_path / "o.json").write_text('{"energy": {"betta": 3}}')
    kw = {k: str(tmp_path / "o.json") if v == "OVER" else v for k, v in kw.items()}
    cfg = dict(dict(datasets=("t/hopper/none-v0",), methods=("bc",), seeds=(0,), out=str(tmp_path / "s")), **kw)
    with pytest.raises(ValueError, match=re.escape(named)):
        plan(SweepConfig(**cfg))


def test_sweep_with_no_available_dataset_is_an_error(tmp_path, monkeypatch):
    """Every dataset unavailable: the sweep ran nothing and exited 0."""
    from aepo_lite.rl.sweep import SweepConfig, run_sweep
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = SweepConfig(datasets=("nobody/hopper/none-v0",), methods=("bc",), seeds=(0,), out=str(tmp_path / "s"))
    with pytest.raises(ValueError, match=r"datasets: none of the sweep's datasets is available here \(nobody/"):
        run_sweep(cfg, echo=lambda *a: None)


def test_a_full_disk_names_the_file_being_written(tmp_path, capsys):
    """On a full disk, torch.save and savefig raise ENOSPC without a file name: "while writing a file"."""
    from aepo_lite import _io
    target = tmp_path / "checkpoints" / "behaviour.pt"

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        _io._atomic(target, disk_full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert run_command("train", lambda: _io._atomic(target, disk_full)) == 1
    assert f"no space left on the device while writing ({target})" in _one_error_line(capsys.readouterr().err, "train")
    assert list(target.parent.iterdir()) == []


def test_rl_speed_csv_does_not_depend_on_the_order_the_runs_are_given(tmp_path):
    """Collecting the same runs as `--runs a b` and as `--runs b a` rewrote rl_speed.csv in another order (on a
    full disk the campaign saw the saved file "changed" by a collection of the very runs it was made from)."""
    runs = [_run(tmp_path / "runs" / f"qgpo-s{s}", seed=s) for s in (0, 1)]
    for r in runs:
        atomic_write_json(r / "train_stats.json", {"behaviour": {"steps": 60, "seconds": 1.0, "steps_per_s": 60.0}})
    first, second = tmp_path / "a" / "rl_results.csv", tmp_path / "b" / "rl_results.csv"
    rl_report.collect(runs, first)
    rl_report.collect(runs[::-1], second)
    assert first.read_bytes() == second.read_bytes()
    assert first.with_name("rl_speed.csv").read_bytes() == second.with_name("rl_speed.csv").read_bytes()


def test_lab_without_the_course_packages_is_one_line(monkeypatch, capsys):
    """The missing-packages refusal of `aepo-lite lab` was two lines (the error, then how to install)."""
    from aepo_lite.course import lab
    monkeypatch.setattr(lab, "missing_packages", lambda: ["jupyterlab"])
    assert main(["lab", "--no-browser"]) == 2
    line = _one_error_line(capsys.readouterr().err, "lab")
    assert "jupyterlab" in line and "pip install -e '.[course]'" in line


def test_a_file_where_a_folder_is_needed_is_named_as_such(tmp_path, capsys):
    """`--out FILE` (or `--out FILE/x`) said "FILE already exists: remove it or choose another path"."""
    (tmp_path / "f").write_text("keep")
    for target in (tmp_path / "f", tmp_path / "f" / "x"):
        assert run_command("train", lambda: atomic_write_json(target / "config.json", {})) == 2
        line = _one_error_line(capsys.readouterr().err, "train")
        assert f"{tmp_path / 'f'} is a file where a folder is needed" in line or "is a file, not a folder" in line
    assert (tmp_path / "f").read_text() == "keep"


def test_an_output_file_that_is_a_folder_is_named_without_the_temporary_file(tmp_path, capsys):
    """`--save-config DIR` named the writer's hidden temporary file: ".DIR.x1y2.123.tmp -> DIR is a folder"."""
    (tmp_path / "d").mkdir()
    assert run_command("train", lambda: atomic_write_json(tmp_path / "d", {})) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"{tmp_path / 'd'} is a folder where a file was expected" in line and ".tmp" not in line
    assert list((tmp_path / "d").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_eval_of_a_folder_that_is_not_a_run_makes_nothing(tmp_path):
    """`eval --run TYPO` made the folder TYPO (and TYPO/.lock) before saying it holds no run."""
    from aepo_lite.rl.agent import evaluate_run
    with pytest.raises(ValueError, match=r"has no config\.json \(not an aepo-lite run directory\)"):
        evaluate_run(tmp_path / "typo", progress=False)
    assert not (tmp_path / "typo").exists()


def test_a_results_csv_that_is_a_folder_is_named_as_a_folder(tmp_path):
    """`toy-grid --render-only --csv DIR` said that DIR does not exist."""
    (tmp_path / "t.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"t\.csv is a folder, not a CSV file"):
        toy_report.read_results(tmp_path / "t.csv")


def test_make_dataset_without_a_ladder_snapshot_is_refused_before_any_work(minari_root, tmp_path):
    """--eval-every beyond --train-steps was found after the reference episodes and the whole TD3 ladder."""
    from aepo_lite.rl.datasets import DatasetRecipe, make_dataset
    r = DatasetRecipe("Hopper-v5", "random", 50, "t/hopper/new-v0", train_steps=200, eval_every=5000,
                      learning_starts=100, ref_episodes=2)
    with pytest.raises(ValueError, match=r"^eval_every: 5000 is more than train_steps \(200\)"):
        make_dataset(r, progress=False)
    assert not minari_root.exists() and not (tmp_path / "policies").exists()


def test_a_run_folder_whose_config_json_writes_3_for_3_0_is_the_same_run(tmp_path):
    """A config.json with `"beta": 3` (a hand edit, another tool) was "another run, energy.beta=3 there vs 3.0 now"."""
    from aepo_lite.config import config_diff, to_dict
    from aepo_lite.rl.agent import EVAL_FIELDS, make_config
    from aepo_lite.training.stages import check_run_folder
    new = to_dict(make_config("t/hopper/none-v0", "qgpo", "smoke"))
    old = json.loads(json.dumps(new))
    old["energy"]["beta"], old["sampling"]["guidance_scales"] = 3, [0, 1]
    atomic_write_json(tmp_path / "config.json", old)
    check_run_folder(tmp_path, new, ignore=EVAL_FIELDS)  # no error
    old["energy"]["beta"], old["seed"] = 3.5, True  # a real difference is still one (and True is not 1)
    assert config_diff(old, dict(new, seed=1)) == ["energy.beta", "seed"]


@pytest.mark.parametrize("out, named", [("d", "is a folder where a file was expected"), ("f/b.json", "is a file")])
def test_bench_out_is_checked_before_the_bench_runs(out, named, tmp_path, capsys, monkeypatch):
    """`bench --out DIR` (or FILE/x.json) ran the whole bench (an hour at full size), then failed to write."""
    from aepo_lite import bench

    def no_bench(*a, **k):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(bench, "run_bench", no_bench)
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("keep")
    assert main(["bench", "--tiny", "--out", str(tmp_path / out)]) == 2
    assert named in _one_error_line(capsys.readouterr().err, "bench")
    assert (tmp_path / "f").read_text() == "keep" and list((tmp_path / "d").iterdir()) == []


def test_a_cut_rl_results_csv_is_named_not_a_renderer_crash(tmp_path):
    """`figures` on an rl_results.csv cut mid-row: the renderer crashed with "TypeError: '<' not supported between
    instances of 'NoneType' and 'str'" (the cut row's missing cells)."""
    csv_path = tmp_path / "rl_results.csv"
    csv_path.write_bytes((ROOT / "figures" / "rl_results.csv").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"rl_results\.csv line \d+ does not have the header's 13\+ cells"):
        rl_report.render(csv_path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl_results.csv"]


_POOL_SCRIPT = """
import os, sys, time
from aepo_lite._procs import process_pool

def work(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(120)

if __name__ == "__main__":
    with process_pool(1) as pool:
        pool.submit(work, sys.argv[1]).result()
"""


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_pool_workers_stop_when_the_parent_is_killed(tmp_path):
    """A sweep or a toy grid killed with SIGTERM takes its spawned workers with it (they would go on training)."""
    script, pid_file = tmp_path / "pool.py", tmp_path / "worker.pid"
    script.write_text(_POOL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
