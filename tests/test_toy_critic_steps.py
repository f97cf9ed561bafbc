"""The toy fitted critic trained alone (pipeline.train_critic) and its budget curve (toy.critic_steps)."""
import pytest
import torch

from aepo_lite.toy import critic_steps as CS
from aepo_lite.toy import pipeline as P
from aepo_lite.toy import tasks as toy


def _cfg(steps, task="moons", **over):
    return P.make_config(task, "mse", "smoke", device="cpu", n_data=4000,
                         eval=dict(n_ref_data=4000, pool_size=4000),
                         critic=dict(kind="regression", steps=steps, batch=256, hidden=32), **over)


def test_train_critic_is_the_runs_critic_and_its_rms_is_against_the_true_reward(tmp_path):
    cfg = _cfg(150, energy=dict(steps=5))
    critic, info = P.train_critic(cfg, cache_dir=tmp_path, progress=False)
    # independent check of the held-out RMS: fresh points of the task, the true 0/1 reward
    task = toy.get_task("moons")
    x = task.sample(4096, seed=99_991 + cfg.data_seed)
    with torch.no_grad():
        rms = float(((critic(x).squeeze(-1) - task.reward(x)) ** 2).mean().sqrt())
    assert info["heldout_rmse"] == pytest.approx(rms, rel=1e-6)
    assert 0.0 < rms < float(task.reward(x).std())  # learnt something: below predicting the mean
    # a full run of the same config loads that very critic from the cache instead of training another
    m = P.train_toy(cfg, cache_dir=tmp_path, progress=False)
    for a, b in zip(m.critic.state_dict().values(), critic.state_dict().values()):
        assert torch.equal(a, b)
    assert m.info["critic"]["heldout_rmse"] == pytest.approx(info["heldout_rmse"])


def test_train_critic_refuses_the_true_reward_and_bc(tmp_path):
    with pytest.raises(ValueError, match="critic.kind"):
        P.train_critic(P.make_config("moons", "mse", "smoke", critic=dict(kind="reward")), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="critic.kind"):
        P.train_critic(P.make_config("moons", "bc", "smoke", critic=dict(kind="regression")), cache_dir=tmp_path)


def test_critic_steps_curve_falls_resumes_and_renders(tmp_path, monkeypatch):
    csv = tmp_path / "toy2d_critic_steps.csv"
    cfgs = [_cfg(n) for n in (20, 400)]
    rows = CS.measure(cfgs, csv, cache_dir=tmp_path / "cache", progress=False)
    rms = {int(r["critic_steps"]): float(r["heldout_rmse"]) for r in rows}
    assert set(rms) == {20, 400} and rms[400] < 0.7 * rms[20]  # more steps fit e(x) better
    monkeypatch.setattr(P, "train_critic", lambda *a, **k: pytest.fail("a row the CSV has was trained again"))
    assert CS.measure(cfgs, csv, cache_dir=tmp_path / "cache", progress=False) == rows
    md, png = CS.render(csv, tmp_path)
    text = md.read_text()
    assert "| moons | 32 |" in text and f"{rms[400]:.4f}" in text and "20 steps" in text
    assert float(next(r for r in rows if r["critic_steps"] == "400")["seconds"]) > 0  # its training time
    assert png.stat().st_size > 0


def test_critic_steps_bad_input():
    with pytest.raises(ValueError, match="steps"):
        CS.configs(["moons"], [0])
    with pytest.raises(ValueError, match="task"):
        CS.configs(["nope"], [10])


def test_toy_grid_critic_steps_reach_the_fitted_critic_only():
    from aepo_lite.cli import build_parser
    from aepo_lite.cli.toy import _grid_configs
    base = ["toy-grid", "--tasks", "moons", "--methods", "qgpo", "bc", "--betas", "10", "--seeds", "0",
            "--critic", "reward", "regression"]
    preset = _grid_configs(build_parser().parse_args(base))
    cfgs = _grid_configs(build_parser().parse_args(base + ["--critic-steps", "12000"]))
    got = [(c.method, c.critic.kind, c.critic.steps) for c in cfgs]
    assert got == [(c.method, c.critic.kind, 12000 if c.critic.kind == "regression" else c.critic.steps)
                   for c in preset]
    assert ("qgpo", "regression", 12000) in got and preset[1].critic.steps != 12000
    for bad in (["--critic-steps", "0"], ["--critic-steps", "100", "--critic", "reward"]):
        with pytest.raises(ValueError, match="--critic-steps"):
            _grid_configs(build_parser().parse_args(base + bad))
