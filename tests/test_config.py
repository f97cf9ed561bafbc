"""Configs are the command line: every field is a flag, presets are data, files round-trip, bad keys are named."""
from __future__ import annotations

import json
from dataclasses import fields, is_dataclass

import pytest

from aepo_lite.cli import main
from aepo_lite.config import PRESETS, ToyConfig, TrainConfig, apply_overrides, field_paths, flatten, \
    load_config_file, preset_config, to_dict


def _value_for(current):
    """A valid value different from the current one, and its command-line spelling."""
    if isinstance(current, bool):
        return (not current), None
    if isinstance(current, int):
        return current + 1, [str(current + 1)]
    if isinstance(current, float):
        return current / 2 + 0.25, [repr(current / 2 + 0.25)]
    if isinstance(current, str):
        return current + "x", [current + "x"]
    if isinstance(current, tuple):
        return (0.5, 2.0), ["0.5", "2.0"]
    if current is None:
        return 7, ["7"]
    raise TypeError(type(current))


def _get(cfg, path):
    for k in path.split("."):
        cfg = getattr(cfg, k)
    return cfg


@pytest.mark.parametrize("cls", [TrainConfig, ToyConfig])
def test_every_config_field_is_a_flag(cls, monkeypatch):
    """Enumerate every leaf field; set it from the command line; check the parsed config holds it."""
    from dataclasses import field, make_dataclass
    from typing import Annotated

    import tyro

    from aepo_lite.cli._config import ConfigCommand, parse_command
    Cmd = make_dataclass("Cmd", [("config_values", Annotated[cls, tyro.conf.arg(name="")], field(default_factory=cls))],
                         bases=(ConfigCommand,))

    base = preset_config(cls, "smoke")
    paths = field_paths(cls)
    assert len(paths) > 40
    for path in paths:
        if path == "preset":
            continue
        want, spelled = _value_for(_get(base, path))
        flag = "--" + path.replace("_", "-")
        if isinstance(want, bool):
            argv = [flag] if want else ["--" + _no(path)]
        else:
            argv = [flag, *spelled]
        got = parse_command(Cmd, cls, ["--preset", "smoke", *argv], prog="t", description="t").config_values
        assert _get(got, path) == want, (path, argv)


def _no(path: str) -> str:
    *parents, leaf = path.replace("_", "-").split(".")
    return ".".join(parents + ["no-" + leaf])


def test_presets_are_overrides_of_existing_fields():
    for kind, cls in (("rl", TrainConfig), ("toy", ToyConfig)):
        for name, over in PRESETS[kind].items():
            cfg = preset_config(cls, name)
            assert cfg.preset == name
            for k, v in flatten(over).items():
                assert json.dumps(flatten(to_dict(cfg))[k]) == json.dumps(v), (kind, name, k)


def test_unknown_key_names_the_nearest_fields(tmp_path):
    with pytest.raises(ValueError, match=r"energy\.betta: not a config field; did you mean 'beta'"):
        apply_overrides(TrainConfig(), {"energy": {"betta": 3}})
    with pytest.raises(ValueError, match=r"behavior: not a config field; did you mean 'behaviour'"):
        apply_overrides(TrainConfig(), {"behavior": {}})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"critic": {"expectle": 0.9}}))
    with pytest.raises(ValueError, match=r"critic\.expectle.*'expectile'"):
        load_config_file(p, TrainConfig)


def test_config_file_that_does_not_parse_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "seed": 1,\n  "energy": {"beta": }\n}\n')
    with pytest.raises(ValueError, match=r"bad\.json line 3 does not parse as JSON"):
        load_config_file(p, TrainConfig)
    y = tmp_path / "bad.yaml"
    y.write_text("seed: 1\nenergy:\n  beta: [3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml line \d+ does not parse as YAML"):
        load_config_file(y, TrainConfig)


def test_config_file_round_trip_and_precedence(tmp_path, capsys):
    out = tmp_path / "resolved.json"
    assert main(["train", "--preset", "smoke", "--dataset", "a/b/c-v0", "--energy.beta", "5",
                 "--save-config", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["energy"]["beta"] == 5 and saved["preset"] == "smoke" and saved["behaviour"]["steps"] == 60
    # the file is read back; a flag given after it wins
    out2 = tmp_path / "again.json"
    assert main(["train", "--config", str(out), "--seed", "4", "--save-config", str(out2)]) == 0
    again = json.loads(out2.read_text())
    assert again["seed"] == 4 and again["energy"]["beta"] == 5 and again["behaviour"]["steps"] == 60
    y = tmp_path / "c.yaml"
    y.write_text("preset: smoke\ndataset: a/b/c-v0\nenergy:\n  beta: 7\n")
    out3 = tmp_path / "y.json"
    assert main(["train", "--config", str(y), "--save-config", str(out3)]) == 0
    assert json.loads(out3.read_text())["energy"]["beta"] == 7


def test_a_yaml_config_overrides_the_preset_only_where_it_names_a_field(tmp_path):
    """`train --preset bench --config X.yaml` gave the full preset's sizes (the YAML was read into a complete
    config, its unnamed fields at the class defaults, and laid over the preset): it must resolve as a sweep's
    `--overrides X.yaml` does (make_config: the preset, the domain, then the file), flags last."""
    from aepo_lite.config import TrainConfig, preset_config, to_dict
    from aepo_lite.rl.agent import make_config
    y = tmp_path / "over.yaml"
    y.write_text("critic:\n  layer_norm: true\n  steps: 40\nenergy:\n  posterior: particles\n  hidden: 32\n")
    out = tmp_path / "r.json"
    assert main(["train", "--preset", "smoke", "--config", str(y), "--dataset", "a/b/c-v0", "--method", "aepo",
                 "--seed", "3", "--save-config", str(out)]) == 0
    got = json.loads(out.read_text())
    want = to_dict(make_config("a/b/c-v0", "aepo", "smoke", seed=3, critic={"layer_norm": True, "steps": 40},
                               energy={"posterior": "particles", "hidden": 32}))
    assert got == want
    smoke, full = preset_config(TrainConfig, "smoke"), TrainConfig()
    assert smoke.behaviour.steps != full.behaviour.steps  # else the check below could not fail
    assert got["behaviour"]["steps"] == smoke.behaviour.steps and got["critic"]["steps"] == 40
    # the file's preset when no flag names one; a flag over the file's own value
    y2 = tmp_path / "p.yaml"
    y2.write_text("preset: smoke\ndataset: a/b/c-v0\nenergy:\n  beta: 7\n")
    out2 = tmp_path / "p.json"
    assert main(["train", "--config", str(y2), "--energy.beta", "9", "--save-config", str(out2)]) == 0
    got2 = json.loads(out2.read_text())
    assert got2["preset"] == "smoke" and got2["behaviour"]["steps"] == smoke.behaviour.steps
    assert got2["energy"]["beta"] == 9
    # an unknown field in the file is an error naming it
    y3 = tmp_path / "bad.yaml"
    y3.write_text("energy:\n  betta: 3\n")
    assert main(["train", "--preset", "smoke", "--dataset", "a/b/c-v0", "--config", str(y3)]) == 2


def test_train_needs_an_explicit_preset(capsys):
    assert main(["train", "--dataset", "a/b/c-v0"]) == 2
    err = capsys.readouterr().err
    assert "preset: choose one with --preset" in err and "smoke" in err and "full" in err


def test_misspelled_flag_names_the_nearest_flag(capsys):
    assert main(["train", "--preset", "smoke", "--dataset", "a/b/c-v0", "--energy.betta", "3"]) == 2
    err = capsys.readouterr().err
    assert "--energy.betta" in err and "--energy.beta" in err


def test_help_shows_field_comments(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--energy.beta" in text and "inverse temperature" in text and "--behaviour.steps" in text


def test_parts_are_dataclasses_with_a_comment_per_field():
    import inspect
    for cls in (TrainConfig, ToyConfig):
        src = inspect.getsource(cls)
        for f in fields(cls):
            if not is_dataclass(f.default_factory() if callable(f.default_factory) else None):
                line = [ln for ln in src.splitlines() if ln.strip().startswith(f.name + ":")][0]
                assert "#" in line, f"{cls.__name__}.{f.name} has no comment (its --help text)"
