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
from conftest import load_script


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
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | run's | 16 |" in text
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 1 | run's | 16 |" in text
    mean = text.split("### Mean over t")[1]  # one time here: the means are that time's values
    r8 = by_k[8]
    assert (f"| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | run's | 0.05 | "
            f"{float(r8['vs_exact']):.4f} | {float(r8['vs_target']):.4f} | {float(r8['target_bias']):.4f} | "
            f"{float(r8['grad_vs_exact']):.2f} |") in mean


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
                                                   method="bc")))
    with pytest.raises(ValueError, match="bc run, which trains no energy"):
        plateau.rows(q, tmp / "cache")


def test_the_script_writes_the_table_and_names_a_bad_run(trained, tmp_path, capsys):
    script = load_script("plateau_budget")
    cfg, tmp = trained
    args = ["--cache-dir", str(tmp / "cache"), "--csv", str(tmp_path / "p.csv")]
    assert script.main(["--runs", str(tmp_path), *args]) == 2
    assert "plateau_budget: run_dir:" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    assert script.main(["--runs", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), "--draws", "4", "--times",
                        "0.2", "--csv", str(tmp_path / "p.csv")]) == 0
    assert "K=8 t=0.2" in capsys.readouterr().out
    q = tmp_path / "qgpo"  # a qgpo run prints '-' for the target columns it has not
    TT.run_toy(TT.make_config("8gaussians", "qgpo", "smoke", n_data=2000, behaviour=dict(steps=200),
                              energy=dict(steps=20), support={"k": 8},
                              eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000, grid_size=12)),
               q, cache_dir=tmp / "cache", progress=False, figure=False, budget=False)
    assert script.main(["--runs", str(q), "--cache-dir", str(tmp / "cache"), "--times", "0.2", "--csv",
                        str(tmp_path / "p.csv")]) == 0
    assert "f vs target -, target vs E_t -" in capsys.readouterr().out
    text = (tmp_path / "toy2d_plateau.md").read_text()
    assert "| 8gaussians | aepo(particles-K8) (reward) | 0 | 40 | 8 (run's) | run's | 4 |" in text


def test_gradient_error_against_closed_forms():
    """A gradient scaled by 1 + a is off by a; no gradient is off by 1; errors where the weights vanish do not
    count; a zero reference is refused."""
    g = torch.Generator().manual_seed(1)
    gE = torch.randn(500, 2, generator=g, dtype=torch.float64)
    logw = torch.randn(500, generator=g, dtype=torch.float64)
    assert toy.gradient_error(1.5 * gE, gE, logw) == pytest.approx(0.5, rel=1e-12)
    assert toy.gradient_error(torch.zeros_like(gE), gE) == pytest.approx(1.0, rel=1e-12)
    off = gE.clone()
    off[:250] += 100.0
    logw2 = torch.cat([torch.full((250,), -1e4, dtype=torch.float64), logw[250:]])
    assert toy.gradient_error(off, gE, logw2) < 1e-12
    # against a hand-weighted sum
    w = torch.softmax(logw, 0)
    d = torch.randn(500, 2, generator=g, dtype=torch.float64)
    want = float((w * d.pow(2).sum(1)).sum().sqrt() / (w * gE.pow(2).sum(1)).sum().sqrt())
    assert toy.gradient_error(gE + d, gE, logw) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="grad_E"):
        toy.gradient_error(gE, torch.zeros_like(gE))
    with pytest.raises(ValueError, match="grad_E"):
        toy.gradient_error(gE, gE[:10])


def test_gradient_part_reads_the_exact_energy_as_exact(trained):
    """An energy that returns the exact E_t (autograd through its closed form) has no gradient error against the
    closed-form grad E_t; an energy of zero has error 1."""
    import dataclasses

    cfg, tmp = trained
    models = TT.train_toy(cfg, cache_dir=tmp / "cache", progress=False, trained_only=True)
    x, e = models.x[:cfg.eval.n_ref_data], models.e[:cfg.eval.n_ref_data]

    class Exact(torch.nn.Module):
        def forward(self, s, a, t):
            return toy.exact_intermediate_energy(a, float(t[0]), x, e, cfg.energy.beta, models.behaviour.schedule)

    class Zero(torch.nn.Module):
        def forward(self, s, a, t):
            return 0.0 * a.sum(-1)

    exact = TB.gradient_part(dataclasses.replace(models, energy=Exact()), times=[0.05, 0.5])
    zero = TB.gradient_part(dataclasses.replace(models, energy=Zero()), times=[0.05, 0.5])
    assert set(exact) == {"0.05", "0.5"} and max(exact.values()) < 1e-4
    assert all(v == pytest.approx(1.0, rel=1e-9) for v in zero.values())
    trained_f = TB.gradient_part(models, times=[0.05])["0.05"]
    assert 0.0 < trained_f < 10.0


@pytest.fixture(scope="module")
def trained_on_critic(tmp_path_factory):
    """The small particle run of ``trained``, on a fitted critic trained briefly (so that it is visibly off)."""
    tmp = tmp_path_factory.mktemp("plateau-critic")
    cfg = TT.make_config("8gaussians", "aepo", "smoke", n_data=2000, behaviour=dict(steps=200),
                         critic=dict(kind="regression", steps=30), energy=dict(steps=40, posterior="particles"),
                         support={"k": 8}, eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000, grid_size=12))
    TT.run_toy(cfg, tmp / "run", cache_dir=tmp / "cache", progress=False, figure=False, budget=False)
    return cfg, tmp


def test_true_reward_rows_split_the_critic_from_the_target(trained_on_critic, trained, tmp_path):
    """With every data point as support, the particle target is E_t of whatever Q it reads: with the true reward
    E_t itself (bias near 0), with the critic E_t of the critic's values, whose distance from E_t is known in
    closed form (:func:`aepo_lite.toy.tasks.exact_intermediate_energy` of the critic's Q at the data)."""
    from aepo_lite.toy.pipeline import BOX, data_q

    cfg, tmp = trained_on_critic
    rs = plateau.rows(tmp / "run", tmp / "cache", ks=[2000], draws=16, times=[0.05], true_reward=True)
    by_q = {r["target_q"]: r for r in rs}
    assert set(by_q) == {"", "reward"} and all(r["critic"] == "regression" and r["critic_steps"] == 30 for r in rs)
    assert by_q[""]["vs_exact"] == by_q["reward"]["vs_exact"]  # one trained f, two targets
    assert by_q[""]["grad_vs_exact"] == by_q["reward"]["grad_vs_exact"]
    assert float(by_q["reward"]["target_bias"]) < 0.02
    models = TT.train_toy(cfg, cache_dir=tmp / "cache", progress=False, trained_only=True)
    pts, _ = toy.make_grid(cfg.eval.grid_size, BOX)
    x, e, q = models.x, models.e, data_q(models)
    sched = models.behaviour.schedule
    E, logp = toy.exact_intermediate_energy(pts, 0.05, x, e, cfg.energy.beta, sched, return_log_density=True)
    E_critic = toy.exact_intermediate_energy(pts, 0.05, x, q, cfg.energy.beta, sched)
    want = toy.energy_error(E_critic, E, logp)
    assert want > 0.1  # the critic is visibly off: the check below can fail
    assert float(by_q[""]["target_bias"]) == pytest.approx(want, rel=0.1)
    plateau.write_rows(tmp_path / "p.csv", rs)
    text = plateau.render(tmp_path / "p.csv", tmp_path)[0].read_text()
    assert "(regression, 30 steps) | 0 | 40 | 2000 | true reward | 16 |" in text
    with pytest.raises(ValueError, match="true_reward"):
        plateau.rows(trained[1] / "run", trained[1] / "cache", true_reward=True)  # a run on the true reward


def test_a_qgpo_run_gets_its_error_and_gradient_error_alone(tmp_path):
    """QGPO's contrastive energy has no regression target: its rows hold f against E_t (as the convergence table
    computes it) and the gradient error, the target columns blank and rendered as '-'."""
    cfg = TT.make_config("8gaussians", "qgpo", "smoke", n_data=2000, behaviour=dict(steps=200), energy=dict(steps=40),
                         support={"k": 8}, eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000, grid_size=12))
    TT.run_toy(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, figure=False, budget=False)
    rs = plateau.rows(tmp_path / "run", tmp_path / "cache", times=[0.05, 0.2])
    assert [r["t"] for r in rs] == ["0.05", "0.2"]
    assert all(r["vs_target"] == r["target_bias"] == r["target_sd"] == r["draws"] == "" for r in rs)
    models = TT.train_toy(cfg, cache_dir=tmp_path / "cache", progress=False, trained_only=True)
    assert float(rs[1]["vs_exact"]) == pytest.approx(TB.regression_part(models, times=[0.2])["0.2"]["vs_exact"],
                                                     abs=1e-6)
    assert float(rs[1]["grad_vs_exact"]) == pytest.approx(TB.gradient_part(models, times=[0.2])["0.2"], abs=1e-6)
    with pytest.raises(ValueError, match="ks: .*qgpo run"):
        plateau.rows(tmp_path / "run", tmp_path / "cache", ks=[4])
    plateau.write_rows(tmp_path / "p.csv", rs)
    text = plateau.render(tmp_path / "p.csv", tmp_path)[0].read_text()
    assert f"| 8gaussians | qgpo (reward) | 0 | 40 | - | - | - | {float(rs[0]['vs_exact']):.3f} | - | - | - |" in text
    mean = text.split("### Mean over t")[1]
    assert "| 8gaussians | qgpo (reward) | 0 | 40 | - | - | 0.05, 0.2 |" in mean and "| - | - |" in mean


def test_band_distance_runs_from_the_exact_energy_to_the_run_itself(trained):
    """An empty band is part 5's draw (the exact grad E_t at every step); a band over every t is the run's own draw
    at w = 1; a band in between lies on neither (here: it changes the samples)."""
    cfg, tmp = trained
    models = TT.train_toy(cfg, cache_dir=tmp / "cache", progress=False, trained_only=True)
    target = TT.draw_target(cfg, 0)
    none, xs_none = TB.band_distance(models, 0.3, 0.3)
    assert none == pytest.approx(TB._sampler_distance(models, target, 0), rel=1e-6)
    every, xs_every = TB.band_distance(models, 0.0, 2.0)
    run, _, xs_run, _ = TT.draw_distance(models, 1.0, 0, target)
    assert every == pytest.approx(run, rel=1e-6) and torch.allclose(xs_every, xs_run)
    _, xs_mid = TB.band_distance(models, 0.3, 0.7)
    assert not torch.allclose(xs_mid, xs_none) and not torch.allclose(xs_mid, xs_every)
    for bad, match in (((0.5, 0.2), "hi"), ((-0.1, 0.2), "lo"), ((0.0, float("nan")), "hi")):
        with pytest.raises(ValueError, match=match):
            TB.band_distance(models, *bad)
    with pytest.raises(ValueError, match="d: "):
        TB.band_distance(models, 0.0, 0.5, d=cfg.eval.draws)


def test_toy_bands_script_prints_each_band_and_names_bad_bands(trained, capsys):
    script = load_script("toy_bands")
    cfg, tmp = trained
    args = ["--runs", str(tmp / "run"), "--cache-dir", str(tmp / "cache")]
    assert script.main([*args, "--bands", "0", "0.5", "1", "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "exact energy: distance" in out and "trained on [0, 0.5): distance" in out
    assert "trained on [0.5, 1]: distance" in out and "x > 0 " in out
    with pytest.raises(SystemExit):
        script.main([*args, "--bands", "0.5", "0.1"])
    assert "--bands" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*args, "--sampler-steps", "10", "0"])
    assert "--sampler-steps" in capsys.readouterr().err


def test_toy_bands_at_other_sampler_steps_and_on_a_run_without_an_energy(trained, tmp_path, capsys):
    """--sampler-steps draws each row again at those steps (the run's own count gives the plain call's numbers);
    a bc run on the same behaviour model has only the exact energy's row, and it is the AEPO run's exact row."""
    script = load_script("toy_bands")
    cfg, tmp = trained
    args = ["--runs", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), "--bands", "0", "1"]
    assert script.main(args) == 0
    plain = capsys.readouterr().out.splitlines()[1:]
    assert script.main([*args, "--sampler-steps", str(cfg.sampling.steps), "3"]) == 0
    out = capsys.readouterr().out.splitlines()[1:]
    assert out[0] == f" {cfg.sampling.steps} sampler steps ({cfg.sampling.solver}):" and out[1:4] == plain
    assert out[4] == f" 3 sampler steps ({cfg.sampling.solver}):" and len(out) == 8 and out[5:8] != plain
    bc = TT.make_config("8gaussians", "bc", "smoke", n_data=2000, behaviour=dict(steps=200),
                        energy=dict(beta=cfg.energy.beta), eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000,
                                                                      grid_size=12))
    TT.run_toy(bc, tmp_path / "bc", cache_dir=tmp / "cache", progress=False, figure=False, budget=False)
    assert script.main(["--runs", str(tmp_path / "bc"), "--cache-dir", str(tmp / "cache"), "--bands", "0", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == plain[:1]  # the exact energy's row alone, the same draw
    models = TT.train_toy(bc, cache_dir=tmp / "cache", progress=False, trained_only=True)
    with pytest.raises(ValueError, match="no trained energy"):
        TB.band_distance(models, 0.0, 0.5)
