"""``aepo-lite bench`` at a tiny size: the JSON schema, positive finite rates, the extrapolation arithmetic."""
from __future__ import annotations

import json
import math

import pytest

from aepo_lite import bench
from aepo_lite.cli import main

STAGES = ("behaviour", "critic_iql", "critic_softmax", "energy_aepo", "energy_mse", "energy_cep", "support_sampling",
          "guided_b1", "guided_b8")


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(bench.tiny_config())


def test_schema_and_rates(result):
    assert set(result) == {"environment", "config", "stages", "full_preset"}
    env = result["environment"]
    for key in ("device", "torch", "numpy", "python", "aepo_lite", "cpu_count", "torch_threads"):
        assert key in env
    assert env["device"] == "cpu"
    assert tuple(result["stages"]) == STAGES
    for name, s in result["stages"].items():
        assert s["unit"] == ("samples/s" if "sampl" in name or name.startswith("guided") else "steps/s")
        assert math.isfinite(s["rate"]) and s["rate"] > 0
        assert math.isfinite(s["seconds_per_call"]) and s["seconds_per_call"] > 0
        assert all(math.isfinite(r) and r > 0 for r in s["repeats"])
    assert result["stages"]["support_sampling"]["batch"] == 16 * 4  # batch 16 states x K = 4
    json.dumps(result)  # JSON-ready as is


def test_extrapolation_arithmetic(result):
    p, full, st = bench.FULL_PRESET, result["full_preset"], result["stages"]
    assert full["work"]["behaviour"] == p.behaviour_steps == 600_000
    assert full["work"]["energy_cep"] == p.energy_steps == 1_000_000
    assert full["work"]["critic_softmax"] == p.critic_steps == 500_000
    assert full["work"]["support_sampling"] == 2 * p.dataset_size * p.support_k
    for name, sec in full["seconds"].items():
        assert sec == pytest.approx(full["work"][name] / st[name]["rate"])
    for method, names in bench.PIPELINES.items():
        assert full["pipelines"][method]["seconds"] == pytest.approx(sum(full["seconds"][n] for n in names))
        assert full["pipelines"][method]["hours"] == pytest.approx(full["pipelines"][method]["seconds"] / 3600)
    ev = full["evaluation"]
    assert ev["sampler_calls"] == len(p.guidance_scales) * p.episode_len
    assert ev["seconds"] == pytest.approx(ev["sampler_calls"] * st["guided_b1"]["seconds_per_call"])


def test_extrapolate_by_hand():
    stages = {"behaviour": {"rate": 100.0}, "critic_iql": {"rate": 50.0}, "energy_aepo": {"rate": 20.0}}
    full = bench.extrapolate(stages, bench.FullPreset(behaviour_steps=1000, critic_steps=500, energy_steps=200))
    assert full["seconds"] == {"behaviour": 10.0, "critic_iql": 10.0, "energy_aepo": 10.0}
    assert full["pipelines"] == {"aepo": {"stages": ["behaviour", "critic_iql", "energy_aepo"], "seconds": 30.0,
                                          "hours": 30.0 / 3600}}
    assert full["evaluation"] is None


def test_markdown(result):
    md = bench.to_markdown(result)
    assert "| behaviour |" in md and "| aepo |" in md and "torch" in md
    assert bench.to_markdown(json.loads(json.dumps(result, sort_keys=True))) == md  # saved JSON renders the same


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0


def test_config_rejects_unknown_device():
    with pytest.raises(ValueError):
        bench.run_bench(bench.tiny_config(device="tpu"))


def test_cli_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "quick_config", bench.tiny_config)  # the command at the tiny size
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["stages"]) == set(STAGES) and data["full_preset"]["pipelines"]
    assert out.with_suffix(".md").read_text().startswith("| stage |")
    assert "behaviour" in capsys.readouterr().out
