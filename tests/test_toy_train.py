"""Toy runs on the stage mechanism (tiny sizes): guidance towards the exact target, one shared behaviour
checkpoint per task, matched reward access, run folders never overwritten, the toy CLI and the report."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aepo_lite.cli import main
from aepo_lite.config import PRESETS
from aepo_lite.toy import pipeline as TT
from aepo_lite.toy import report as toy_report
from aepo_lite.toy import tasks as toy

TINY = dict(n_data=4000, log_every=50, checkpoint_every=100,
            behaviour=dict(steps=250, hidden=64), critic=dict(steps=150, hidden=64),
            energy=dict(steps=150, hidden=64, n_samples=8, beta=10.0),
            eval=dict(n_samples=500, grid_size=12, n_ref_data=2000, pool_size=10_000, error_times=(0.1,)),
            sampling=dict(steps=8, guidance_scales=(0.0, 1.0)))


def _tiny(**over):
    """TINY with nested ``over`` merged into it."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            out[k] = dict(out.get(k, {}), **v)
        else:
            out[k] = v
    return out


def _cfg(task, method, **over):
    return TT.make_config(task, method, "smoke", **_tiny(**over))


def test_smoke_training_guides_towards_the_exact_target(tmp_path):
    torch.set_num_threads(1)
    m_bc = TT.evaluate_toy(TT.train_toy(_cfg("moons", "bc"), cache_dir=tmp_path, progress=False))
    behaviour_reward, bc_distance = m_bc["results"][0]["mean_reward"], m_bc["results"][0]["distance"]
    assert abs(behaviour_reward - 0.5) < 0.1  # half the moons data is rewarded
    assert m_bc["target_mean_reward"] > 0.95  # beta = 10 puts (almost) all mass on the rewarded moon
    runs = {"aepo": _cfg("moons", "aepo"), "qgpo": _cfg("moons", "qgpo"),
            "aepo [fitted Q]": _cfg("moons", "aepo", critic=dict(kind="regression")),
            "aepo [particles, centered]": _cfg("moons", "aepo", energy=dict(posterior="particles", centered=True,
                                                                            cover=0.0, batch=16))}
    for name, cfg in runs.items():
        m = TT.evaluate_toy(TT.train_toy(cfg, cache_dir=tmp_path, progress=False))
        (r0, r1) = m["results"]
        assert abs(r0["mean_reward"] - behaviour_reward) < 0.08, name  # w = 0 is the behaviour model
        assert r1["mean_reward"] > behaviour_reward + 0.1, (name, r1)  # guidance moves mass to the rewarded moon
        assert r1["distance"] < 0.95 * bc_distance, (name, r1["distance"], bc_distance)  # and towards the target
        if name == "qgpo":  # QGPO's contrastive energy, at this tiny scale, most of the way
            assert r1["distance"] < 0.75 * bc_distance, (r1["distance"], bc_distance)
        assert set(m["energy_error"]) == {"0.1"} and math.isfinite(m["energy_error"]["0.1"])
        assert m["critic"] == cfg.critic.kind and m["label"] == TT.estimator_label(cfg)
    # one behaviour model for the task, one fitted critic (only the regression run trained it)
    assert len(list((tmp_path / "moons").glob("behaviour-*.pt"))) == 1
    assert len(list((tmp_path / "moons").glob("critic-*.pt"))) == 1
    assert len(list((tmp_path / "moons").glob("energy-*.pt"))) == 4


def test_runs_differing_in_method_and_seed_share_one_behaviour_checkpoint(tmp_path):
    a = _cfg("8gaussians", "mse", behaviour=dict(steps=30), energy=dict(steps=20, beta=3.0))
    b = _cfg("8gaussians", "qgpo", seed=1, behaviour=dict(steps=30), energy=dict(steps=20, beta=3.0))
    m_a = TT.train_toy(a, cache_dir=tmp_path, progress=False)
    files = sorted((tmp_path / "8gaussians").glob("behaviour-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    m_b = TT.train_toy(b, cache_dir=tmp_path, progress=False)
    assert sorted((tmp_path / "8gaussians").glob("behaviour-*.pt")) == files
    assert files[0].stat().st_mtime_ns == stamp  # loaded, not trained again
    assert m_b.info["behaviour"] == m_a.info["behaviour"]
    for p, q in zip(m_a.behaviour.parameters(), m_b.behaviour.parameters()):
        assert torch.equal(p, q)
    assert len(list((tmp_path / "8gaussians").glob("energy-*.pt"))) == 2  # one energy per method and seed
    # a second call loads every stage: same stats, same weights
    m_a2 = TT.train_toy(a, cache_dir=tmp_path, progress=False)
    assert m_a2.info == m_a.info
    for p, q in zip(m_a.energy.parameters(), m_a2.energy.parameters()):
        assert torch.equal(p, q)


def test_an_energy_that_does_not_read_the_behaviour_model_is_shared_across_behaviour_models(tmp_path):
    """QGPO's and the in-support targets' energies read data points and Q, never eps_theta: a run with a behaviour
    model trained longer loads them (the same weights as training them again would give); the Gaussian target's
    reads eps_theta, so it trains again."""
    over = dict(energy=dict(steps=20, beta=3.0), support={"k": 4})
    part = dict(posterior="particles", centered=True, cover=0, batch=16)
    energies = lambda: sorted((tmp_path / "moons").glob("energy-*.pt"))  # noqa: E731
    for method, energy, shared in (("qgpo", {}, True), ("aepo", part, True), ("aepo", {}, False)):
        cfgs = [_cfg("moons", method, behaviour=dict(steps=n), **{**over, "energy": {**over["energy"], **energy}})
                for n in (30, 40)]
        before = energies()
        short = TT.train_toy(cfgs[0], cache_dir=tmp_path, progress=False)
        after_short = energies()
        long = TT.train_toy(cfgs[1], cache_dir=tmp_path, progress=False)
        assert len(after_short) == len(before) + 1
        assert len(energies()) == len(after_short) + (0 if shared else 1), (method, energy)
        assert not torch.equal(next(short.behaviour.parameters()), next(long.behaviour.parameters()))
        same = all(torch.equal(p, q) for p, q in zip(short.energy.parameters(), long.energy.parameters()))
        assert same == shared, (method, energy)
        if energy:
            loaded = long.energy
    # what it loaded is what training it beside the longer behaviour model gives
    particles = _cfg("moons", "aepo", behaviour=dict(steps=40), **{**over, "energy": {**over["energy"], **part}})
    fresh = TT.train_toy(particles, cache_dir=tmp_path / "fresh", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(fresh.energy.parameters(), loaded.parameters()))


@pytest.mark.parametrize("method,critic", [("aepo", "regression"), ("qgpo", "reward")])
def test_captured_toy_training_is_the_plain_training(tmp_path, method, critic):
    """capture=True (each step, batch draw included, through CapturedStep; eager on the CPU): the toy presets'
    decaying rates stepped between steps, every stage ends bit for bit where the plain run's does, and its
    stats say how it ran. Separate caches, so nothing is loaded from the other run."""
    over = dict(behaviour=dict(steps=30), critic=dict(kind=critic, steps=20), energy=dict(steps=20, beta=3.0))
    plain = TT.train_toy(_cfg("moons", method, **over), cache_dir=tmp_path / "plain", progress=False)
    cap = TT.train_toy(_cfg("moons", method, capture=True, **over), cache_dir=tmp_path / "cap", progress=False)
    nets = ["behaviour", "energy"] + (["critic"] if critic == "regression" else [])
    for net in nets:
        for x, y in zip(getattr(plain, net).parameters(), getattr(cap, net).parameters()):
            assert torch.equal(x, y), net
        assert "capture" not in plain.info[net]
        how = cap.info[net]["capture"]  # the toy's Gaussian posterior too: Jacobi sweeps, unchecked solves
        assert how == "eager (no CUDA graphs on cpu); no host synchronisation found, so it should capture on CUDA"
    assert TT.make_config("moons", method, "smoke").energy.lr_decay  # the schedule was there to step


@pytest.mark.parametrize("energy", [{}, dict(posterior="particles", centered=True, cover=0, batch=64)],
                         ids=["gaussian", "particles-centered"])
def test_a_killed_energy_stage_resumes_to_the_same_weights(tmp_path, monkeypatch, energy):
    cfg = _cfg("swissroll", "aepo", checkpoint_every=20, behaviour=dict(steps=20), energy=dict(steps=50, **energy),
               support=dict(k=64))
    whole = TT.train_toy(cfg, cache_dir=tmp_path / "whole", progress=False)
    real = TT._energy_batches

    def dies_at_step_30(cfg, m, device):
        batches, calls = real(cfg, m, device), [0]

        def batch(g):
            calls[0] += 1
            if calls[0] == 30:
                raise RuntimeError("killed")
            return batches(g)
        return batch

    monkeypatch.setattr(TT, "_energy_batches", dies_at_step_30)
    with pytest.raises(RuntimeError, match="killed"):
        TT.train_toy(cfg, cache_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(TT, "_energy_batches", real)
    resumed = TT.train_toy(cfg, cache_dir=tmp_path / "killed", progress=False)
    assert resumed.info["energy"]["resumed_from"] == 20
    for p, q in zip(whole.energy.parameters(), resumed.energy.parameters()):
        assert torch.equal(p, q)


def _on_data(points, x):
    """For each point (n, 2): whether it is exactly one of the data points x (N, 2)."""
    return (points[:, None, :] == x[None]).all(-1).any(1).tolist()


def _energy_batch(cfg):
    """The energy stage's first batch (the critic, if any, untrained: only which Q is read matters here)."""
    x, e = TT._data(cfg, torch.device("cpu"))
    m = TT._models(cfg, x, e, torch.device("cpu"))
    stage = TT.build_stages(cfg, m, torch.device("cpu"))[-1]
    assert stage.name == "energy"
    return m, stage.batches(torch.Generator().manual_seed(0))


def test_matched_reward_access_in_the_energy_batches():
    task = toy.get_task("rings")
    # qgpo with the true reward: K data points per group and e at them
    cfg = _cfg("rings", "qgpo", support=dict(k=5), energy=dict(batch=7))
    m, batch = _energy_batch(cfg)
    assert m.critic is None and batch["support"].shape == (7, 5, 2)
    assert torch.equal(batch["support_q"], task.reward(batch["support"].reshape(-1, 2)).reshape(7, 5))
    assert all(_on_data(batch["support"].reshape(-1, 2), m.x))  # data points
    # qgpo with the fitted critic: Q at the same kind of points is the critic's value
    cfg = _cfg("rings", "qgpo", support=dict(k=5), energy=dict(batch=7), critic=dict(kind="regression"))
    m, batch = _energy_batch(cfg)
    with torch.no_grad():
        want = m.critic(batch["support"].reshape(-1, 2)).reshape(7, 5)
    assert torch.allclose(batch["support_q"], want)
    # AEPO's particle posterior reads support points with their rewards; cover points fill the rest of "a"
    cfg = _cfg("rings", "aepo", support=dict(k=3), energy=dict(batch=8, posterior="particles", cover=0.25))
    m, batch = _energy_batch(cfg)
    assert batch["a"].shape == (8, 2) and batch["support"].shape == (8, 3, 2)
    assert torch.equal(batch["support_q"], task.reward(batch["support"].reshape(-1, 2)).reshape(8, 3))
    assert _on_data(batch["a"], m.x) == [True] * 6 + [False] * 2  # round(0.25 * 8) = 2 uniform box points
    # the Gaussian posterior reads no support
    assert "support" not in _energy_batch(_cfg("rings", "aepo"))[1]


def test_gradient_targets_need_the_fitted_critic():
    for energy in (dict(expansion="first"), dict(expansion="second"), dict(posterior="mixture")):
        with pytest.raises(ValueError, match=r"critic\.kind: AEPO's .* differentiates Q"):
            _cfg("moons", "aepo", energy=energy)
        cfg = _cfg("moons", "aepo", energy=energy, critic=dict(kind="regression"))
        assert TT.needs_grad_q(cfg) and TT.uses_critic(cfg)
    for energy in (dict(expansion="sampled"), dict(posterior="particles")):
        assert not TT.needs_grad_q(_cfg("moons", "aepo", energy=energy))
    with pytest.raises(ValueError, match=r"critic\.activation"):
        _cfg("moons", "aepo", energy=dict(expansion="first"), critic=dict(kind="regression", activation="relu"))
    assert TT.estimator_label(_cfg("moons", "aepo")) == "aepo(gaussian-fit/sampled)"
    assert TT.estimator_label(_cfg("moons", "aepo", energy=dict(posterior="particles"))) == "aepo(particles-K16)"
    assert TT.estimator_label(_cfg("moons", "qgpo")) == "qgpo"


@pytest.mark.parametrize("over, msg", [
    (dict(task="nope"), "task: unknown toy task 'nope'; known tasks"),
    (dict(method="cep"), "method: expected one of"),
    (dict(energy=dict(beta=-1.0)), r"energy\.beta"),
    (dict(energy=dict(beta=float("nan"))), r"energy\.beta"),
    (dict(sampling=dict(guidance_scales=(1.0, float("nan")))), r"sampling\.guidance_scales"),
    (dict(sampling=dict(guidance_scales=())), r"sampling\.guidance_scales"),
    (dict(energy=dict(covariance="full")), r"energy\.covariance"),
    (dict(energy=dict(cover=1.5)), r"energy\.cover"),
    (dict(energy=dict(baseline="value")), r"energy\.baseline"),
    (dict(energy=dict(centered=True)), r"energy\.centered: .*particles or mixture, not gaussian"),
    (dict(energy=dict(posterior="particles", centered=True, cover=0.25)), r"energy\.cover: the centered"),
    (dict(critic=dict(kind="iql")), r"critic\.kind"),
    (dict(eval=dict(n_samples=10**11)), r"eval\.n_samples.*GiB"),
    (dict(eval=dict(grid_size=10**6)), r"eval\.grid_size"),
    (dict(eval=dict(error_times=(2.0,))), r"eval\.error_times"),
    (dict(eval=dict(n_ref_data=10**5)), r"eval\.n_ref_data"),
    (dict(behaviour=dict(lr=0.0)), r"behaviour\.lr"),
    (dict(energy=dict(steps=0)), r"energy\.steps"),
    (dict(seed=-1), "seed"),
    (dict(device="tpu"), "device"),
])
def test_config_validation_names_the_field(over, msg):
    task, method = over.pop("task", "moons"), over.pop("method", "aepo")
    with pytest.raises(ValueError, match=msg):
        TT.make_config(task, method, "smoke", **_tiny(**over))


def test_preset_names_are_checked():
    with pytest.raises(ValueError, match="preset"):
        TT.make_config("moons", "aepo", "huge")


def test_default_run_folders_name_what_makes_runs_distinct():
    base = dict(task="moons", method="aepo")
    variants = [base, dict(base, task="rings"), dict(base, method="mse"), dict(base, seed=1),
                dict(base, energy=dict(beta=3.0)), dict(base, energy=dict(covariance="tweedie")),
                dict(base, critic=dict(kind="regression")), dict(base, preset="full")]
    outs = set()
    for v in variants:
        v = dict(v)
        cfg = TT.make_config(v.pop("task"), v.pop("method"), v.pop("preset", "smoke"), **v)
        outs.add(TT.default_out(cfg))
    assert len(outs) == len(variants)
    cfg = TT.make_config("moons", "aepo", "smoke", critic=dict(kind="regression"))
    assert str(TT.default_out(cfg, "r")) == "r/moons/aepo-gaussian-fit-sampled-b10-regression-smoke-s0"


def test_a_run_folder_holding_another_run_is_refused(tmp_path):
    cfg = _cfg("checkerboard", "mse", behaviour=dict(steps=20), energy=dict(steps=20, beta=3.0),
               sampling=dict(guidance_scales=(1.0,)))
    out = tmp_path / "run"
    res = TT.run_toy(cfg, out, cache_dir=tmp_path / "cache", progress=False, figure=False)
    saved = (out / "results.json").read_text()
    assert json.loads(saved)["results"][0]["distance"] == res["results"][0]["distance"]
    assert {json.loads(ln)["stage"] for ln in (out / "metrics.jsonl").read_text().splitlines()} == {"behaviour",
                                                                                                      "energy"}
    other = _cfg("checkerboard", "mse", behaviour=dict(steps=20), energy=dict(steps=20, beta=5.0),
                 sampling=dict(guidance_scales=(1.0,)))
    with pytest.raises(ValueError, match=r"out: .* holds another run, made with a different config \(energy\.beta=3\.0 there vs 5\.0 now\)"):
        TT.run_toy(other, out, cache_dir=tmp_path / "cache", progress=False, figure=False)
    assert (out / "results.json").read_text() == saved
    again = TT.run_toy(cfg, out, cache_dir=tmp_path / "cache", progress=False, figure=False)  # the same run: fine
    assert [r["distance"] for r in again["results"]] == [r["distance"] for r in res["results"]]


@pytest.fixture
def tiny_smoke(monkeypatch):
    """The toy smoke preset at TINY sizes (the CLI starts from a preset)."""
    monkeypatch.setitem(PRESETS["toy"], "smoke", _tiny(behaviour=dict(steps=30), critic=dict(steps=20),
                                                       energy=dict(steps=30, beta=10.0)))


def test_cli_toy_writes_results_and_figure(tmp_path, tiny_smoke, capsys):
    out = tmp_path / "run"
    rc = main(["toy", "--preset", "smoke", "--task", "checkerboard", "--method", "mse", "--energy.beta", "3",
               "--sampling.guidance-scales", "0.5", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("preset: smoke") and "checkerboard mse (Q: reward) beta=3 w=0.5" in text
    res = json.loads((out / "results.json").read_text())
    assert [r["guidance_scale"] for r in res["results"]] == [0.5, 1.0]
    for r in res["results"]:
        assert {"distance", "floor", "mean_reward"} <= set(r) and r["floor"] > 0
    assert (out / "figure.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["energy"]["beta"] == 3.0 and cfg["preset"] == "smoke" and cfg["critic"]["kind"] == "reward"


@pytest.mark.parametrize("argv, msg", [
    (["--task", "spiral"], "known tasks: swissroll"),
    (["--energy.beta", "-1"], "energy.beta"),
    (["--sampling.guidance-scales", "nan"], "sampling.guidance_scales"),
    (["--eval.n-samples", "100000000000"], "eval.n_samples"),
    (["--eval.grid-size", "1000000"], "eval.grid_size"),
    (["--energy.expansion", "first"], "critic.kind"),
    (["--method", "cep"], "method"),
])
def test_cli_bad_input_fails_before_training(argv, msg, tmp_path, capsys):
    rc = main(["toy", "--preset", "smoke", "--task", "moons", "--method", "aepo", *argv,
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing was trained


def test_toy_grid_runs_each_critic_and_skips_finished_rows(tmp_path, tiny_smoke, capsys):
    argv = ["toy-grid", "--tasks", "moons", "--methods", "mse", "bc", "--critic", "reward", "regression",
            "--betas", "3", "--seeds", "0", "--preset", "smoke", "--csv", str(tmp_path / "r.csv"),
            "--figures-dir", str(tmp_path / "figs"), "--readme", "", "--cache-dir", str(tmp_path / "cache"),
            "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert main(argv) == 0
    rows = toy_report.read_results(tmp_path / "r.csv")
    assert sorted((r["method"], r["critic"], r["guidance_scale"]) for r in rows) == [
        ("bc", "none", 0.0), ("mse", "regression", 1.0), ("mse", "reward", 1.0)]
    assert capsys.readouterr().out.count("] moons/") == 3
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("results.json")}
    assert len(stamps) == 3
    assert main(argv) == 0  # a rerun: every row is there, nothing runs
    assert "] moons/" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert toy_report.read_results(tmp_path / "r.csv") == rows
    assert main(["toy-grid", "--tasks", "moons", "nope", "--betas", "10", "--csv", str(tmp_path / "x.csv")]) == 2
    assert "known tasks" in capsys.readouterr().err


def _rows():
    rows = []
    for task in ("moons", "rings"):
        for seed in (0, 1, 2):
            floor = 0.02
            rows += [dict(task=task, method="aepo", estimator="gaussian-fit/sampled", critic="reward", beta=10,
                          guidance_scale=1, seed=seed, distance=0.03 + 0.001 * seed, floor=floor),
                     dict(task=task, method="aepo", estimator="tweedie/first", critic="regression", beta=10,
                          guidance_scale=1, seed=seed, distance=0.5, floor=floor),
                     dict(task=task, method="mse", estimator="", critic="reward", beta=10, guidance_scale=1,
                          seed=seed, distance=0.2, floor=floor),
                     dict(task=task, method="mse", estimator="", critic="regression", beta=10, guidance_scale=1,
                          seed=seed, distance=0.4, floor=floor),
                     dict(task=task, method="qgpo", estimator="", critic="reward", beta=10, guidance_scale=1,
                          seed=seed, distance=0.05, floor=floor),
                     dict(task=task, method="bc", estimator="", critic="none", beta=10, guidance_scale=0, seed=seed,
                          distance=0.6, floor=floor)]
    return [dict(r, preset="full", n_eval=2000, sample_steps=20, solver="dpmpp2m") for r in rows]


def test_report_from_csv_alone(tmp_path):
    csv = tmp_path / "toy2d_results.csv"
    toy_report.write_results(csv, _rows()[:10])
    toy_report.write_results(csv, _rows())  # merging replaces, never duplicates; rows of two critics both stay
    rows = toy_report.read_results(csv)
    assert len(rows) == 36
    assert csv.read_text().splitlines()[0] == ("task,method,estimator,critic,beta,guidance_scale,seed,distance,floor,"
                                               "draws,preset,n_eval,sample_steps,solver")
    assert {r["draws"] for r in rows} == {1}  # rows built without draws hold one (as the CSVs made before it)
    best, score = toy_report.best_estimator(rows)
    assert best == "aepo(gaussian-fit/sampled)" and score[best][0] == pytest.approx(1.55, abs=1e-9)
    assert score["aepo(tweedie/first) [fitted Q]"][0] == pytest.approx(25.0)
    paths = toy_report.render(csv, tmp_path / "figs")
    table = (tmp_path / "figs" / "toy2d_table.md").read_text()
    assert ("| task | floor | aepo(gaussian-fit/sampled) | qgpo | mse | mse [fitted Q] | bc | AEPO within 2x floor "
            "| AEPO < MSE |") in table
    assert ("| moons | 0.020 | 0.031 ± 0.001 (3) | 0.050 ± 0.000 (3) | 0.200 ± 0.000 (3) | 0.400 ± 0.000 (3) | "
            "0.600 ± 0.000 (3) | yes | yes |") in table
    assert "within 2x of the floor on 2 of 2 tasks; below MSE on 2 of 2 tasks" in table
    assert all(p.exists() for p in paths)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- toy:start -->\nold\n<!-- toy:end -->\n\nafter\n")
    toy_report.update_readme(csv, readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- toy:start -->") and text.endswith("<!-- toy:end -->\n\nafter\n")
    assert "old" not in text and "`aepo(gaussian-fit/sampled)`" in text and "not the paper's" in text
    with pytest.raises(FileNotFoundError):
        toy_report.read_results(tmp_path / "missing.csv")


def test_committed_results_carry_the_critic_and_one_name_per_method():
    from pathlib import Path
    rows = toy_report.read_results(Path(__file__).resolve().parents[1] / "figures" / "toy2d_results.csv")
    assert {r["method"] for r in rows} == {"aepo", "qgpo", "mse", "bc"}
    kinds = {(r["method"], r["critic"]) for r in rows}
    assert kinds == {("aepo", "regression"), ("qgpo", "reward"), ("mse", "reward"), ("bc", "none")}
    for r in rows:  # every AEPO row names its estimator: a Gaussian <covariance>/<expansion> or an in-support spec
        if r["method"] == "aepo" and "/" not in r["estimator"]:
            assert TT.estimator_overrides(r["estimator"])["energy"]["posterior"] in ("particles", "mixture"), r
        elif r["method"] == "aepo":
            assert r["estimator"].split("/")[0] in ("tweedie", "isotropic", "gaussian-fit", "none"), r
    assert sum(r["method"] == "aepo" and "/" in r["estimator"] for r in rows) > 0


def test_centered_estimator_spec_matches_qgpo_points_per_step():
    """``particles-K<K>-centered`` sets the centered regression with as many noised points per energy step as
    QGPO's contrastive batch (256 groups of 16 in the toy defaults) and no off-data cover."""
    over = TT.estimator_overrides("particles-K64-centered")
    assert over == {"energy": {"posterior": "particles", "centered": True, "batch": 64, "cover": 0.0},
                    "support": {"k": 64}}
    assert TT.matched_groups(16) == 256 and TT.matched_groups(8192) == 1
    d = TT.make_config("moons", "qgpo", "full")
    for k in (16, 64, 256):
        cfg = TT.make_config("moons", "aepo", "full", **TT.estimator_overrides(f"particles-K{k}-centered"))
        assert cfg.energy.batch * cfg.support.k == d.energy.batch * d.support.k
        assert TT.estimator_label(cfg) == f"aepo(particles-K{k}-centered)"
    cfg = TT.make_config("moons", "aepo", "full", critic={"kind": "regression"},
                         **TT.estimator_overrides("mixture-K32-h0.05-centered"))
    assert (cfg.energy.posterior, cfg.energy.bandwidth, cfg.energy.centered) == ("mixture", 0.05, True)
    for bad in ("particles-K0-centered", "particles-centered-K4", "gaussian-fit/sampled-centered"):
        with pytest.raises(ValueError, match="estimator"):
            TT.make_config("moons", "aepo", "full", **TT.estimator_overrides(bad))


def test_table_verdicts_follow_the_best_ranked_estimator():
    """With two AEPO estimators, the table's verdict columns are the best-ranked one's (not whichever has the
    most rows or sorts first), and a grid without MSE says so instead of counting 'below MSE' as failures."""
    rows = [r for r in _rows() if r["method"] != "mse" and r["critic"] == "reward" or r["method"] == "bc"]
    rows += [dict(r, estimator="particles-K64-centered", distance=0.03 + 0.001 * r["seed"])
             for r in rows if r["method"] == "aepo"]
    rows = [dict(r, distance=0.5) if r.get("estimator") == "gaussian-fit/sampled" else r for r in rows]
    best, _ = toy_report.best_estimator(rows)
    assert best == "aepo(particles-K64-centered)"
    table = toy_report.table_markdown(rows, 10.0, best)
    assert "aepo(particles-K64-centered): within 2x of the floor on 2 of 2 tasks; MSE was not run here." in table
    assert "| yes | — |" in table and "below MSE" not in table


def test_toy_grid_on_the_project_csv_updates_the_toy_tables_in_docs_results_not_the_readme(tmp_path, monkeypatch):
    """The project's toy tables live in docs/results.md (as `aepo-lite figures` writes them): the grid's default
    must refill them there and leave a README without toy markers as it was (it once appended the block to it)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "figures").mkdir()
    (tmp_path / "docs").mkdir()
    shutil.copy(root / "figures" / "toy2d_results.csv", tmp_path / "figures" / "toy2d_results.csv")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno toy block here\n")
    results = tmp_path / "docs" / "results.md"
    results.write_text("# Results\n\n<!-- toy:start -->\nold\n<!-- toy:end -->\n\nafter\n")
    monkeypatch.chdir(tmp_path)
    assert main(["toy-grid", "--render-only", "--quiet"]) == 0
    assert readme.read_text() == "# Title\n\nno toy block here\n"
    text = results.read_text()
    assert "\nold\n" not in text and text.endswith("<!-- toy:end -->\n\nafter\n")
    assert "## Toy 2D tasks" in text and "8gaussians" in text


def test_sample_mass_reads_the_draw_the_distance_is_measured_on(tmp_path):
    """The shares and quartiles are those of draw d's guided samples (as the distance draws them) and of that
    draw's exact target set, checked with numpy on the same two sets; bad axis and threshold are named."""
    torch.set_num_threads(1)
    cfg = _cfg("moons", "qgpo", eval=dict(draws=2))
    m = TT.train_toy(cfg, cache_dir=tmp_path, progress=False)
    for w, d in ((1.0, 0), (0.0, 1)):
        r = TT.sample_mass(m, "y", -0.05, guidance_scale=w, d=d)
        target = TT.draw_target(cfg, d).numpy()
        _, _, xs, _ = TT.draw_distance(m, w, d, TT.draw_target(cfg, d))
        xs = xs.numpy()
        assert r["target_share"] == pytest.approx(np.mean(target[:, 1] > -0.05), abs=1e-12)
        assert r["samples_share"] == pytest.approx(np.mean(xs[:, 1] > -0.05), abs=1e-12)
        for name, pts in (("samples_quartiles", xs), ("target_quartiles", target)):
            for j, a in enumerate("xy"):
                assert r[name][a] == pytest.approx(np.quantile(pts[:, j], [0.25, 0.5, 0.75]), abs=1e-5)
    for bad, msg in ((dict(axis="z", threshold=0.0), "axis"), (dict(axis="x", threshold=float("nan")), "threshold"),
                     (dict(axis="x", threshold=0.0, d=cfg.eval.draws), "draws"), (dict(axis="x", threshold=0.0, d=-1), "d:")):
        with pytest.raises(ValueError, match=msg):
            TT.sample_mass(m, **bad)
