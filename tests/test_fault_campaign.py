"""The fault campaign (scripts/fault_campaign.py): its classifier on synthetic outputs, and a representative
subset of its cases run for real through the same code, each of which must be refused cleanly."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def fc():
    return load_script("fault_campaign")


TRACEBACK = """Traceback (most recent call last):
  File "/x/aepo_lite/rl/agent.py", line 132, in check_config
    if not (math.isfinite(cfg.energy.beta) and cfg.energy.beta >= 0):
TypeError: must be real number, not str
"""
BOX = """╭─ Value error ─────────────────────────────────────────────────────╮
│ Error parsing --seed: invalid literal for int() with base 10: 'x' │
│ ───────────────────────────────────────────────────────────────── │
│ For full helptext, see aepo-lite demo --help                      │
╰───────────────────────────────────────────────────────────────────╯
"""
BARS = ("behaviour:   0%|          | 0/60 [00:00<?, ?it/s]\rbehaviour:  33%|###3      | 20/60 [00:01<00:02, 19.6it/s]"
        "\rTD3 ladder Hopper-v5: 201it [00:20,  8.42it/s, ret=5]\n")
WARNING = ("/x/gymnasium/envs/registration.py:512: UserWarning: WARN: the environment is out of date\n"
           "  logger.warn(\n")


@pytest.mark.parametrize("rc, err, names, expect, outcome", [
    (1, TRACEBACK, ("energy.beta",), "refuse", "traceback"),
    (2, "aepo-lite train: error: energy.beta: expected a number\n" + TRACEBACK, (), "refuse", "traceback"),
    (0, "", ("seed",), "refuse", "accepted"),
    (2, "aepo-lite train: error: seed: expected an integer in [0, 2**63-1], got -1\n", ("seed",), "refuse",
     "ok-refused"),
    (2, "aepo-lite train: error: expected a positive integer, got 0\n", ("behaviour.steps",), "refuse", "unclear"),
    (2, BOX, ("seed",), "refuse", "unclear"),
    (2, "", ("seed",), "refuse", "unclear"),
    (2, "usage: aepo-lite toy-grid [-h] [--seeds SEEDS]\naepo-lite toy-grid: error: argument --seeds: invalid\n",
     ("seeds",), "refuse", "unclear"),
    (1, "aepo-lite eval: error: internal error (AttributeError: 'list' object has no attribute 'get' at "
        "agent.py:529); this is a bug in aepo-lite: re-run with --debug\n", ("results.json",), "refuse",
     "internal-error"),
    (1, "aepo-lite figures: offline RL: the renderer failed on r.csv: TypeError: '<' not supported\n", ("r.csv",),
     "refuse", "internal-error"),
    (1, "aepo-lite eval: error: r.json is not valid JSON (JSONDecodeError at line 21): damaged\n", ("r.json",),
     "refuse", "ok-refused"),
    (2, BARS + WARNING + "config: {}\naepo-lite train: error: critic.tau_target: expected a value <= 1.0\n",
     ("critic.tau-target",), "refuse", "ok-refused"),  # bars, warnings, the echo aside; - and _ alike
    (None, "", (), "refuse", "timeout"),
    (130, BARS + "aepo-lite train: error: interrupted; files written so far are complete\n", (), "interrupt", "ok"),
    (0, BARS, (), "interrupt", "accepted"),
    (1, "aepo-lite train: error: interrupted\nsomething else\n", (), "interrupt", "unclear"),
    (0, BARS, (), "succeed", "ok"),
    (1, "aepo-lite train: error: no\n", (), "succeed", "failed"),
    (2, TRACEBACK + "aepo-lite train: error: seed: expected an integer\n", (), "debug", "ok"),
    (2, "aepo-lite train: error: seed: expected an integer\n", (), "debug", "failed"),
    (-9, "", (), "killed", "ok"),
])
def test_classifier(fc, rc, err, names, expect, outcome):
    assert fc.classify(rc, err, names, expect)[0] == outcome


def test_message_lines_drop_bars_warnings_and_the_echo(fc):
    err = BARS + WARNING + "preset: smoke (seconds)\nconfig: {}\naepo-lite toy: warning: x\naepo-lite toy: error: y\n"
    assert fc.message_lines(err) == ["aepo-lite toy: error: y"]


def test_a_changed_kept_file_is_data_loss_and_a_lock_file_is_not(fc, tmp_path):
    case = fc.Case("x/y", "x", "data-loss", "", keep=("r",))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{}")
    before = {"r": fc._digest(tmp_path / "r")}
    (tmp_path / "r" / ".lock").write_text("12345")  # the pid of the last writer: bookkeeping
    assert fc._lost(case, tmp_path, before) == ""
    (tmp_path / "r" / "results.json").write_text('{"rows": []}')
    assert "results.json" in fc._lost(case, tmp_path, before)
    (tmp_path / "r" / "results.json").unlink()
    assert "r changed" in fc._lost(case, tmp_path, before)


def test_the_campaign_covers_every_command_and_category(fc):
    cases = fc.all_cases()
    assert len(cases) >= 150 and len({c.id for c in cases}) == len(cases)
    from aepo_lite.cli import build_parser, config_commands
    commands = set(config_commands()) | set(build_parser()._subparsers._group_actions[0].choices)
    assert commands <= {c.command for c in cases}
    assert {"bad-number", "bad-path", "bad-dataset", "corrupt-file", "unknown-key", "bad-config", "conflict",
            "interrupt", "lock", "resume", "disk-full", "data-loss"} <= {c.category for c in cases}
    assert all(c.names for c in cases if c.expect == "refuse")  # every refusal must name something


SUBSET = ("train/seed-1e20", "train/energy-clip-negative", "train/config-beta-string", "train/out-under-a-file",
          "train/dataset-traversal", "eval/run-missing", "toy/task", "toy-grid/csv-garbled", "toy-grid/unknown-flag",
          "sweep/preset-unknown", "bench/device-tpu", "demo/seed-1e20", "figures/dir-without-results",
          "make-dataset/name-traversal", "rl-results/runs-empty", "lab/root-is-a-file", "cli/unknown-command")


def test_a_representative_subset_is_refused_cleanly(fc, tmp_path):
    """Real subprocesses, the campaign's own runner and classifier; none of these needs a dataset or a run (they
    are refused before one is read), so the fixtures are not made."""
    by_id = {c.id: c for c in fc.all_cases()}
    cases = [dataclasses.replace(by_id[i], needs=()) for i in SUBSET]
    records = fc.run_cases(cases, tmp_path, jobs=2, log=lambda *a: None)
    bad = {r["id"]: (r["outcome"], r["detail"]) for r in records if r["outcome"] != "ok-refused"}
    assert not bad, bad
