"""Training on a toy task (smoke sizes), the toy CLI's bad-input handling, and the report made from a CSV."""
import json
import math

import pytest
import torch

from aepo_lite.toy import tasks as toy
from aepo_lite.toy import report as toy_report
from aepo_lite.toy import pipeline as TT
from aepo_lite.cli import main

TINY = dict(n_data=4000, bc_steps=250, bc_hidden=64, critic_steps=150, critic_hidden=64, energy_steps=150,
            energy_hidden=64, n_eval=500, grid_size=12, n_ref_data=2000, sample_steps=8, pool_size=10_000,
            error_times=(0.1,), n_mc=8)


def test_smoke_training_guides_towards_the_reward(tmp_path):
    torch.set_num_threads(1)
    base = dict(task="moons", beta=10.0, guidance_scales=(0.0, 1.0), **TINY)
    m_bc = TT.evaluate_toy(TT.train_toy(TT.make_config("smoke", method="bc", **base), cache_dir=tmp_path, progress=False))
    behaviour_reward = m_bc["results"][0]["mean_reward"]
    assert abs(behaviour_reward - 0.5) < 0.1  # half the moons data is rewarded
    for method in ("aepo", "cep"):
        cfg = TT.make_config("smoke", method=method, estimator="gaussian-fit-sampled", **base)
        m = TT.evaluate_toy(TT.train_toy(cfg, cache_dir=tmp_path, progress=False))
        r0, r1 = (r["mean_reward"] for r in m["results"])
        assert abs(r0 - behaviour_reward) < 0.08, method  # w = 0 is the behaviour model
        assert r1 > behaviour_reward + 0.15, (method, r1)  # guidance moves mass to the rewarded moon
        if method == "cep":  # and, for CEP at this tiny scale, towards the exact target
            assert m["results"][1]["distance"] < 0.7 * m_bc["results"][0]["distance"], method
        assert set(m["energy_error"]) == {"0.1"} and math.isfinite(m["energy_error"]["0.1"])
    # the behaviour stage was cached once and reused (one checkpoint per task)
    assert len(list((tmp_path / "moons").glob("behaviour-*.pt"))) == 1


def test_stages_resume_from_checkpoints(tmp_path):
    cfg = TT.make_config("smoke", task="8gaussians", method="mse", beta=3.0, **dict(TINY, bc_steps=20, energy_steps=20))
    m1 = TT.train_toy(cfg, cache_dir=tmp_path, progress=False)
    files = sorted(p.name for p in (tmp_path / "8gaussians").iterdir())
    assert any(f.startswith("behaviour-") for f in files) and any(f.startswith("energy-mse-") for f in files)
    m2 = TT.train_toy(cfg, cache_dir=tmp_path, progress=False)  # loads, does not retrain
    assert m2.info == m1.info
    for a, b in zip(m1.energy.parameters(), m2.energy.parameters()):
        assert torch.equal(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="known tasks"):
        TT.make_config("smoke", task="nope")
    with pytest.raises(ValueError, match="beta"):
        TT.make_config("smoke", beta=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        TT.make_config("smoke", guidance_scales=(1.0, float("nan")))
    with pytest.raises(ValueError, match="estimator"):
        TT.make_config("smoke", estimator="tweedie-third")
    with pytest.raises(ValueError, match="method"):
        TT.make_config("smoke", method="qgpo")
    with pytest.raises(ValueError, match="n_eval.*GiB"):
        TT.make_config("smoke", n_eval=10**11)
    with pytest.raises(ValueError, match="grid"):
        TT.make_config("smoke", grid_size=10**6)
    with pytest.raises(ValueError, match="preset"):
        TT.make_config("huge")
    assert TT.parse_estimator("gaussian-fit-second") == ("gaussian-fit", "second")


@pytest.mark.parametrize("argv, msg", [
    (["toy", "--task", "spiral", "--method", "aepo", "--beta", "10"], "known tasks: swissroll"),
    (["toy", "--task", "moons", "--method", "aepo", "--beta", "-1"], "beta"),
    (["toy", "--task", "moons", "--method", "aepo", "--beta", "10", "--guidance-scale", "nan"], "guidance_scale"),
    (["toy", "--task", "moons", "--method", "aepo", "--beta", "10", "--n-eval", "100000000000"], "n_eval"),
    (["toy", "--task", "moons", "--method", "aepo", "--beta", "10", "--grid-size", "1000000"], "grid"),
    (["toy-grid", "--tasks", "moons", "nope", "--betas", "10"], "known tasks"),
])
def test_cli_bad_input_fails_before_training(argv, msg, tmp_path, capsys):
    rc = main(argv + (["--cache-dir", str(tmp_path)] if argv[0] == "toy" else ["--csv", str(tmp_path / "r.csv")]))
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.pt"))  # nothing was trained


def test_cli_toy_writes_metrics_and_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(TT.PRESETS, "smoke", dict(TT.PRESETS["smoke"], **dict(TINY, bc_steps=30, energy_steps=30)))
    out = tmp_path / "run"
    rc = main(["toy", "--task", "checkerboard", "--method", "mse", "--beta", "3", "--guidance-scale", "0.5", "1",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["guidance_scale"] for r in m["results"]] == [0.5, 1.0]
    for r in m["results"]:
        assert {"distance", "floor", "mean_reward"} <= set(r) and r["floor"] > 0
    assert (out / "figure.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["beta"] == 3.0


def _rows():
    rows = []
    for task in ("moons", "rings"):
        for seed in (0, 1, 2):
            floor = 0.02
            rows += [dict(task=task, method="aepo", estimator="gaussian-fit-sampled", beta=10, guidance_scale=1,
                          seed=seed, distance=0.03 + 0.001 * seed, floor=floor),
                     dict(task=task, method="aepo", estimator="tweedie-first", beta=10, guidance_scale=1,
                          seed=seed, distance=0.5, floor=floor),
                     dict(task=task, method="mse", estimator="", beta=10, guidance_scale=1, seed=seed,
                          distance=0.2, floor=floor),
                     dict(task=task, method="cep", estimator="", beta=10, guidance_scale=1, seed=seed,
                          distance=0.05, floor=floor),
                     dict(task=task, method="bc", estimator="", beta=10, guidance_scale=0, seed=seed,
                          distance=0.6, floor=floor)]
    return [dict(r, preset="full", n_eval=2000, sample_steps=20, solver="dpmpp2m") for r in rows]


def test_report_from_csv_alone(tmp_path):
    csv = tmp_path / "toy2d_results.csv"
    toy_report.write_results(csv, _rows()[:10])
    toy_report.write_results(csv, _rows())  # merging replaces, never duplicates
    rows = toy_report.read_results(csv)
    assert len(rows) == 30
    assert csv.read_text().splitlines()[0] == ("task,method,estimator,beta,guidance_scale,seed,distance,floor,"
                                               "preset,n_eval,sample_steps,solver")
    best, score = toy_report.best_estimator(rows)
    assert best == "gaussian-fit-sampled" and score[best][0] == pytest.approx(1.55, abs=1e-9)
    paths = toy_report.render(csv, tmp_path / "figs")
    table = (tmp_path / "figs" / "toy2d_table.md").read_text()
    assert "| moons | 0.020 | 0.031 ± 0.001 (3) | 0.050 ± 0.000 (3) | 0.200 ± 0.000 (3) | 0.600 ± 0.000 (3) | yes | yes |" in table
    assert "within 2x of the floor on 2 of 2 tasks; below MSE on 2 of 2 tasks" in table
    assert all(p.exists() for p in paths)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- toy:start -->\nold\n<!-- toy:end -->\n\nafter\n")
    toy_report.update_readme(csv, readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- toy:start -->") and text.endswith("<!-- toy:end -->\n\nafter\n")
    assert "old" not in text and "`gaussian-fit-sampled`" in text and "not the paper's" in text
    with pytest.raises(FileNotFoundError):
        toy_report.read_results(tmp_path / "missing.csv")
