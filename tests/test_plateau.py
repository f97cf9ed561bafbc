"""The regression part of the error budget without draw noise (aepo_lite.toy.plateau): the cross estimator
against Monte Carlo, and the part on a trained run against the particle target's known limits."""
from __future__ import annotations

import json

import pytest
import torch

from aepo_lite.toy import pipeline as TT
from aepo_lite.toy import plateau
from aepo_lite.toy import tasks as toy
from aepo_lite.toy import trained_budget as TB


def test_cross_error_removes_the_noise_of_a_finite_average():
    """Draws y_i = E + bias + noise (sd 1): the plain error of their mean reads sqrt(RMS(bias)^2 + 1/n); the cross
    product of two halves' means reads RMS(bias), the error of the mean target itself, for any n."""
    g = torch.Generator().manual_seed(0)
    m, n = 4000, 8
    E = torch.randn(m, generator=g, dtype=torch.float64)
    logw = torch.randn(m, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.sin(torch.arange(m, dtype=torch.float64))
    truth = toy.energy_error(E + bias, E, logw)
    plain, cross = [], []
    for _ in range(200):
        draws = E + bias + torch.randn(n, m, generator=g, dtype=torch.float64)
        plain.append(toy.energy_error(draws.mean(0), E, logw))
        cross.append(toy.energy_error_cross(draws[: n // 2].mean(0), draws[n // 2:].mean(0), E, logw))
    plain, cross = torch.tensor(plain), torch.tensor(cross)
    # the weighted noise variance of an n-draw mean, centered: sum_w (1 - w) / n ~ 1 / n
    w = torch.softmax(logw, 0)
    noise = float((w * (1 - w)).sum()) / n
    assert float(plain.pow(2).mean()) == pytest.approx(truth**2 + noise, rel=0.03)
    assert float(cross.pow(2).mean()) == pytest.approx(truth**2, rel=0.05)
    assert float(plain.mean()) > 1.1 * truth  # the plain error reads high
    # without noise, the two halves are one function and the cross error is the plain one
    assert toy.energy_error_cross(E + bias, E + bias, E, logw) == pytest.approx(truth, rel=1e-12)
    with pytest.raises(ValueError, match="b"):
        toy.energy_error_cross(E, E[:10], E)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small finished AEPO run (particle target, K = 8) and its stage cache."""
    tmp = tmp_path_factory.mktemp("plateau")
    cfg = TT.make_config("8gaussians", "aepo", "smoke", n_data=2000, behaviour=dict(steps=200),
                         energy=dict(steps=40, posterior="particles"), support={"k": 8},
                         eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000, grid_size=12))
    TT.run_toy(cfg, tmp / "run", cache_dir=tmp / "cache", progress=False, figure=False, budget=False)
    return cfg, tmp


def test_debiased_part_matches_the_plain_one_less_its_noise(trained):
    cfg, tmp = trained
    models = TT.train_toy(cfg, cache_dir=tmp / "cache", progress=False, trained_only=True)
    plain = TB.regression_part(models, draws=256, times=[0.05, 0.5])
    deb = TB.regression_part(models, draws=256, times=[0.05, 0.5], debias=True)
    for t in ("0.05", "0.5"):
        p, d = plain[t], deb[t]
        assert d["vs_exact"] == p["vs_exact"]  # the trained f against E_t: no target involved
        # the plain mean of 256 draws keeps noise sd^2 / 256 (weighted, centered; ~ sd^2 / 256 here)
        assert p["target_bias"] ** 2 == pytest.approx(d["target_bias"] ** 2 + d["target_sd"] ** 2 / 256,
                                                      rel=0.15, abs=1e-4)
        assert d["target_sd"] > 0
    with pytest.raises(ValueError, match="draws"):
        TB.regression_part(models, draws=7, debias=True)


def test_plateau_rows_tell_the_target_from_the_regression_and_render(trained, tmp_path):
    cfg, tmp = trained
    rs = plateau.rows(tmp / "run", tmp / "cache", ks=[1, 8, 64, 2000], draws=16, times=[0.05])
    by_k = {r["k"]: r for r in rs}
    assert set(by_k) == {1, 8, 64, 2000} and all(r["estimator"] == "particles-K8" for r in rs)
    # the particle target's error falls toward 0 as K grows (docs/derivation.md 4b: with every data point as
    # support it is E_t itself; here K points are drawn with replacement from the 2000)
    bias = [float(by_k[k]["target_bias"]) for k in (1, 8, 64, 2000)]
    assert bias == sorted(bias, reverse=True) and bias[-1] < 0.01 < bias[0] and bias[-1] < 0.05 * bias[0]
    noise = [float(by_k[k]["target_sd"]) for k in (1, 8, 64, 2000)]
    assert noise == sorted(noise, reverse=True)
    # the trained f is the same for every K: only its comparison changes
    assert len({r["vs_exact"] for r in rs}) == 1
    # with K = 2000 the target is all but exact, so f vs target is all but f vs E_t
    assert float(by_k[2000]["vs_target"]) == pytest.approx(float(by_k[2000]["vs_exact"]), rel=0.01)
    plateau.write_rows(tmp_path / "p.csv", rs)
    plateau.write_rows(tmp_path / "p.csv", rs[:1])  # a rerun replaces its own rows
    assert len(plateau.read_rows(tmp_path / "p.csv")) == 4
    text = plateau.render(tmp_path / "p.csv", tmp_path)[0].read_text()
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | 16 |" in text
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 1 | 16 |" in text
    mean = text.split("### Mean over t")[1]  # one time here: the means are that time's values
    r8 = by_k[8]
    assert (f"| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | 0.05 | {float(r8['vs_exact']):.4f} | "
            f"{float(r8['vs_target']):.4f} | {float(r8['target_bias']):.4f} |") in mean


def test_plateau_refuses_what_it_cannot_measure(trained, tmp_path):
    cfg, tmp = trained
    with pytest.raises(ValueError, match="ks"):
        plateau.rows(tmp / "run", tmp / "cache", ks=[0])
    with pytest.raises(ValueError, match="cache_dir: .*not a finished behaviour stage"):
        plateau.rows(tmp / "run", tmp_path / "empty-cache")  # nothing is trained here
    with pytest.raises(ValueError, match="config.json"):
        plateau.rows(tmp_path, tmp / "cache")
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps(dict(json.loads((tmp / "run" / "config.json").read_text()),
                                                   method="qgpo")))
    with pytest.raises(ValueError, match="qgpo run, whose energy has no regression target"):
        plateau.rows(q, tmp / "cache")


def test_the_script_writes_the_table_and_names_a_bad_run(trained, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "plateau_budget.py"
    spec = importlib.util.spec_from_file_location("plateau_budget", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg, tmp = trained
    args = ["--cache-dir", str(tmp / "cache"), "--csv", str(tmp_path / "p.csv")]
    assert script.main(["--runs", str(tmp_path), *args]) == 2
    assert "plateau_budget: run_dir:" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    assert script.main(["--runs", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), "--draws", "4", "--times",
                        "0.2", "--csv", str(tmp_path / "p.csv")]) == 0
    assert "K=8 t=0.2" in capsys.readouterr().out
    text = (tmp_path / "toy2d_plateau.md").read_text()
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | 4 |" in text
