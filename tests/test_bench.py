"""``aepo-lite bench`` at a tiny size: it times the library's own learners, its config is the library's
config parts (defaults: the full preset), the extrapolation arithmetic, the command line, bad input."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from aepo_lite import bench
from aepo_lite.cli import main
from aepo_lite.cli.bench import parse
from aepo_lite.config import TrainConfig, field_paths, preset_config
from aepo_lite.core.aepo import EnergyLearner
from aepo_lite.core.critics import IQLCritic, InSupportCritic
from aepo_lite.training import BehaviourLearner, RegressionLearner

STAGES = ("behaviour", "critic_iql", "critic_insupport", "energy_aepo", "energy_mse", "energy_qgpo",
          "support_sampling", "guided_b1", "guided_b8")
PARTS = ("behaviour", "critic", "support", "energy", "sampling")


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(bench.tiny_config())


def test_schema_and_rates(result):
    assert set(result) == {"environment", "config", "stages", "extrapolation"}
    env = result["environment"]
    for key in ("device", "torch", "numpy", "python", "aepo_lite", "cpu_count", "torch_threads",
                "load_average_1min", "load_average_1min_start"):
        assert key in env
    assert env["device"] == "cpu" and env["torch_threads"] == 1
    assert tuple(result["stages"]) == STAGES
    for name, s in result["stages"].items():
        assert s["unit"] == ("samples/s" if "sampl" in name or name.startswith("guided") else "steps/s")
        assert math.isfinite(s["rate"]) and s["rate"] > 0
        assert s["rate"] == pytest.approx((s["batch"] if s["unit"] == "samples/s" else 1) / s["seconds_per_call"])
        assert all(math.isfinite(r) and r > 0 for r in s["repeats"])
        assert s["warmup_seconds"] >= 0
    assert result["stages"]["support_sampling"]["batch"] == (bench.SUPPORT_CHUNK // 4) * 4  # one chunk, K = 4
    assert result["config"]["energy"]["n_samples"] == 4 and result["config"]["behaviour"]["batch"] == 64
    json.dumps(result)  # JSON-ready as is


def test_defaults_are_the_full_preset():
    """The config parts are the library's, with the full preset's values; every one of their fields is a flag."""
    full, cfg = preset_config(TrainConfig, "full"), bench.BenchConfig()
    for part in PARTS:
        assert getattr(cfg, part) == getattr(full, part)
    bench_paths = set(field_paths(bench.BenchConfig))
    assert {p for p in field_paths(TrainConfig) if p.split(".")[0] in PARTS} <= bench_paths
    cmd = parse(["--energy.expansion", "first", "--support.k", "8", "--critic.kind", "iql", "--methods", "aepo"])
    c = cmd.config_values
    assert (c.energy.expansion, c.support.k, c.critic.kind, c.methods) == ("first", 8, "iql", ("aepo",))
    assert c.behaviour == full.behaviour


def test_stages_run_the_library_learners(monkeypatch):
    """Every timed training step is the library learner's own ``step`` (counted here), nothing else."""
    calls: dict = {}
    for cls in (BehaviourLearner, IQLCritic, InSupportCritic, EnergyLearner, RegressionLearner):
        orig = cls.step

        def counted(self, batch, _orig=orig):
            key = (type(self).__name__, getattr(self, "method", None))
            calls[key] = calls.get(key, 0) + 1
            return _orig(self, batch)
        monkeypatch.setattr(cls, "step", counted)
    bench.run_bench(bench.tiny_config())
    assert set(calls) == {("BehaviourLearner", None), ("IQLCritic", None), ("InSupportCritic", None),
                          ("EnergyLearner", "aepo"), ("EnergyLearner", "mse"), ("EnergyLearner", "qgpo")}
    assert all(n >= 3 for n in calls.values())  # warm-up, calibration and the timed loop


def test_agent_networks_shared_and_frozen():
    cfg = bench.tiny_config(critic=dict(kind="insupport"), methods=("aepo", "qgpo"))
    st = bench.RLStages(cfg, torch.device("cpu"))
    a, q = st.agents["aepo"], st.agents["qgpo"]
    assert a.behaviour is q.behaviour and a.critic is q.critic  # critic.kind set: one critic for both methods
    assert isinstance(a.critic, InSupportCritic) and set(st.critics) == {"insupport"}
    assert a.energy.state_dim == 11 and a.behaviour.net.state_dim == 11
    plan = st.plan()
    assert [t.name for t in plan] == ["behaviour", "critic_insupport", "energy_aepo", "energy_qgpo",
                                      "support_sampling", "guided_b1", "guided_b8"]
    assert all(p.requires_grad for p in a.behaviour.parameters())
    bench.time_plan(plan, cfg, torch.device("cpu"))
    for net in (a.behaviour, a.critic, a.energy, q.energy):  # frozen after their stage, as the agent does
        assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_extrapolation_arithmetic(result):
    full, ex, st = preset_config(TrainConfig, "full"), result["extrapolation"], result["stages"]
    assert ex["preset"] == "full"
    assert ex["work"]["behaviour"] == full.behaviour.steps == 600_000
    assert ex["work"]["critic_insupport"] == ex["work"]["critic_iql"] == full.critic.steps
    assert ex["work"]["energy_qgpo"] == full.energy.steps == 1_000_000
    assert ex["work"]["support_sampling"] == bench.BenchConfig().dataset_size * full.support.k
    for name, sec in ex["seconds"].items():
        assert sec == pytest.approx(ex["work"][name] / st[name]["rate"])
    assert ex["pipelines"]["qgpo"]["stages"] == ["behaviour", "support_sampling", "critic_insupport", "energy_qgpo"]
    # the default AEPO estimator (the particle target) reads support actions
    assert ex["pipelines"]["aepo"]["stages"] == ["behaviour", "support_sampling", "critic_iql", "energy_aepo"]
    for p in ex["pipelines"].values():
        assert p["seconds"] == pytest.approx(sum(ex["seconds"][n] for n in p["stages"]))
        assert p["hours"] == pytest.approx(p["seconds"] / 3600)
    ev = ex["evaluation"]  # 10 environments stepped together: timed at the nearest batch, 8
    assert ev["rows"] == full.eval.envs and ev["timed_stage"] == "guided_b8"
    assert ev["sampler_calls"] == len(full.sampling.guidance_scales) * 1000
    assert ev["seconds"] == pytest.approx(ev["sampler_calls"] * st["guided_b8"]["seconds_per_call"])
    assert {"behaviour.batch", "support.k", "energy.n_samples"} <= set(ex["differs_from_preset"])
    assert "sampling.guidance_scales" not in ex["differs_from_preset"]


def test_extrapolate_by_hand():
    stages = {"behaviour": {"rate": 100.0}, "critic_iql": {"rate": 50.0}, "energy_aepo": {"rate": 20.0},
              "guided_b1": {"batch": 1, "rate": 10.0, "seconds_per_call": 0.1},
              "guided_b64": {"batch": 64, "rate": 320.0, "seconds_per_call": 0.2}}
    work = {"behaviour": 1000, "critic_iql": 500, "energy_aepo": 200, "energy_mse": 7}
    ex = bench.extrapolate(stages, "p", work, {"aepo": ["behaviour", "critic_iql", "energy_aepo"],
                                               "mse": ["behaviour", "critic_iql", "energy_mse"]},
                           evaluation=(30, 40, "n"))
    assert ex["seconds"] == {"behaviour": 10.0, "critic_iql": 10.0, "energy_aepo": 10.0}
    assert ex["pipelines"] == {"aepo": {"stages": ["behaviour", "critic_iql", "energy_aepo"], "seconds": 30.0,
                                        "hours": 30.0 / 3600}}  # mse's energy stage was not timed: no row
    assert ex["evaluation"]["timed_stage"] == "guided_b64" and ex["evaluation"]["seconds"] == pytest.approx(6.0)
    assert bench.extrapolate({}, "p", work, {})["evaluation"] is None


def test_markdown(result):
    md = bench.to_markdown(result)
    assert "| behaviour |" in md and "| qgpo | behaviour + support_sampling + critic_insupport" in md
    assert "Timed at settings other than the full preset's" in md and "torch" in md
    assert bench.to_markdown(json.loads(json.dumps(result, sort_keys=True))) == md  # saved JSON renders the same


def test_markdown_of_a_result_saved_before_the_config_parts():
    """figures/bench_*.json written by the earlier bench (``full_preset``, ``cep`` names) still render."""
    saved = {"environment": {"device": "cpu", "cpu": "x", "cpu_count": 2, "torch_threads": 1, "load_average_1min": 1.0,
                             "torch": "t", "numpy": "n", "python": "p", "aepo_lite": "a"},
             "stages": {"energy_cep": {"batch": 256, "rate": 4.0, "unit": "steps/s"},
                        "behaviour": {"batch": 4096, "rate": 2.0, "unit": "steps/s"}},
             "full_preset": {"work": {"behaviour": 600_000, "energy_cep": 1_000_000},
                             "seconds": {"behaviour": 300_000.0, "energy_cep": 250_000.0},
                             "pipelines": {"cep": {"stages": ["behaviour", "energy_cep"], "seconds": 550_000.0}},
                             "evaluation": {"note": "at batch 1", "seconds": 60.0}}}
    md = bench.to_markdown(saved)
    assert md.index("| behaviour |") < md.index("| energy_cep |")
    assert "| cep | behaviour + energy_cep | 152h46m |" in md and "| evaluation sweep | at batch 1 | 1m00s |" in md
    assert "load average 1.0 at the end" in md


def test_toy_stages():
    r = bench.run_bench(bench.tiny_config(toy="8gaussians", toy_preset="smoke", methods=("aepo", "qgpo")))
    n = preset_config(bench.ToyConfig, "smoke").eval.n_samples
    assert tuple(r["stages"]) == ("behaviour", "critic_regression", "energy_aepo", "energy_qgpo", f"unguided_b{n}",
                                  f"guided_b{n}")
    assert r["stages"]["energy_qgpo"]["batch"] == 256 and r["stages"]["behaviour"]["batch"] == 512  # toy sizes
    ex = r["extrapolation"]
    assert ex["preset"] == "toy smoke" and ex["work"]["behaviour"] == 1500
    fitted = preset_config(bench.ToyConfig, "smoke").critic.kind == "regression"
    assert ex["pipelines"]["qgpo"]["stages"] == ["behaviour"] + ["critic_regression"] * fitted + ["energy_qgpo"]
    assert ex["evaluation"]["seconds"] == pytest.approx(r["stages"][f"guided_b{n}"]["seconds_per_call"])
    assert "| critic_regression |" in bench.to_markdown(r)


@pytest.mark.parametrize("kind", ["reward", "regression"])
def test_toy_energies_read_the_presets_critic(kind, monkeypatch):
    """As the toy runs: with critic.kind "regression" every method's Q is the fitted critic, else the true e(x)."""
    from aepo_lite.config import PRESETS
    smoke = PRESETS["toy"]["smoke"]
    monkeypatch.setitem(smoke, "critic", dict(smoke.get("critic", {}), kind=kind))
    st = bench.ToyStages(bench.tiny_config(toy="8gaussians", toy_preset="smoke", methods=("mse", "qgpo")),
                         torch.device("cpu"))
    calls = []
    st.critic.register_forward_hook(lambda *_: calls.append(1))
    plan = {t.name: t for t in st.plan()}
    for name in ("energy_mse", "energy_qgpo"):
        before = len(calls)
        plan[name].build()()
        assert (len(calls) > before) == (kind == "regression")
    ex = st.extrapolate({name: {"rate": 1.0, "batch": 1, "seconds_per_call": 1.0} for name in plan})
    assert ("critic_regression" in ex["pipelines"]["mse"]["stages"]) == (kind == "regression")


@pytest.mark.parametrize("overrides, name", [
    (dict(device="tpu"), "device"), (dict(methods=("cep",)), "methods"), (dict(methods=()), "methods"),
    (dict(sample_batches=(0,)), "sample_batches"), (dict(repeats=0), "repeats"), (dict(min_time=0.0), "min_time"),
    (dict(toy="nope"), "toy"), (dict(toy="8gaussians", toy_preset="big"), "toy_preset"),
    (dict(energy=dict(expansion="bogus")), "energy.expansion"), (dict(support=dict(k=0)), "support.k"),
    (dict(compile=True, energy=dict(expansion="second")), "compile"), (dict(guidance_scale=-1.0), "guidance_scale"),
])
def test_bad_config(overrides, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        bench.run_bench(bench.tiny_config(**overrides))


def test_cli_help(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--energy.expansion" in out and "--behaviour.batch" in out and "--toy" in out
    assert "AEPO expansion of Q" in out  # the field's comment is its help


def test_cli_quick_then_flags():
    c = parse(["--quick", "--repeats", "2"]).config_values
    assert (c.warmup, c.min_time, c.repeats) == (1, 0.2, 2)
    assert parse(["--tiny"]).config_values.behaviour.batch == 64


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--methods", "qgpo", "--sample-batches", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["stages"]) == {"behaviour", "critic_insupport", "energy_qgpo", "support_sampling", "guided_b1"}
    assert data["config"]["methods"] == ["qgpo"] and data["extrapolation"]["pipelines"]["qgpo"]
    assert out.with_suffix(".md").read_text().startswith("| stage |")
    assert "energy_qgpo" in capsys.readouterr().out


def test_cli_bad_input(capsys):
    assert main(["bench", "--tiny", "--device", "tpu"]) == 2
    assert "device:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --compile
def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_wiring_cpu():
    """compile=True compiles every network a training stage runs, in place (lazily: nothing compiles until called)."""
    cpu = torch.device("cpu")
    st = bench.RLStages(bench.tiny_config(compile=True), cpu)
    nets = [st.behaviour.net] + [n for c in st.critics.values() for n in c.children()]
    nets += [a.energy for a in st.agents.values()]
    assert len(nets) == 1 + 3 + 2 + 3 and all(_compiled(n) for n in nets)  # IQL: q, q_target, v; insupport: q, q_target
    assert st.step_begin is bench._noop  # CUDA-graph step marks only on CUDA
    plain = bench.RLStages(bench.tiny_config(), cpu)
    assert not any(_compiled(m) for a in plain.agents.values() for m in a.behaviour.modules())
    assert not any(_compiled(m) for c in plain.critics.values() for m in c.modules())


def test_every_stage_call_is_one_cuda_graph_step():
    """With CUDA graphs (compiled, on CUDA) each training step and each sampler call first marks a new CUDA-graph
    step; here the mark is counted on the CPU."""
    for stages in (bench.RLStages(bench.tiny_config(), torch.device("cpu")),
                   bench.ToyStages(bench.tiny_config(toy="8gaussians", toy_preset="smoke", methods=("mse",)),
                                   torch.device("cpu"))):
        marks = []
        stages.step_begin = lambda: marks.append(1)
        plan = stages.plan()
        for t in plan:
            call = t.build()
            call()
            call()
        assert len(marks) == 2 * len(plan)


@pytest.mark.skipif(os.environ.get("AEPO_SLOW") != "1",
                    reason="slow: inductor + gcc compile every network and the fused sampler step: 176 s on 2 shared CPU cores with "
                           "an empty inductor cache; AEPO_SLOW=1 runs it")
def test_compile_path_cpu():
    """The whole bench compiled on the CPU at the tiny size (training networks and the guided sampler): every stage
    runs compiled, with no graph breaks."""
    from torch._dynamo.utils import counters
    before = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    result = bench.run_bench(bench.tiny_config(compile=True, sampling=dict(compile=True)))
    assert tuple(result["stages"]) == STAGES and result["config"]["compile"] is True
    for stage in result["stages"].values():
        assert math.isfinite(stage["rate"]) and stage["rate"] > 0 and stage["warmup_seconds"] > 0
    graphs, breaks = counters["stats"]["unique_graphs"] - before[0], sum(counters["graph_break"].values()) - before[1]
    assert breaks == 0
    assert graphs >= 10  # one per network, grad mode and static shape, not eager fallbacks
