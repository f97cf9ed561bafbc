"""The energy-steps curve (aepo_lite.toy.convergence), error-budget parts 4-5 (aepo_lite.toy.trained_budget)
and their exact references (closed-form gradient and posterior averages of the toy E_t)."""
import dataclasses
import json
import math
from pathlib import Path


import pytest
import torch

from aepo_lite.core.schedule import VPSchedule
from aepo_lite.toy import convergence as conv
from aepo_lite.toy import pipeline as TT
from aepo_lite.toy import tasks as toy
from aepo_lite.toy import trained_budget as TB
from conftest import load_script


# ------------------------------------------------------------------------------ exact references
@pytest.mark.parametrize("t", [0.03, 0.3, 0.9])
def test_exact_energy_gradient_matches_finite_differences(t):
    task = toy.get_task("moons")
    x = task.sample(400, seed=1, dtype=torch.float64)
    e = task.reward(x)
    q = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.6
    g = toy.exact_energy_gradient(q, t, x, e, 3.0)
    h = 1e-5
    num = torch.stack([(toy.exact_intermediate_energy(q + h * d, t, x, e, 3.0)
                        - toy.exact_intermediate_energy(q - h * d, t, x, e, 3.0)) / (2 * h)
                       for d in torch.eye(2, dtype=torch.float64)], -1)
    assert torch.allclose(g, num, atol=1e-6 * max(1.0, float(num.abs().max())))


def test_exact_posterior_average_is_the_weighted_mean_and_its_tilt():
    sched = VPSchedule()
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tilt = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    alpha, sigma = (float(a) for a in sched.alpha_sigma(torch.tensor(0.4, dtype=torch.float64)))
    logw = -((q[:, None, :] - alpha * x[None]) ** 2).sum(-1) / (2 * sigma**2)
    ref = torch.softmax(logw, 1) @ v
    ref_tilted = torch.softmax(logw + tilt, 1) @ v
    assert torch.allclose(toy.exact_posterior_average(q, 0.4, x, v, sched), ref, atol=1e-10)
    assert torch.allclose(toy.exact_posterior_average(q, 0.4, x, v, sched, log_tilt=tilt), ref_tilted, atol=1e-10)
    with pytest.raises(ValueError, match="values"):
        toy.exact_posterior_average(q, 0.4, x, v[:10], sched)


# ------------------------------------------------------------------------------ estimator names
def test_in_support_estimator_names_carry_k_and_bandwidth_and_parse_back():
    assert TT.estimator_overrides("particles-K256") == {"energy": {"posterior": "particles"}, "support": {"k": 256}}
    assert TT.estimator_overrides("mixture-K8-h0.05") == {"energy": {"posterior": "mixture", "bandwidth": 0.05},
                                                          "support": {"k": 8}}
    assert TT.estimator_overrides("particles") == {"energy": {"posterior": "particles"}}
    over = TT.estimator_overrides("mixture-K8-h0.05")
    cfg = TT.make_config("moons", "aepo", "smoke", energy=over["energy"], support=over["support"], critic={"kind":
                                                                                                         "regression"})
    assert TT.estimator(cfg) == "mixture-K8-h0.05" and TT.estimator_overrides(TT.estimator(cfg)) == over
    for bad in ("particles-K", "particles-h0.1", "mixtures", "tweedie"):
        with pytest.raises(ValueError, match="estimator"):
            TT.estimator_overrides(bad)


def test_k_below_one_and_a_negative_bandwidth_are_refused_by_name():
    with pytest.raises(ValueError, match="support.k"):
        TT.make_config("moons", "aepo", "smoke", **TT.estimator_overrides("particles-K0"))
    with pytest.raises(ValueError, match="bandwidth"):
        TT.make_config("moons", "aepo", "smoke", energy={"posterior": "mixture", "bandwidth": -0.1},
                       critic={"kind": "regression"})


# ------------------------------------------------------------------------------ the convergence check
def _rows(curves: dict) -> list[dict]:
    rows = []
    for (task, method, est), curve in curves.items():
        for n, err in curve.items():
            rows.append(dict(task=task, method=method, estimator=est, critic="reward", beta="10", seed="0",
                             preset="full", energy_steps=str(n), err_mean=str(err)))
    return rows


def test_check_converged_names_every_group_that_still_improves():
    rows = _rows({("moons", "qgpo", ""): {1000: 1.0, 2000: 0.5, 4000: 0.48},
                  ("moons", "aepo", "particles-K256"): {1000: 0.4, 2000: 0.39, 4000: 0.385},
                  ("rings", "mse", ""): {1000: 0.9, 2000: 0.8}})
    drops = conv.improvements(rows, 1000)
    assert drops[("moons", "qgpo", "", "reward", "10", "0", "full", "")] == pytest.approx(0.5)
    assert conv.check_converged(_rows({("moons", "qgpo", ""): {2000: 0.5, 4000: 0.48}}), 2000)
    with pytest.raises(ValueError) as e:
        conv.check_converged(rows, 1000, tol=0.1)
    msg = str(e.value)
    assert "energy.steps=1000" in msg and "moons qgpo" in msg and "50% lower" in msg and "rings mse" in msg
    assert "particles" not in msg  # a 2.5% drop is converged at tol 10%
    with pytest.raises(ValueError, match=r"rings mse \(Q: reward, beta 10, seed any, preset full\): "
                                         "no seed with rows at 2000 and past it"):
        conv.check_converged(rows, 2000, tol=0.1)
    # seeds run at the budget alone are replicates: the check reads the seeds whose curves go past it
    reps = _rows({("moons", "qgpo", ""): {2000: 0.5, 4000: 0.48}}) + [
        dict(r, seed="1", err_mean="0.7") for r in _rows({("moons", "qgpo", ""): {2000: 0.7}})]
    assert list(conv.check_converged(reps, 2000)) == [("moons", "qgpo", "", "reward", "10", "0", "full", "")]
    falls = reps + [dict(r, seed="2") for r in _rows({("moons", "qgpo", ""): {2000: 0.6, 4000: 0.3}})]
    with pytest.raises(ValueError, match=r"seed 2, preset full\): 50% lower") as e:
        conv.check_converged(falls, 2000)
    assert "seed 1" not in str(e.value) and "seed 0" not in str(e.value)
    # --check reads the curve's own rows: a CSV may hold other specs, tasks or betas that stop at lower budgets
    other = _rows({("moons", "aepo", "particles-K256"): {1000: 0.4}, ("rings", "qgpo", ""): {1000: 0.9}})
    mixed = reps + other + [dict(r, beta="3") for r in _rows({("moons", "qgpo", ""): {1000: 0.4}})]
    cc = conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(2000, 4000))
    assert conv.curve_rows(mixed, cc) == reps
    assert conv.check_converged(conv.curve_rows(mixed, cc), 2000)
    with pytest.raises(ValueError, match="no seed with rows at 2000 and past it"):
        conv.check_converged(mixed, 2000)
    cc = conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo", "aepo:particles-K256"), steps=(1000, 2000))
    assert conv.curve_rows(mixed, cc) == reps + other[:1]
    with pytest.raises(ValueError, match="tol"):
        conv.check_converged(rows, 2000, tol=1.5)


def test_a_plateau_followed_by_a_fall_is_not_converged_and_a_flat_method_need_not_go_further():
    # qgpo: 2% lower from 1000 to 2000, then 40% lower from 2000 to 4000: 1000 is not converged, whatever its next
    # doubling says; 2000 is not either, 4000 has nothing past it
    plateau = _rows({("moons", "qgpo", ""): {1000: 0.5, 2000: 0.49, 4000: 0.294}})
    with pytest.raises(ValueError, match=r"seed 0, preset full\): 40% lower from 2000 to 4000"):
        conv.check_converged(plateau, 1000)
    with pytest.raises(ValueError, match=r"seed 0, preset full\): 40% lower$"):
        conv.check_converged(plateau, 2000)
    # aepo flat from 1000 (3% then 1% lower) and carried to 4000; qgpo flat from 2000 (5%) to 4000 (2%): at 2000
    # both are checked on their own doublings; at 4000 neither was run past it, so it is not shown converged
    both = _rows({("moons", "aepo", "p"): {1000: 0.3, 2000: 0.291, 4000: 0.288},
                  ("moons", "qgpo", ""): {1000: 0.9, 2000: 0.5, 4000: 0.475, 8000: 0.4655}})
    assert sorted(conv.check_converged(both, 2000).values()) == pytest.approx([0.003 / 0.291, 0.05])
    # at 4000 aepo has no row past it, but it is flat from 1000 on: converged there by the same rule
    assert list(conv.check_converged(both, 4000).values()) == [pytest.approx(0.02)]
    still = [r for r in both if not (r["method"] == "aepo" and r["energy_steps"] == "4000")]
    still += _rows({("moons", "aepo", "p"): {4000: 0.2}})  # aepo fell 31% from 2000 to 4000: not flat below 4000
    with pytest.raises(ValueError, match=r"moons aepo\(p\) \(Q: reward, beta 10, seed any, preset full\): no seed with "
                                         "rows at 4000 and past it"):
        conv.check_converged(still, 4000)
    with pytest.raises(ValueError, match="31% lower"):
        conv.check_converged(still, 1000)


def test_converged_budgets_are_per_task_and_leave_out_a_task_no_budget_passes():
    rows = _rows({("moons", "qgpo", ""): {1000: 0.9, 2000: 0.5, 4000: 0.48},      # converged from 2000
                  ("moons", "aepo", "p"): {1000: 0.3, 2000: 0.29, 4000: 0.288},   # from 1000
                  ("rings", "qgpo", ""): {1000: 0.5, 2000: 0.49, 4000: 0.3},      # plateau, then a 39% fall
                  ("rings", "aepo", "p"): {1000: 0.3, 2000: 0.29, 4000: 0.288},
                  ("swissroll", "qgpo", ""): {1000: 0.2, 2000: 0.19},
                  ("swissroll", "aepo", "p"): {1000: 0.2, 2000: 0.19},
                  ("swissroll", "mse", ""): {500: 0.9, 1000: 0.5}})
    # swissroll: mse is compared at 1000 but not shown converged anywhere (44% lower from 500, no row past 1000);
    # it stops there, so 2000 compares qgpo and aepo alone, and passes
    with pytest.raises(ValueError, match="swissroll mse .*no seed with rows at 1000 and past it"):
        conv.check_converged([r for r in rows if r["task"] == "swissroll"], 1000)
    assert conv.converged_budgets(rows) == {"moons": 2000, "rings": None, "swissroll": 2000}
    # mse carried to 2000 and still falling (60%): no budget passes on swissroll
    rows += _rows({("swissroll", "mse", ""): {2000: 0.2}})
    with pytest.raises(ValueError, match="swissroll mse .*60% lower"):
        conv.check_converged([r for r in rows if r["task"] == "swissroll"], 1000)
    assert conv.converged_budgets(rows)["swissroll"] is None
    # a task whose methods never ran at the same count has nothing to compare
    apart = _rows({("rings", "qgpo", ""): {1000: 0.5, 2000: 0.49}, ("rings", "aepo", "p"): {4000: 0.3, 8000: 0.29}})
    assert conv.converged_budgets(apart) == {"rings": None}
    # the distance table takes one step count per task and leaves out the others
    for r in rows:
        r.update(distance="0.05" if r["method"] == "qgpo" else "0.04", floor="0.02")
    text = conv.distance_markdown(rows, {"moons": 2000, "swissroll": 1000})
    assert "| moons | aepo(p) | 0 | 1 | 0.040 +- 0.000 | 0.020 | 2.00 | 0.80 |" in text
    assert "| swissroll | qgpo | 0 |" in text and "rings" not in text


def test_spread_table_gives_mean_and_sample_std_where_two_seeds_or_more_ran():
    rows = _rows({("moons", "qgpo", ""): {1000: 0.5, 2000: 0.4}, ("rings", "qgpo", ""): {1000: 0.9}})
    rows += [dict(r, seed="1", err_mean=str(float(r["err_mean"]) + 0.2))
             for r in _rows({("moons", "qgpo", ""): {2000: 0.4}})]
    text = conv.spread_markdown(rows)
    # moons at 2000: 0.4 and 0.6, mean 0.5, sample std 0.1414; 1000 has one seed, rings one seed: left out
    assert text.splitlines()[0] == "| task | method | 2000 steps |"
    assert "| moons | qgpo | 0.500 +- 0.141 (2) |" in text and "rings" not in text
    assert conv.spread_markdown(_rows({("moons", "qgpo", ""): {1000: 0.5}})) == ""


def test_distance_table_averages_seeds_at_one_step_count_against_floor_and_qgpo():
    rows = []
    for seed, dq, da, fl in (("0", 0.06, 0.03, 0.02), ("1", 0.10, 0.05, 0.04), ("2", 0.08, 0.04, 0.03)):
        for m, est, d in (("qgpo", "", dq), ("aepo", "particles-K64-centered", da)):
            rows += [dict(task="moons", method=m, estimator=est, critic="reward", beta="10", seed=seed, preset="full",
                          energy_steps=str(n), err_mean="0.1", distance=str(d + (0.5 if n == 1000 else 0.0)),
                          floor=str(fl), **({"draws": "4"} if seed == "2" else {}))
                     for n in ((1000, 2000) if seed == "0" else (2000,))]  # seeds 0-1: rows made before draws
    text = conv.distance_markdown(rows)  # the largest step count: 2000, three seeds
    line = next(x for x in text.splitlines() if "centered" in x)
    # mean 0.04, sample std 0.01, floor mean 0.03, QGPO mean 0.08; draws per seed
    assert line == "| moons | aepo(particles-K64-centered) | 0, 1, 2 | 1, 1, 4 | 0.040 +- 0.010 | 0.030 | 1.33 | 0.50 |"
    assert "| moons | qgpo | 0, 1, 2 | 1, 1, 4 | 0.080 +- 0.020 | 0.030 | 2.67 | 1.00 |" in text
    assert "| moons | qgpo | 0 | 1 | 0.560 +- 0.000 | 0.020 | 28.00 | 1.00 |" in conv.distance_markdown(rows, 1000)
    with pytest.raises(ValueError, match="energy.steps=500"):
        conv.distance_markdown(rows, 500)
    table = conv.convergence_markdown(rows)
    assert "| seed |" in table and "| moons | qgpo | 2 |  | 0.100 |  |" in table


def test_convergence_specs_and_steps_are_checked_before_any_run():
    with pytest.raises(ValueError, match="steps"):
        conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), steps=(200, 100)))
    with pytest.raises(ValueError, match="specs"):
        conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), specs=("cep",)))
    with pytest.raises(ValueError, match="specs"):
        conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), specs=("aepo",)))
    cfgs = conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo", "aepo:particles-K64"),
                                                    steps=(10, 20), preset="smoke"))
    assert [(c.method, c.energy.steps, c.support.k) for c in cfgs] == [("qgpo", 10, 16), ("qgpo", 20, 16),
                                                                      ("aepo", 10, 64), ("aepo", 20, 64)]
    two = conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(10,), seeds=(3, 1),
                                                   preset="smoke"))
    assert [c.seed for c in two] == [3, 1]
    for bad in ((), (1, 1), (-1,)):
        with pytest.raises(ValueError, match="seeds"):
            conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), seeds=bad))
    # the fitted critic's budget: the preset's unless given, and only with the fitted critic
    fit = dict(tasks=("moons",), specs=("qgpo",), steps=(10,), preset="smoke", critic="regression")
    preset_steps = conv.spec_configs(conv.ConvergenceConfig(**fit))[0].critic.steps
    longer = conv.spec_configs(conv.ConvergenceConfig(**fit, critic_steps=3 * preset_steps))[0]
    assert (longer.critic.kind, longer.critic.steps) == ("regression", 3 * preset_steps)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="critic_steps"):
            conv.spec_configs(conv.ConvergenceConfig(**fit, critic_steps=bad))
    with pytest.raises(ValueError, match="critic_steps"):
        conv.spec_configs(conv.ConvergenceConfig(**dict(fit, critic="reward"), critic_steps=100))


def test_convergence_run_is_resumable_and_renders(tmp_path, monkeypatch):
    import aepo_lite.config as C
    monkeypatch.setitem(C.PRESETS["toy"], "smoke", dict(C.PRESETS["toy"]["smoke"], n_data=2000, behaviour=dict(
        steps=20), eval=dict(n_samples=200, n_ref_data=1000, pool_size=2000, grid_size=8)))
    cc = conv.ConvergenceConfig(tasks=("moons",), specs=("aepo:particles-K8",), steps=(5, 10), preset="smoke")
    small = dict(csv_path=tmp_path / "c.csv", runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache",
                 progress=False)
    rows = conv.run_convergence(cc, **small)
    assert sorted(int(r["energy_steps"]) for r in rows) == [5, 10]
    first = (tmp_path / "c.csv").read_text()
    (tmp_path / "c.csv").unlink()
    monkeypatch.setattr(conv, "run_toy", lambda *a, **k: pytest.fail("a finished run was trained again"))
    conv.run_convergence(cc, **small)  # read back from the finished run folders
    assert (tmp_path / "c.csv").read_text() == first
    paths = conv.render(tmp_path / "c.csv", tmp_path)
    assert all(p.exists() for p in paths) and "particles-K8" in paths[0].read_text()


def test_convergence_in_two_worker_processes_gives_the_serial_rows(tmp_path, monkeypatch):
    import aepo_lite.config as C
    monkeypatch.setitem(C.PRESETS["toy"], "smoke", dict(C.PRESETS["toy"]["smoke"], n_data=2000, behaviour=dict(
        steps=20), eval=dict(n_samples=200, n_ref_data=1000, pool_size=2000, grid_size=8)))
    cc = conv.ConvergenceConfig(tasks=("moons", "rings"), specs=("qgpo",), steps=(5, 10), preset="smoke",
                                device="cpu")
    got = {}
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        rows = conv.run_convergence(cc, d / "c.csv", runs_dir=d / "runs", cache_dir=d / "cache", progress=False,
                                    workers=workers)
        got[workers] = sorted(tuple((k, str(v)) for k, v in r.items() if k != "energy_seconds") for r in rows)
    assert len(got[1]) == 4 and got[2] == got[1]  # the configs travel whole: the workers see the patched preset
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            conv.run_convergence(cc, tmp_path / "x.csv", runs_dir=tmp_path / "x", workers=bad)


def _curve_row(task, seed, steps, err=0.5):
    return dict(task=task, method="qgpo", estimator="", critic="reward", beta="10", seed=seed, preset="smoke",
                energy_steps=steps, **{k: f"{err:.6f}" for k in ("err_0.05", "err_0.2", "err_0.5", "err_mean")},
                distance="0.100000", floor="0.050000", energy_seconds="1.0")


def test_convergence_keeps_rows_another_process_wrote_during_a_run(tmp_path, monkeypatch):
    """Two processes running other parts of the curve into one CSV: a row merged while this one trains stays."""
    csv_path = tmp_path / "c.csv"
    conv.merge_rows(csv_path, [_curve_row("rings", 0, 5)])

    def fake_run(cfg, out, **kw):
        conv.merge_rows(csv_path, [_curve_row("swissroll", 1, 7)])  # the other process, finishing meanwhile
        return dict(energy_error={"0.05": 0.1, "0.2": 0.2, "0.5": 0.3}, results=[dict(distance=0.2, floor=0.1)],
                    estimator="", critic="reward", train_info=dict(energy=dict(seconds=1.0)))

    monkeypatch.setattr(conv, "run_toy", fake_run)
    cc = conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(5,), preset="smoke")
    rows = conv.run_convergence(cc, csv_path, runs_dir=tmp_path / "runs", progress=False)
    got = sorted((r["task"], str(r["seed"]), int(r["energy_steps"])) for r in conv.read_rows(csv_path))
    assert got == [("moons", "0", 5), ("rings", "0", 5), ("swissroll", "1", 7)]
    assert len(rows) == 3


def test_processes_merging_into_one_csv_keep_every_row(tmp_path):
    """Three processes each merge 100 rows one at a time into the same CSV: all 300 are there (a read-merge-write
    without the lock loses rows when the writes interleave)."""
    import subprocess
    import sys
    import time
    go = tmp_path / "go"
    code = ("import os, sys, time; from aepo_lite.toy import convergence as conv\n"
            "sys.path.insert(0, sys.argv[3]); from test_convergence import _curve_row\n"
            "while not os.path.exists(sys.argv[4]): time.sleep(0.01)\n"  # all start merging at once
            "for i in range(100): conv.merge_rows(sys.argv[1], [_curve_row('moons', int(sys.argv[2]), i)])\n")
    here = str(__import__("pathlib").Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.csv"), str(p), here, str(go)])
             for p in range(3)]
    time.sleep(3)  # imports done
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    got = {(str(r["seed"]), int(r["energy_steps"])) for r in conv.read_rows(tmp_path / "c.csv")}
    assert got == {(str(p), i) for p in range(3) for i in range(100)}


# ------------------------------------------------------------------------------ parts 4-5 on a trained run
def test_trained_budget_parts_against_their_references(tmp_path):
    """MSE's own target is exact (beta E[e(x0)|x_t]); the exact-energy sampler beats unguided samples."""
    res = {}
    for method in ("mse", "aepo", "bc"):
        cfg = TT.make_config("8gaussians", method, "smoke", n_data=4000, behaviour=dict(steps=300),
                             energy=dict(steps=30, **({"posterior": "particles"} if method == "aepo" else {})),
                             support={"k": 32}, eval=dict(n_samples=600, n_ref_data=2000, pool_size=4000,
                                                          grid_size=10))
        res[method] = TT.run_toy(cfg, tmp_path / method, cache_dir=tmp_path / "cache", progress=False, figure=False)
    for method in ("mse", "aepo"):
        reg = res[method]["budget"]["regression"]
        for t, part in reg.items():
            assert part["vs_exact"] == pytest.approx(res[method]["energy_error"][t], rel=1e-6)
            # the triangle inequality of the weighted RMS (the constants removed differ: a small slack)
            assert part["vs_exact"] <= part["vs_target"] + part["target_bias"] + 1e-6
    # MSE's regression target is biased (beta E[e] is not log E[exp(beta e)]): clearly off E_t at small t
    assert res["mse"]["budget"]["regression"]["0.05"]["target_bias"] > 0.1
    assert res["bc"]["budget"]["regression"] == {}
    # the exact energy guides the behaviour model toward the target: far closer than unguided samples
    bc_distance = res["bc"]["results"][0]["distance"]
    assert res["bc"]["budget"]["exact_distance"] < 0.6 * bc_distance
    rows = TB.budget_rows(res["aepo"]) + TB.budget_rows(res["bc"])
    TB.write_rows(tmp_path / "b.csv", rows)
    text = TB.render(tmp_path / "b.csv", tmp_path)[0].read_text()
    assert "aepo(particles-K32)" in text and "| 8gaussians | bc (none) |" in text
    assert not math.isnan(float(TB.read_rows(tmp_path / "b.csv")[0]["exact_distance"]))


def test_centered_mean_target_draws_each_point_its_source_from_the_exact_posterior():
    """The centered toy regression noises its own support points, so the budget's mean target gives each grid
    point its source x_0 ~ p(x_0 | x_t) beside k - 1 uniform data points. Checked against the closed-form
    posterior mean E[x_0 | x_t] (a Monte Carlo average of 4000 draws) and, at K = 1, the source-only target
    beta e(x_0), whose mean is beta E[e(x_0) | x_t]."""
    from types import SimpleNamespace
    task = toy.get_task("moons")
    x = task.sample(3000, seed=2, dtype=torch.float64)
    e = task.reward(x)
    sched = VPSchedule()
    models = SimpleNamespace(x=x, cfg=SimpleNamespace(eval=SimpleNamespace(n_ref_data=2000)),
                             behaviour=SimpleNamespace(schedule=sched))
    pts = torch.tensor([[0.0, 0.5], [0.8, -0.3], [-0.6, 0.1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    t, R = 0.3, 4000
    draws = [TB._source_support(models, pts, t, 5, g, e) for _ in range(R)]
    assert draws[0]["support"].shape == (3, 5, 2) and draws[0]["support_q"].shape == (3, 5)
    src = torch.stack([d["support"][:, 0] for d in draws]).mean(0)
    ref = toy.exact_posterior_average(pts, t, x[:2000], x[:2000], sched)
    assert torch.allclose(src, ref, atol=0.03), (src, ref)
    others = torch.stack([d["support"][:, 1:] for d in draws]).reshape(-1, 2).mean(0)  # uniform: the data mean
    assert torch.allclose(others, x.mean(0), atol=0.02)
    q1 = torch.stack([TB._source_support(models, pts, t, 1, g, e)["support_q"][:, 0] for _ in range(R)]).mean(0)
    ref_q = toy.exact_posterior_average(pts, t, x[:2000], e[:2000, None], sched)[:, 0]
    assert torch.allclose(q1, ref_q, atol=0.04), (q1, ref_q)


def test_one_curve_carried_further_keeps_the_comparison_at_the_budget_every_method_reached():
    rows = _rows({("moons", "qgpo", ""): {1000: 1.0, 2000: 0.5},
                  ("moons", "aepo", "p"): {1000: 0.8, 2000: 0.4, 4000: 0.38}})
    assert conv.matched_top(rows) == 2000  # qgpo stops at 2000; 4000 is aepo's alone
    assert conv.matched_top(rows + _rows({("moons", "mse", ""): {1000: 0.9}})) == 2000  # a short curve does not cap it
    assert conv.matched_top(_rows({("moons", "qgpo", ""): {1000: 1.0, 2000: 0.5}})) == 2000  # one method: its top
    # the second method carried to 4000 on one task of two: the comparison stays where both ran on every task
    two = rows + _rows({("moons", "qgpo", ""): {4000: 0.45}, ("rings", "qgpo", ""): {1000: 1.0, 2000: 0.6},
                        ("rings", "aepo", "p"): {1000: 0.9, 2000: 0.5, 4000: 0.3}})
    assert conv.matched_top(two) == 2000
    assert conv.matched_top(two + _rows({("rings", "qgpo", ""): {4000: 0.55}})) == 4000
    drops = conv.last_drops(rows)
    assert drops[("moons", "aepo", "p", "reward", "10", "0", "full", "")] == (2000, 4000, pytest.approx(0.05))
    assert drops[("moons", "qgpo", "", "reward", "10", "0", "full", "")] == (1000, 2000, pytest.approx(0.5))
    assert conv.doublings(rows)[("moons", "aepo", "p", "reward", "10", "0", "full", "")] == [
        (1000, 2000, pytest.approx(0.5)), (2000, 4000, pytest.approx(0.05))]  # every doubling, not the last alone
    table = conv.convergence_markdown(rows)  # each row's drop past its own last-but-one step count
    assert "| moons | qgpo | 1.000 | 0.500 |  | +50% (not converged) |" in table
    assert "| moons | aepo(p) | 0.800 | 0.400 | 0.380 | +5% |" in table
    rose = conv.convergence_markdown(_rows({("moons", "qgpo", ""): {1000: 0.8620, 2000: 0.8660}}))
    assert "| 0.862 | 0.866 | -0.5% |" in rose  # a small rise keeps its sign and size (was "-0%")
    with pytest.raises(ValueError, match="energy_steps: no step count"):
        conv.matched_top(_rows({("moons", "qgpo", ""): {1000: 1.0}, ("moons", "aepo", "p"): {2000: 0.4}}))


def test_floor_spread_sets_runs_against_their_seed_floor_and_the_expected_one(tmp_path):
    from aepo_lite.toy import floors as FL
    rows = FL.spread_rows(["moons"], 10.0, 300, 4, 5000, 32)
    draws = [toy.distance_floor("moons", 10.0, 300, seed=s, pool_size=5000, n_projections=32) for s in range(4)]
    assert [float(r["floor"]) for r in rows] == pytest.approx(draws, abs=1e-6) and len(set(draws)) == 4
    expected = sum(draws) / 4
    assert toy.expected_floor("moons", 10.0, 300, pool_size=5000, n_projections=32, pairs=4) == pytest.approx(expected)
    runs = [dict(_curve_row("moons", s, 100), method="aepo", estimator="x", distance=f"{d:.6f}")
            for s, d in ((0, 1.9 * draws[0]), (1, 2.5 * expected))]
    table = FL.against_floors(runs, rows)
    assert f"| {1.9 * draws[0] / expected:.2f} |" in table and "| 2.50 |" in table and "aepo(x)" in table
    n_own = (1.9 <= 2.0) + (2.5 * expected / draws[1] <= 2.0)
    n_exp = (1.9 * draws[0] / expected <= 2.0) + 0
    assert f"Within 2x: {n_own}/2 runs against their own seed's floor, {n_exp}/2 against the expected floor." in table
    with pytest.raises(ValueError, match="runs"):
        FL.against_floors([dict(runs[0], task="rings")], rows)
    FL.write_rows(tmp_path / "toy2d_floor_spread.csv", rows)
    md = FL.render(tmp_path / "toy2d_floor_spread.csv", tmp_path)[0].read_text()
    assert f"| moons | 10 | 300 | 4 | {expected:.4f} |" in md


def test_refloor_restates_only_the_floor_column(tmp_path, monkeypatch):
    fs = load_script("floor_spread")
    import aepo_lite.config as C
    monkeypatch.setitem(C.PRESETS["toy"], "smoke", dict(C.PRESETS["toy"]["smoke"], eval=dict(
        n_samples=300, pool_size=5000, n_projections=32)))
    ev = C.PRESETS["toy"]["smoke"]["eval"]
    rows = [dict(_curve_row("moons", 0, 5), floor="0.5"), _curve_row("rings", 1, 5)]
    conv.merge_rows(tmp_path / "c.csv", rows)
    before = conv.read_rows(tmp_path / "c.csv")
    assert fs.refloor(tmp_path / "c.csv") == 2 and fs.refloor(tmp_path / "c.csv") == 0
    after = conv.read_rows(tmp_path / "c.csv")
    for b, a in zip(before, after):
        assert {k: v for k, v in a.items() if k != "floor"} == {k: v for k, v in b.items() if k != "floor"}
        want = toy.expected_floor(a["task"], 10.0, ev["n_samples"], pool_size=ev["pool_size"],
                                  n_projections=ev["n_projections"])
        assert float(a["floor"]) == pytest.approx(want, abs=1e-6)
    (tmp_path / "bad.csv").write_text("task,beta\nmoons,10\n")
    with pytest.raises(ValueError, match="no floor column"):
        fs.refloor(tmp_path / "bad.csv")


def test_eval_noise_redraws_a_finished_run_and_its_draw_0_is_the_recorded_one(tmp_path, monkeypatch):
    import aepo_lite.config as C
    from aepo_lite.toy import eval_noise as EN
    monkeypatch.setitem(C.PRESETS["toy"], "smoke", dict(C.PRESETS["toy"]["smoke"], n_data=2000, behaviour=dict(
        steps=20), eval=dict(n_samples=200, n_ref_data=1000, pool_size=2000, grid_size=8, n_projections=32)))
    cc = conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(6,), preset="smoke", device="cpu")
    rows = conv.run_convergence(cc, tmp_path / "c.csv", runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache",
                                progress=False)
    cfg = conv.spec_configs(cc)[0]
    assert cfg.eval.draws == 4 and rows[0]["draws"] == "4"  # the preset's eval here does not set draws: the default
    recorded = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())["results"][0]
    d = EN.draws(cfg, tmp_path / "cache", 4)  # redrawn in this process from the cached stages
    assert d == pytest.approx(recorded["distances"], abs=1e-9) and len(set(d)) == 4
    assert sum(d) / 4 == pytest.approx(float(rows[0]["distance"]), abs=1e-6)
    d = d[:3]
    other = conv.spec_configs(conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(7,), preset="smoke"))[0]
    with pytest.raises(ValueError, match="cache_dir: .*no finished energy stage"):
        EN.draws(other, tmp_path / "cache", 2)
    EN.write_rows(tmp_path / "toy2d_eval_noise.csv", EN.rows_of(cfg, d))
    md = EN.render(tmp_path / "toy2d_eval_noise.csv", tmp_path)[0].read_text()
    mean = sum(d) / 3
    assert f"| moons | qgpo | 0 | 6 | 3 | {d[0]:.4f} | {mean:.4f} |" in md


def test_a_finished_run_evaluated_with_other_draws_is_evaluated_again_from_its_cache_not_trained(tmp_path, monkeypatch):
    import aepo_lite.config as C
    monkeypatch.setitem(C.PRESETS["toy"], "smoke", dict(C.PRESETS["toy"]["smoke"], n_data=2000, behaviour=dict(
        steps=20), eval=dict(n_samples=200, n_ref_data=1000, pool_size=2000, grid_size=8, n_projections=32)))
    kw = dict(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", progress=False)
    one = conv.ConvergenceConfig(tasks=("moons",), specs=("qgpo",), steps=(6,), preset="smoke", device="cpu", draws=1)
    r1 = conv.run_convergence(one, tmp_path / "c.csv", **kw)[0]
    energy = next((tmp_path / "cache").rglob("energy-*.pt"))
    stamp = energy.stat().st_mtime_ns
    r3 = conv.run_convergence(dataclasses.replace(one, draws=3), tmp_path / "c.csv", **kw)
    assert len(r3) == 1 and r3[0]["draws"] == "3" and r1["draws"] == "1"  # the row is replaced, not added
    assert energy.stat().st_mtime_ns == stamp  # read from the cache, not trained again
    assert {k: v for k, v in r3[0].items() if k not in ("distance", "draws")} == \
        {k: v for k, v in r1.items() if k not in ("distance", "draws")}
    distances = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())["results"][0]["distances"]
    assert distances[0] == pytest.approx(float(r1["distance"]), abs=1e-6)  # draw 0 is the one-draw evaluation
    assert float(r3[0]["distance"]) == pytest.approx(sum(distances) / 3, abs=1e-6) and len(set(distances)) == 3
    # a CSV made before the draws column reads as one draw a row, and gains the column on the next merge
    old = tmp_path / "old.csv"
    cols = [c for c in conv.COLUMNS if c != "draws"]
    old.write_text(",".join(cols) + "\n" + ",".join(r1[c] for c in cols) + "\n")
    assert conv.read_rows(old)[0]["draws"] == "1"
    conv.merge_rows(old, [dict(r1, seed="1")])
    assert old.read_text().splitlines()[0].split(",") == list(conv.COLUMNS)
    with pytest.raises(ValueError, match="eval.draws"):
        conv.run_convergence(dataclasses.replace(one, draws=0), tmp_path / "c.csv", **kw)
    with pytest.raises(ValueError, match="eval.draws: .* holds an evaluation of 3 distance draws; 2 would overwrite"):
        conv.run_convergence(dataclasses.replace(one, draws=2), tmp_path / "c.csv", **kw)


def test_generated_tables_refuse_an_empty_csv_naming_the_command_that_makes_it(tmp_path):
    from aepo_lite.toy import eval_noise as EN
    from aepo_lite.toy import floors as fs
    for mod, cmd in ((fs, "scripts/floor_spread.py"), (EN, "scripts/eval_noise.py")):
        p = tmp_path / f"{cmd.split('/')[1]}.csv"
        p.write_text(",".join(mod.COLUMNS) + "\n")
        with pytest.raises(ValueError, match=f"{p.name} has no rows: run {cmd} first"):
            mod.render(p, tmp_path)
    assert not list(tmp_path.glob("*.md"))


def test_check_command_names_a_rise_past_the_budget_as_a_rise(tmp_path, capsys):
    # `--check N` printed "the largest drop past it is -2.8%" when every curve rose past N
    import csv
    from aepo_lite.cli import main
    rows = [{**{c: "" for c in conv.COLUMNS}, **r, "distance": "0.02", "floor": "0.01", "draws": "1"}
            for r in _rows({("moons", "qgpo", ""): {1000: 0.2, 2000: 0.1, 4000: 0.103}})]
    with open(tmp_path / "conv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, conv.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    args = ["toy-convergence", "--render-only", "--csv", str(tmp_path / "conv.csv"), "--tasks", "moons", "--specs",
            "qgpo", "--seeds", "0", "--steps", "1000", "2000", "4000", "--check"]
    assert main(args + ["2000"]) == 0
    out = capsys.readouterr().out
    assert "energy.steps=2000 is converged: no error fell past it (rose by 3.0% or more) (tol 10%)" in out
    assert main(args + ["1000"]) != 0  # 50% lower from 1000 to 2000
    assert "50% lower" in capsys.readouterr().err


def test_render_draws_the_distance_over_the_floor_where_rows_have_both(tmp_path):
    import csv
    rows = _rows({("moons", "qgpo", ""): {1000: 0.2, 2000: 0.1}, ("moons", "aepo", "p"): {1000: 0.3, 2000: 0.2}})
    full = [{**{c: "" for c in conv.COLUMNS}, **r} for r in rows]

    def write(rs):
        with open(tmp_path / "c.csv", "w", newline="") as f:
            w = csv.DictWriter(f, conv.COLUMNS)
            w.writeheader()
            w.writerows(rs)
    assert conv._plot(full, tmp_path / "d.png", {}, conv._over_floor) is None  # no distances: no figure
    assert not (tmp_path / "d.png").exists()
    write([dict(r, distance="0.03", floor="0.02", draws="1" if r["energy_steps"] == "1000" else "4") for r in full])
    paths = conv.render(tmp_path / "c.csv", tmp_path)
    assert [p.name for p in paths][-1] == "toy2d_convergence_distance.png" and paths[-1].stat().st_size > 0
    assert conv._over_floor({"distance": "0.03", "floor": "0.02"}) == pytest.approx(1.5)
    assert conv._over_floor({"distance": "", "floor": "0.02"}) is None and conv._over_floor({"distance": "1"}) is None
    assert conv._groups(full, conv._over_floor) == {}  # a row without a value is left out, not read as 0


def test_a_task_not_shown_converged_is_tabled_at_its_largest_matched_budget_and_named_so(tmp_path):
    import csv
    # moons: qgpo still falls 40% at its last doubling (4000 -> 8000), aepo is flat; rings: both flat from 1000
    rows = _rows({("moons", "qgpo", ""): {1000: 0.5, 2000: 0.4, 4000: 0.3, 8000: 0.18},
                  ("moons", "aepo", "p"): {1000: 0.2, 2000: 0.2, 4000: 0.2, 8000: 0.2},
                  ("rings", "qgpo", ""): {1000: 0.1, 2000: 0.1}, ("rings", "aepo", "p"): {1000: 0.1, 2000: 0.1}})
    dist = {("moons", "qgpo", "8000"): "0.06", ("moons", "aepo", "8000"): "0.045"}
    full = [{**{c: "" for c in conv.COLUMNS}, **r, "floor": "0.03", "draws": "4",
             "distance": dist.get((r["task"], r["method"], r["energy_steps"]), "0.09")} for r in rows]
    full.append({**full[0], "task": "moons", "method": "aepo", "estimator": "p", "energy_steps": "16000",
                 "err_mean": "0.2", "distance": "0.5"})  # one method alone past the matched budget: not the table
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, conv.COLUMNS)
        w.writeheader()
        w.writerows(full)
    assert conv.converged_budgets(full) == {"moons": None, "rings": 1000}
    conv.render(tmp_path / "c.csv", tmp_path)
    text = (tmp_path / "toy2d_convergence.md").read_text()
    section = text.split("## The tasks not shown converged, at their largest matched budget")[1].split("## ")[0]
    assert "Per task: moons 8000 energy steps" in section and "rings" not in section
    assert "| moons | aepo(p) | 0 | 4 | 0.045 +- 0.000 | 0.030 | 1.50 | 0.75 |" in section
    assert "| moons | qgpo | 0 | 4 | 0.060 +- 0.000 | 0.030 | 2.00 | 1.00 |" in section
    full = [r for r in full if r["task"] == "rings"]  # every task converged: no such section
    assert conv._unconverged_markdown(full, conv.converged_budgets(full)) == ""


def test_fitted_critic_rows_are_set_beside_the_true_reward_at_each_converged_budget(tmp_path, capsys, monkeypatch):
    import csv
    from aepo_lite.cli import main
    # the reference: moons converged from 2000 (both methods flat past it), rings nowhere (qgpo falls 40%)
    ref = _rows({("moons", "qgpo", ""): {1000: 0.9, 2000: 0.5, 4000: 0.49},
                 ("moons", "mse", ""): {1000: 0.3, 2000: 0.3, 4000: 0.3},
                 ("rings", "qgpo", ""): {1000: 0.5, 2000: 0.3}, ("rings", "mse", ""): {1000: 0.3, 2000: 0.3}})
    ref = [dict(r, floor="0.02", distance="0.04" if r["method"] == "qgpo" else "0.1") for r in ref]
    ref += [dict(r, seed="1", distance="0.06") for r in ref if r["task"] == "moons" and r["energy_steps"] == "2000"]
    fit = [dict(r, critic="regression", err_mean="0.7", critic_steps="1500") for r in ref if r["task"] == "moons"
           and r["energy_steps"] == "2000"]  # seeds 0 and 1 of both methods, the reference's distances...
    for r in fit:  # ...then the fitted critic's: qgpo 0.08 / 0.10, mse 0.12 (seed 0 only) over a floor of 0.02
        r["distance"] = {("qgpo", "0"): "0.08", ("qgpo", "1"): "0.10", ("mse", "0"): "0.12"}.get(
            (r["method"], r["seed"]), "0.2")
    fit = [r for r in fit if not (r["method"] == "mse" and r["seed"] == "1")]
    fit.append(dict(fit[0], energy_steps="1000"))  # not at the converged budget: named, not tabled
    fit.append(dict(fit[0], task="rings"))  # rings has no converged budget on the reference
    pairs = {p["method"]: p for p in conv.critic_pairs(fit, ref)}
    assert set(pairs) == {"qgpo", "mse"} and all(p["steps"] == 2000 for p in pairs.values())
    q, m = pairs["qgpo"], pairs["mse"]
    assert q["seeds"] == ["0", "1"] and q["paired"] == ["0", "1"]
    assert q["true"] == pytest.approx(2.5) and q["fitted"] == pytest.approx(4.5)  # (0.04+0.06)/2, (0.08+0.10)/2
    assert q["ratio"] == pytest.approx(1.8) and q["vs_qgpo"] == pytest.approx(1.0)
    assert q["fitted_err"] == pytest.approx(0.7) and q["true_err"] == pytest.approx(0.5)
    # mse: true reward over its two seeds (0.1, 0.06: 4.0x), fitted seed 0 alone (6.0x), paired on seed 0 (0.12/0.1)
    assert m["seeds"] == ["0"] and m["paired"] == ["0"] and m["true"] == pytest.approx(4.0)
    assert m["ratio"] == pytest.approx(1.2) and m["vs_qgpo"] == pytest.approx(6.0 / 4.5)
    text = conv.critic_markdown(fit, ref)
    assert "| moons | mse | 1500 | 2000 | 0 | 4.00 | 6.00 | 1.20 (0) | 1.33 | 0.300 | 0.700 |" in text
    assert ("Left out (not at a budget the true-reward curve shows converged on their task): moons qgpo at 1000, "
            "rings qgpo at 2000.") in text
    # bad input: true-reward rows among the fitted critic's; nothing at a converged budget
    with pytest.raises(ValueError, match="critic 'reward'"):
        conv.critic_pairs(ref, ref)
    with pytest.raises(ValueError, match="none at a task's converged budget.*moons 2000"):
        conv.critic_pairs([dict(fit[0], energy_steps="4000")], ref)
    with pytest.raises(ValueError, match="critic_steps"):  # a fitted row that does not say its critic's budget
        conv.critic_pairs([dict(fit[0], critic_steps="")], ref)

    def write(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, conv.COLUMNS)
            w.writeheader()
            w.writerows({**{c: "" for c in conv.COLUMNS}, **r, "draws": "4"} for r in rows)
    write(tmp_path / "toy2d_convergence.csv", ref)
    write(tmp_path / "fit.csv", fit)
    base = ["toy-convergence", "--render-only", "--critic", "regression", "--reference-csv",
            str(tmp_path / "toy2d_convergence.csv")]
    assert main(base + ["--csv", str(tmp_path / "fit.csv")]) == 0
    assert (tmp_path / "fit.png").stat().st_size > 0 and text in (tmp_path / "fit.md").read_text()
    assert not (tmp_path / "toy2d_convergence.md").exists()  # the reference's own page is not rewritten
    assert main(base + ["--csv", str(tmp_path / "toy2d_convergence.csv")]) != 0  # into the reference: refused
    assert "a CSV of their own" in capsys.readouterr().err
    # the figure's bars are the table's means
    figs = []
    monkeypatch.setattr(conv, "atomic_save_figure", lambda path, fig, **kw: figs.append(fig) or Path(path))
    conv.render_critic(tmp_path / "fit.csv", tmp_path / "toy2d_convergence.csv", tmp_path)
    bars = {p.get_gid(): p.get_height() for p in figs[0].axes[0].patches if p.get_gid()}
    assert bars == pytest.approx({"moons qgpo true": 2.5, "moons qgpo fitted": 4.5, "moons mse true": 4.0,
                                  "moons mse fitted": 6.0})
    # a second critic budget beside the first: its own rows, compared with QGPO's of the same budget, its own bars
    longer = [dict(r, critic_steps="24000", distance="0.03") for r in fit
              if r["energy_steps"] == "2000" and r["task"] == "moons" and r["seed"] == "0"]
    pairs = {(p["method"], p["critic_steps"]): p for p in conv.critic_pairs(fit + longer, ref)}
    assert set(pairs) == {("qgpo", 1500), ("mse", 1500), ("qgpo", 24000), ("mse", 24000)}
    assert pairs[("qgpo", 24000)]["fitted"] == pytest.approx(1.5) and pairs[("mse", 24000)]["vs_qgpo"] == 1.0
    assert pairs[("qgpo", 1500)] == conv.critic_pairs(fit, ref)[1] | {"critic_steps": 1500}
    assert "| moons | qgpo | 24000 | 2000 | 0 | 2.50 | 1.50 | 0.75 (0) | 1.00 |" in conv.critic_markdown(fit + longer, ref)
    write(tmp_path / "fit2.csv", fit + longer)
    figs.clear()
    conv.render_critic(tmp_path / "fit2.csv", tmp_path / "toy2d_convergence.csv", tmp_path)
    bars = {p.get_gid(): p.get_height() for p in figs[0].axes[0].patches if p.get_gid()}
    assert bars == pytest.approx({"moons qgpo true": 2.5, "moons qgpo fitted 1500": 4.5, "moons qgpo fitted 24000": 1.5,
                                  "moons mse true": 4.0, "moons mse fitted 1500": 6.0, "moons mse fitted 24000": 1.5})
    write(tmp_path / "old.csv", [{k: v for k, v in r.items() if k != "critic_steps"} for r in fit])
    with pytest.raises(ValueError, match="critic_steps"):  # a fitted-critic CSV made before the column
        conv.read_rows(tmp_path / "old.csv")
