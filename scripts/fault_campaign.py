#!/usr/bin/env python
"""Fault campaign (issue 14): bad inputs and faults against every ``aepo-lite`` command.

  python scripts/fault_campaign.py                      # every case, 2 at a time; JSON in a temporary folder
  python scripts/fault_campaign.py --out /tmp/fc --only train,eval --jobs 2
  python scripts/fault_campaign.py --list               # the cases, by command and category

Each case runs ``python -m aepo_lite ...`` as a subprocess in a folder of its own (its working
directory, so default outputs such as ``runs/`` or ``figures/`` land there), with
``MINARI_DATASETS_PATH``, ``AEPO_POLICY_CACHE``, ``HOME`` and ``MPLCONFIGDIR`` inside the campaign's
folder, offline (``HF_HUB_OFFLINE=1``). What several cases share (a smoke dataset made by
``make-dataset``, smoke runs made by ``train``, copies of the results files) is made once, by the
same commands, and copied into a case's folder when the case damages it. Nothing in the repository
is written.

Each case is classified from its exit status, its stderr and the files it had to keep:

  ok-refused      exit status != 0, no traceback, and one message line (progress bars, warnings and the
                  config echo aside) that names the offending input (a flag, a field, a path or the value)
  ok              a case that must succeed did: Ctrl-C ending with 130 and one line, then a rerun that resumed
                  (finished stages untouched); a SIGKILL, then a rerun that resumed; --debug printing a traceback
  traceback       a Python traceback on stderr (only ``--debug`` may print one)
  internal-error  the error boundary's "internal error ... bug" line, or a message quoting a programming error
                  (``TypeError: ...``): an unchecked input reached the code
  unclear         no message, several lines, or a line that does not name the input
  accepted        exit status 0 where the input had to be refused
  data-loss       a file that had to survive changed or vanished, or a half-written file stayed behind
  broken-state    what the command left cannot be used by the next one (a failed resume, a partial folder)
  failed          a case that must succeed did not
  timeout         the command did not end in time (its process group is killed)

The run prints a table of outcomes per command and per category and writes every record to
``OUT/results.json``; its exit status is 0 only when every case is ``ok-refused``, ``ok`` or skipped.
Faults need no privileges except two kinds, skipped where they are missing: an unwritable folder
(``chmod``; as root the command runs under ``setpriv`` without CAP_DAC_OVERRIDE) and a full disk
(a small tmpfs in a private mount namespace, ``unshare -m``).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
DS = "local/hopper/random-v0"  # the campaign's smoke dataset
OUTCOMES = ("ok-refused", "ok", "traceback", "internal-error", "unclear", "accepted", "data-loss", "broken-state",
            "failed", "timeout", "skipped")
GOOD = ("ok-refused", "ok", "skipped")

# ----------------------------------------------------------------------------------------- classifying

# tqdm's bars ("stage:  40%|####  | 24/60 [00:01<00:02, 9.8it/s]", "TD3 ladder: 201it [00:20, 8.4it/s]")
_PROGRESS = re.compile(r"\d+%\|| \d+it \[|\d+(?:\.\d+)?(?:it/s|s/it)[\],]|\?it/s\]|\| *\d+/\d+ \[")
# the run's own echo, library warnings and the source line Python prints under a warning
_NOISE = re.compile(r"^(?:config:|preset:|aepo-lite [\w-]+: warning:|\S+:\d+: \w*Warning:|warnings\.warn\(|"
                    r"[\w.]*Warning:)")


# exceptions that are bugs, never a description of bad input (a damaged file gives JSONDecodeError, OSError ...)
_PROGRAM_ERROR = re.compile(r"\b(TypeError|AttributeError|NameError|IndexError|KeyError|ZeroDivisionError|"
                            r"UnboundLocalError|AssertionError): ")


def message_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that say something: without progress bars, warnings or blank lines."""
    out, after_warning = [], False
    for raw in stderr.replace("\r", "\n").splitlines():
        line = raw.strip()
        if not line or _PROGRESS.search(line):
            continue
        if _NOISE.match(line):
            after_warning = bool(re.match(r"\S+:\d+: \w*Warning:", line))
            continue
        if after_warning and raw.startswith("  "):  # the source line under "file:N: XWarning: ..."
            after_warning = False
            continue
        after_warning = False
        out.append(line)
    return out


def _norm(s: str) -> str:
    return s.lower().replace("-", "_")


def classify(rc: Optional[int], stderr: str, names=(), expect: str = "refuse") -> tuple[str, str]:
    """(outcome, detail) of one command. ``expect``: refuse | succeed | interrupt | killed | debug (a traceback);
    ``names``: strings of which the message must contain one (case and -/_ ignored); ``rc`` None: timed out."""
    if rc is None:
        return "timeout", "killed after its time limit"
    has_tb = "Traceback (most recent call last)" in stderr
    lines = message_lines(stderr)
    if expect == "killed":
        return ("ok", "killed") if rc in (-signal.SIGKILL, 128 + signal.SIGKILL) else ("failed", f"rc {rc}")
    if expect == "debug":
        ok = rc != 0 and has_tb and bool(lines) and ": error: " in lines[-1]
        return ("ok", "traceback under --debug") if ok else ("failed", f"rc {rc}, traceback {has_tb}")
    if has_tb:
        return "traceback", (lines[-1] if lines else "")[:300]
    if expect == "succeed":
        return ("ok", "") if rc == 0 else ("failed", f"rc {rc}: {' | '.join(lines)[:300]}")
    if expect == "interrupt":
        if rc == 130 and len(lines) == 1 and "interrupt" in lines[0].lower():
            return "ok", lines[0][:300]
        if rc == 0:
            return "accepted", "finished before the interrupt"
        return "unclear", f"rc {rc}, {len(lines)} message lines: {' | '.join(lines)[:300]}"
    if rc == 0:
        return "accepted", "exit status 0"
    if not lines:
        return "unclear", f"rc {rc} and no message on stderr"
    crash = next((ln for ln in lines if "internal error" in ln or _PROGRAM_ERROR.search(ln)), None)
    if crash is not None:  # the boundary's bug line, or a message quoting a programming error (a renderer's crash)
        return "internal-error", crash[:300]
    if len(lines) > 1:
        return "unclear", f"{len(lines)} message lines: {' | '.join(lines)[:300]}"
    if names and not any(_norm(n) in _norm(lines[0]) for n in names):
        return "unclear", f"does not name {list(names)}: {lines[0][:300]}"
    return "ok-refused", lines[0][:300]


# ----------------------------------------------------------------------------------------- cases

Setup = Callable[[Path, Path], None]  # (case folder, fixtures folder)


@dataclass
class Case:
    """One bad input or fault. ``argv`` is a format string: {c} the case folder, {fx} the fixtures, {ds} the
    dataset id, {long} a 300-character name; ``keep``: paths (in the case folder) that must not change;
    ``absent``: globs that must not exist afterwards."""

    id: str
    command: str
    category: str
    argv: str
    names: tuple = ()
    expect: str = "refuse"
    needs: tuple = ()  # fixtures: dataset, qgpo, bc, figs
    setup: tuple = ()  # Setup callables, in order
    keep: tuple = ()
    absent: tuple = ()
    env: dict = field(default_factory=dict)  # values are format strings too
    timeout: float = 150.0
    wrap: str = ""  # "" | unwritable | diskfull
    disk_kb: int = 64
    signal_when: Optional[tuple] = None  # (glob in the case folder, seconds at most) -> then ``sig``
    sig: int = signal.SIGINT
    holder: Optional[str] = None  # argv of a process that holds the lock while this case runs
    holder_ready: str = ""  # glob that says the holder is writing
    then: Optional[str] = None  # argv of a follow-up command that must succeed (a resume)
    check: Optional[Callable[[Path, float], str]] = None  # (case folder, time `then` started) -> a problem, or ""
    heavy: bool = False  # trains something: scheduled first


def write(rel: str, content) -> Setup:
    def f(c: Path, fx: Path) -> None:
        p = c / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f


def copy(src: str, rel: str) -> Setup:
    def f(c: Path, fx: Path) -> None:
        s = fx / src
        (c / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(s, c / rel) if s.is_dir() else shutil.copy2(s, c / rel))
    return f


def truncate(rel: str, keep: float = 0.5) -> Setup:
    def f(c: Path, fx: Path) -> None:
        raw = (c / rel).read_bytes()
        (c / rel).write_bytes(raw[: int(len(raw) * keep)])
    return f


def edit_json(rel: str, fn: Callable[[dict], object]) -> Setup:
    def f(c: Path, fx: Path) -> None:
        d = json.loads((c / rel).read_text())
        (c / rel).write_text(json.dumps(fn(d)))
    return f


def remove(rel: str) -> Setup:
    def f(c: Path, fx: Path) -> None:
        p = c / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def mkdir(rel: str, mode: int = 0o755) -> Setup:
    def f(c: Path, fx: Path) -> None:
        (c / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(c / rel, mode)
    return f


def _set(d: dict, path: str, value) -> dict:
    *parts, leaf = path.split(".")
    cur = d
    for p in parts:
        cur = cur[p]
    cur[leaf] = value
    return d


TRAIN = "train --preset smoke --dataset {ds} --quiet --out {c}/run"
EVAL = "eval --quiet --run {c}/r"
TOY = ("toy --preset smoke --task moons --method bc --quiet --out {c}/toy --cache-dir {c}/tc --n-data 2000 "
       "--behaviour.steps 60 --eval.n-samples 200 --eval.n-ref-data 2000 --eval.pool-size 2000")
GRID = ("toy-grid --preset smoke --tasks moons --methods bc --seeds 0 --betas 10 --csv {c}/t.csv --figures-dir {c}/f "
        "--readme '' --runs-dir {c}/runs --cache-dir {c}/tc --quiet")
CONV = ("toy-convergence --preset smoke --tasks moons --specs aepo:particles-K8 --steps 5 10 --csv {c}/c.csv "
        "--figures-dir {c}/f --runs-dir {c}/runs --cache-dir {c}/tc --quiet")
MAKE = ("make-dataset --env Hopper-v5 --quality random --steps 50 --name local/hopper/new-v0 --train-steps 200 "
        "--eval-every 100 --learning-starts 100 --ref-episodes 2")
RESULTS = "rl-results --runs {c}/runs --csv {c}/figs/rl_results.csv --figures {c}/figs"
SWEEP = "sweep --datasets {ds} --methods bc --seeds 0 --out {c}/sweep"
BENCH = "bench --tiny --methods aepo --sample-batches 1"
DEMO = "demo --scale smoke --out {c}/out"
FIGS = "figures --figures-dir {c}/figs"
ISOLATED_MINARI = {"MINARI_DATASETS_PATH": "{c}/minari"}


def _train_cases() -> list[Case]:
    t, n = "train", "bad-number"
    num = [("seed-negative", "--seed -1", "seed"), ("seed-1e20", "--seed 1e20", "seed"),
           ("behaviour-steps-zero", "--behaviour.steps 0", "behaviour.steps"),
           ("behaviour-lr-nan", "--behaviour.lr nan", "behaviour.lr"),
           ("beta-negative", "--energy.beta -1", "energy.beta"), ("beta-nan", "--energy.beta nan", "energy.beta"),
           ("gamma-2", "--critic.gamma 2", "critic.gamma"),
           ("tau-target-5", "--critic.tau-target 5", "critic.tau_target"),
           ("expectile-1.5", "--critic.expectile 1.5", "critic.expectile"),
           ("beta-q-negative", "--method qgpo --critic.beta-q -1", "critic.beta_q"),
           ("guidance-scale-negative", "--sampling.guidance-scales -1", "sampling.guidance_scales"),
           ("guidance-scale-nan", "--sampling.guidance-scales 1 nan", "sampling.guidance_scales"),
           ("guidance-t-max-zero", "--sampling.guidance-t-max 0", "sampling.guidance_t_max"),
           ("eval-episodes-zero", "--eval.episodes 0", "eval.episodes"),
           ("max-episode-steps-zero", "--eval.max-episode-steps 0", "eval.max_episode_steps"),
           ("energy-clip-negative", "--energy.clip -1", "energy.clip"),
           ("energy-clip-nan", "--energy.clip nan", "energy.clip"),
           ("grad-clip-zero", "--energy.grad-clip 0", "energy.grad_clip"),
           ("bandwidth-negative", "--energy.bandwidth -1", "energy.bandwidth"),
           ("hidden-huge", "--behaviour.hidden 100000000", "behaviour.hidden")]
    cases = [Case(f"{t}/{i}", t, n, f"{TRAIN} {a}", (nm,), needs=("dataset",)) for i, a, nm in num]
    choice = [("method", "--method foo", "method"), ("preset", "--preset huge", "preset"),
              ("device-tpu", "--device tpu", "device"), ("device-cuda-absent", "--device cuda", "device"),
              ("reward-scaling", "--reward-scaling weird", "reward_scaling"),
              ("activation", "--critic.activation foo", "critic.activation"),
              ("covariance", "--energy.covariance full", "energy.covariance"),
              ("unknown-flag", "--bogus 1", "--bogus"), ("misspelled-flag", "--energy.bta 3", "--energy.bta")]
    cases += [Case(f"{t}/bad-{i}", t, "bad-choice", f"{TRAIN} {a}", (nm,), needs=("dataset",)) for i, a, nm in choice]
    plain = "train --preset smoke --quiet --out {c}/run"
    ids = [("absent", "--dataset nosuch/hopper/none-v0", "nosuch/hopper/none-v0"),
           ("traversal", "--dataset ../../escape-v0", "../../escape-v0"), ("no-namespace", "--dataset hopper", "hopper"),
           ("empty", "--dataset ''", "dataset"), ("too-long", "--dataset local/{long}-v0", "dataset"),
           ("missing", "", "dataset")]
    cases += [Case(f"{t}/dataset-{i}", t, "bad-dataset", f"{plain} {a}", (nm,)) for i, a, nm in ids]
    cases += [Case(f"{t}/no-preset", t, "conflict", "train --dataset {ds} --out {c}/run", ("preset",))]
    conflict = [("bc-best-of-n", "--method bc --eval.candidates 4", "eval.candidates"),
                ("relu-first-order", "--critic.activation relu --energy.expansion first --energy.posterior gaussian --energy.no-centered", "critic.activation"),
                ("compile-second-order", "--compile --energy.expansion second --energy.posterior gaussian --energy.no-centered", "compile"),
                ("gaussian-fit-rl", "--energy.covariance gaussian-fit --energy.posterior gaussian --energy.no-centered",
                 "energy.covariance"),
                ("centered-gaussian", "--energy.posterior gaussian", "energy.centered"),
                ("stage-cache-a-file", "--stage-cache {fx}/qgpo/config.json", "config.json"),
                ("init-behaviour-missing", "--init-behaviour {c}/nowhere/run", "nowhere"),
                ("init-behaviour-other-seed", "--method qgpo --seed 5 --init-behaviour {fx}/qgpo", "init_behaviour")]
    cases += [Case(f"{t}/{i}", t, "conflict", f"{TRAIN} {a}", (nm,), needs=("dataset", "qgpo")) for i, a, nm in conflict]
    cases += _train_config_cases() + _train_path_cases() + _train_fault_cases()
    return cases


def _train_config_cases() -> list[Case]:
    t = "train"
    cfg = [("config-missing", "", None, "{c}/nope.json", "nope.json"),
           ("config-truncated", "c.json", '{"method": "qgpo", "se', "{c}/c.json", "c.json"),
           ("config-yaml-syntax", "c.yaml", "method: qgpo\n  seed: [1, 2\n", "{c}/c.yaml", "c.yaml"),
           ("config-unknown-key", "c.json", '{"methd": "qgpo"}', "{c}/c.json", "methd"),
           ("config-a-list", "c.json", "[1, 2]", "{c}/c.json", "c.json"),
           ("config-part-not-a-mapping", "c.json", '{"behaviour": 5}', "{c}/c.json", "behaviour"),
           ("config-beta-string", "c.json", '{"energy": {"beta": "x"}}', "{c}/c.json", "energy.beta"),
           ("config-scales-string", "c.json", '{"sampling": {"guidance_scales": "1 2"}}', "{c}/c.json",
            "guidance_scales"),
           ("config-a-folder", None, None, "{c}", "config")]
    cases = []
    for i, rel, text, arg, nm in cfg:
        setup = (write(rel, text),) if rel else ()
        cases.append(Case(f"{t}/{i}", t, "bad-config", f"{TRAIN} --config {arg}", (nm,), needs=("dataset",),
                          setup=setup))
    cases += [Case(f"{t}/save-config-to-a-folder", t, "bad-path", f"{TRAIN} --save-config {{c}}/d", ("d",),
                   setup=(mkdir("d"),), needs=("dataset",)),
              Case(f"{t}/save-config-under-a-file", t, "bad-path", f"{TRAIN} --save-config {{c}}/f/c.json", ("f",),
                   setup=(write("f", "x"),), needs=("dataset",))]
    return cases


def _train_path_cases() -> list[Case]:
    t, p = "train", "bad-path"
    run = ("dataset", "qgpo")
    return [
        Case(f"{t}/out-is-a-file", t, p, f"{TRAIN} --out {{c}}/f", ("f",), setup=(write("f", "keep"),), keep=("f",),
             needs=("dataset",)),
        Case(f"{t}/out-under-a-file", t, p, f"{TRAIN} --out {{c}}/f/run", ("f",), setup=(write("f", "keep"),),
             keep=("f",), needs=("dataset",)),
        Case(f"{t}/out-unwritable", t, p, f"{TRAIN} --out {{c}}/ro/run", ("ro",), setup=(mkdir("ro", 0o555),),
             wrap="unwritable", needs=("dataset",)),
        Case(f"{t}/out-name-too-long", t, p, f"{TRAIN} --out {{c}}/{{long}}", ("too long", "xxxx"),
             needs=("dataset",)),
        Case(f"{t}/out-holds-another-method", t, "data-loss", f"{TRAIN} --method bc --out {{c}}/r", ("r",),
             setup=(copy("qgpo", "r"),), keep=("r",), needs=run),
        Case(f"{t}/out-holds-another-config", t, "data-loss", f"{TRAIN} --method qgpo --seed 3 --out {{c}}/r",
             ("r",), setup=(copy("qgpo", "r"),), keep=("r",), needs=run),
        Case(f"{t}/out-config-truncated", t, "corrupt-file", f"{TRAIN} --method qgpo --out {{c}}/r", ("config.json",),
             setup=(copy("qgpo", "r"), truncate("r/config.json")), keep=("r",), needs=run),
        Case(f"{t}/checkpoint-truncated", t, "corrupt-file", f"{TRAIN} --method qgpo --out {{c}}/r", ("behaviour.pt",),
             setup=(copy("qgpo", "r"), truncate("r/checkpoints/behaviour.pt")), keep=("r",), needs=run),
        Case(f"{t}/checkpoint-garbled", t, "corrupt-file", f"{TRAIN} --method qgpo --out {{c}}/r", ("energy.pt",),
             setup=(copy("qgpo", "r"), write("r/checkpoints/energy.pt", b"\x00garbage" * 64)), keep=("r",),
             needs=run),
        Case(f"{t}/checkpoint-of-another-config", t, "corrupt-file",
             f"{TRAIN} --method qgpo --seed 4 --out {{c}}/r", ("behaviour.pt",),
             setup=(copy("qgpo", "r"), remove("r/config.json")), keep=("r/checkpoints",), needs=run),
        Case(f"{t}/out-config-with-3-for-3.0", t, "bad-config", f"{TRAIN} --method qgpo --no-eval --out {{c}}/r",
             expect="succeed", setup=(copy("qgpo", "r"), edit_json("r/config.json", lambda d: _set(d, "energy.beta", 3))),
             keep=("r/checkpoints",), needs=run),
        Case(f"{t}/train-stats-truncated", t, "corrupt-file", f"{TRAIN} --method qgpo --out {{c}}/r",
             ("train_stats.json",), setup=(copy("qgpo", "r"), truncate("r/train_stats.json")),
             keep=("r/checkpoints",), needs=run),
        Case(f"{t}/results-truncated", t, "corrupt-file", f"{TRAIN} --method qgpo --out {{c}}/r", ("results.json",),
             setup=(copy("qgpo", "r"), truncate("r/results.json")), keep=("r/results.json", "r/checkpoints"),
             needs=run, heavy=True),
        Case(f"{t}/dataset-truncated-hdf5", t, "corrupt-file", TRAIN, (DS, "hdf5", "damaged"),
             setup=(copy("minari", "minari"), _truncate_hdf5), env=ISOLATED_MINARI, needs=("dataset",)),
        Case(f"{t}/dataset-metadata-garbled", t, "corrupt-file", TRAIN, (DS, "metadata"),
             setup=(copy("minari", "minari"), write(f"minari/{DS}/data/metadata.json", "{\"ref_min")),
             env=ISOLATED_MINARI, needs=("dataset",)),
        Case(f"{t}/minari-root-is-a-file", t, p, TRAIN, ("minari",), setup=(write("minari", "x"),),
             env=ISOLATED_MINARI, needs=()),
    ]


def _truncate_hdf5(c: Path, fx: Path) -> None:
    for h5 in (c / "minari").rglob("*.hdf5"):
        raw = h5.read_bytes()
        h5.write_bytes(raw[: len(raw) // 3])


def _resumed(rel: str, stage: str, finished: tuple = ()) -> Callable[[Path, float], str]:
    """The rerun resumed ``stage`` from its periodic checkpoint and did not touch the ``finished`` stages' files."""
    def check(c: Path, since: float) -> str:
        stats = c / rel / "train_stats.json"
        if not stats.exists():
            return f"{stats} missing after the rerun"
        d = json.loads(stats.read_text())
        if "resumed_from" not in d.get(stage, {}):
            return f"the {stage} stage did not resume ({d.get(stage)}): the interrupted run's checkpoint was not used"
        redone = [s for s in finished if (c / rel / "checkpoints" / f"{s}.pt").stat().st_mtime >= since]
        return f"finished stages trained again: {redone}" if redone else ""
    return check


def _train_fault_cases() -> list[Case]:
    t = "train"
    slow = "train --preset smoke --dataset {ds} --out {c}/run --method qgpo --behaviour.steps 400 --critic.steps 200"
    return [
        Case(f"{t}/sigint-during-training", t, "interrupt", slow, expect="interrupt",
             signal_when=("run/checkpoints/critic.pt", 120), absent=("run/**/.*.tmp",), then=f"{slow} --quiet",
             check=_resumed("run", "critic", finished=("behaviour", "support")), needs=("dataset",), heavy=True,
             timeout=240),
        Case(f"{t}/sigkill-then-rerun", t, "resume", slow, expect="killed", sig=signal.SIGKILL,
             signal_when=("run/checkpoints/behaviour.pt", 90), then=f"{slow} --quiet", check=_resumed("run", "behaviour"),
             needs=("dataset",), heavy=True, timeout=240),
        Case(f"{t}/preset-without-value", t, "bad-choice", "train --dataset {ds} --preset", ("--preset",)),
        Case(f"{t}/second-writer", t, "lock", f"{TRAIN} --out {{c}}/run", ("run", "another"),
             holder=f"{slow} --quiet", holder_ready="run/.lock", needs=("dataset",), heavy=True),
        Case(f"{t}/eval-while-training", "eval", "lock", "eval --run {c}/run", ("run", "another"),
             holder=f"{slow} --quiet", holder_ready="run/config.json", needs=("dataset",), heavy=True),
        Case(f"{t}/disk-full", t, "disk-full", f"{TRAIN} --method bc --out {{c}}/small/run", ("/small/",),
             wrap="diskfull", disk_kb=48, needs=("dataset",), heavy=True),
        Case(f"{t}/debug-prints-traceback", t, "debug", f"--debug {TRAIN} --seed -1", expect="debug",
             needs=("dataset",)),
        Case(f"{t}/debug-env-prints-traceback", t, "debug", f"{TRAIN} --seed -1", expect="debug",
             env={"AEPO_DEBUG": "1"}, needs=("dataset",)),
    ]


def _eval_cases() -> list[Case]:
    e, q, b = "eval", ("dataset", "qgpo"), ("dataset", "bc")
    run = (copy("qgpo", "r"),)
    cases = [
        Case(f"{e}/no-run", e, "bad-path", "eval --quiet", ("run",)),
        Case(f"{e}/run-without-value", e, "bad-path", "eval --run", ("--run",)),
        Case(f"{e}/run-missing", e, "bad-path", "eval --run {c}/nowhere", ("nowhere",), absent=("nowhere",)),
        Case(f"{e}/run-is-a-file", e, "bad-path", "eval --run {c}/f", ("f",), setup=(write("f", "x"),)),
        Case(f"{e}/run-without-config", e, "bad-path", "eval --run {c}/d", ("d",), setup=(mkdir("d"),)),
        Case(f"{e}/config-truncated", e, "corrupt-file", EVAL, ("config.json",),
             setup=run + (truncate("r/config.json"),), keep=("r",), needs=q),
        Case(f"{e}/config-unknown-key", e, "unknown-key", EVAL, ("bogus",),
             setup=run + (edit_json("r/config.json", lambda d: dict(d, bogus=1)),), keep=("r",), needs=q),
        Case(f"{e}/checkpoint-truncated", e, "corrupt-file", EVAL, ("energy.pt",),
             setup=run + (truncate("r/checkpoints/energy.pt"),), keep=("r",), needs=q),
        Case(f"{e}/checkpoint-missing", e, "corrupt-file", EVAL, ("energy",),
             setup=run + (remove("r/checkpoints/energy.pt"),), keep=("r",), needs=q),
        Case(f"{e}/results-truncated", e, "corrupt-file", EVAL, ("results.json",),
             setup=run + (truncate("r/results.json"),), keep=("r/results.json",), needs=q),
        Case(f"{e}/results-a-list", e, "corrupt-file", EVAL, ("results.json",),
             setup=run + (write("r/results.json", "[1, 2]"),), keep=("r/results.json",), needs=q),
        Case(f"{e}/results-rows-not-a-list", e, "corrupt-file", EVAL, ("results.json", "rows"),
             setup=run + (edit_json("r/results.json", lambda d: dict(d, rows=5)),), keep=("r/results.json",),
             needs=q),
        Case(f"{e}/dataset-gone", e, "bad-dataset", EVAL, (DS,), setup=run, env={"MINARI_DATASETS_PATH": "{c}/empty"},
             needs=q),
        Case(f"{e}/bc-guided", e, "conflict", "eval --quiet --run {c}/r --sampling.guidance-scales 1 2",
             ("guidance",), setup=(copy("bc", "r"),), keep=("r/results.json",), needs=b),
        Case(f"{e}/unknown-flag", e, "bad-choice", f"{EVAL} --bogus", ("--bogus",), setup=run, needs=q),
    ]
    num = [("scale-nan", "--sampling.guidance-scales nan", "guidance_scales"),
           ("episodes-zero", "--eval.episodes 0", "eval.episodes"),
           ("max-episode-steps-negative", "--eval.max-episode-steps -1", "max_episode_steps"),
           ("device-tpu", "--device tpu", "device")]
    cases += [Case(f"{e}/{i}", e, "bad-number", f"{EVAL} {a}", (nm,), setup=run, keep=("r/results.json",), needs=q)
              for i, a, nm in num]
    return cases


def _toy_cases() -> list[Case]:
    t, n = "toy", "bad-number"
    num = [("task", "--task nosuch", "nosuch", "bad-choice"), ("method", "--method foo", "method", "bad-choice"),
           ("preset", "--preset huge", "preset", "bad-choice"), ("device", "--device tpu", "device", "bad-choice"),
           ("beta-negative", "--energy.beta -1", "energy.beta", n), ("beta-nan", "--energy.beta nan", "energy.beta", n),
           ("n-ref-data-too-many", "--eval.n-ref-data 5000", "n_ref_data", n),
           ("scale-nan", "--sampling.guidance-scales nan", "guidance_scales", n),
           ("error-time-2", "--eval.error-times 2", "error_times", n), ("seed-negative", "--seed -1", "seed", n),
           ("n-data-1e12", "--n-data 1000000000000", "n_data", n), ("unknown-flag", "--bogus", "--bogus", "bad-choice"),
           ("centered-gaussian", "--method aepo --energy.centered", "energy.centered", "bad-choice"),
           ("centered-with-cover", "--method aepo --energy.posterior particles --energy.centered", "energy.cover",
            "bad-choice")]
    cases = [Case(f"{t}/{i}", t, cat, f"{TOY} {a}", (nm,)) for i, a, nm, cat in num]
    cases += [
        Case(f"{t}/out-is-a-file", t, "bad-path", TOY.replace("{c}/toy ", "{c}/f "), ("f",),
             setup=(write("f", "keep"),), keep=("f",)),
        Case(f"{t}/out-under-a-file", t, "bad-path", TOY.replace("{c}/toy ", "{c}/f/toy "), ("f",),
             setup=(write("f", "keep"),), keep=("f",)),
        Case(f"{t}/out-name-too-long", t, "bad-path", TOY.replace("{c}/toy ", "{c}/{long} "), ("too long",)),
        Case(f"{t}/cache-dir-is-a-file", t, "bad-path", TOY, ("tc",), setup=(write("tc", "keep"),), keep=("tc",)),
        Case(f"{t}/config-yaml-syntax", t, "bad-config", f"{TOY} --config {{c}}/c.yaml", ("c.yaml",),
             setup=(write("c.yaml", "task: [moons\n"),)),
        Case(f"{t}/config-unknown-key", t, "unknown-key", f"{TOY} --config {{c}}/c.json", ("tsk",),
             setup=(write("c.json", '{"tsk": "moons"}'),)),
        Case(f"{t}/out-holds-another-task", t, "data-loss", f"{TOY} --task rings --out {{c}}/o", ("o",),
             setup=(write("o/config.json", '{"task": "moons", "method": "bc", "energy": {"beta": 10}}'),),
             keep=("o",)),
        Case(f"{t}/sigint-during-training", t, "interrupt",
             TOY.replace("--behaviour.steps 60", "--behaviour.steps 3000 --checkpoint-every 100"),
             expect="interrupt", signal_when=("tc/**/behaviour-*.pt", 90), absent=("**/.*.tmp",), heavy=True),
        Case(f"{t}/second-writer", t, "lock", TOY, ("toy", "another"),
             holder=TOY.replace("--behaviour.steps 60", "--behaviour.steps 3000"), holder_ready="toy/config.json",
             heavy=True),
    ]
    return cases


def _grid_cases() -> list[Case]:
    g = "toy-grid"
    csv_rows = (copy("toy2d_results.csv", "t.csv"),)
    num = [("seeds-string", "--seeds x", "seeds"), ("seeds-negative", "--seeds -1", "seed"),
           ("betas-nan", "--betas nan", "betas"), ("tasks-unknown", "--tasks nosuch", "nosuch"),
           ("estimator-unknown", "--methods aepo --estimators bogus", "bogus"),
           ("estimator-k0-centered", "--methods aepo --estimators particles-K0-centered", "particles-K0-centered"),
           ("preset-unknown", "--preset huge", "preset"), ("device-tpu", "--device tpu", "device"),
           ("unknown-flag", "--bogus", "--bogus")]
    cases = [Case(f"{g}/{i}", g, "bad-number" if "nan" in i or "neg" in i or "inf" in i or "string" in i
                  else "bad-choice", f"{GRID} {a}", (nm,)) for i, a, nm in num]
    render = f"{GRID} --render-only"
    cases += [
        Case(f"{g}/csv-missing", g, "bad-path", render, ("t.csv",)),
        Case(f"{g}/csv-is-a-folder", g, "bad-path", render, ("t.csv",), setup=(mkdir("t.csv"),)),
        Case(f"{g}/csv-truncated", g, "corrupt-file", render, ("t.csv",), setup=csv_rows + (truncate("t.csv", 0.3),),
             keep=("t.csv",), needs=("figs",)),
        Case(f"{g}/csv-garbled", g, "corrupt-file", render, ("t.csv",), setup=(write("t.csv", b"\x00\xff" * 300),),
             keep=("t.csv",)),
        Case(f"{g}/csv-missing-columns", g, "corrupt-file", render, ("t.csv",),
             setup=(write("t.csv", "task,method\nmoons,bc\n"),), keep=("t.csv",)),
        Case(f"{g}/csv-bad-number", g, "corrupt-file", render, ("t.csv", "distance"),
             setup=csv_rows + (_csv_cell("t.csv", "distance", "oops"),), keep=("t.csv",), needs=("figs",)),
        Case(f"{g}/readme-without-markers-gets-the-block", g, "data-loss",
             render.replace("--readme ''", "--readme {c}/README.md"), expect="succeed",
             setup=csv_rows + (write("README.md", "# mine\n"),), keep=("t.csv",),
             check=_block_added("README.md", "# mine\n", "<!-- toy:start -->"), needs=("figs",)),
        Case(f"{g}/readme-missing-is-made", g, "bad-path", render.replace("--readme ''", "--readme {c}/new/README.md"),
             expect="succeed", setup=csv_rows, keep=("t.csv",), check=_block_added("new/README.md", "", "<!-- toy:start"),
             needs=("figs",)),
        Case(f"{g}/figures-dir-is-a-file", g, "bad-path", render, ("f",), setup=csv_rows + (write("f", "keep"),),
             keep=("f", "t.csv"), needs=("figs",)),
        Case(f"{g}/disk-full", g, "disk-full", render.replace("{c}/f ", "{c}/small "), ("/small/",),
             setup=csv_rows, wrap="diskfull", disk_kb=24, keep=("t.csv",), needs=("figs",)),
    ]
    return cases


def _convergence_cases() -> list[Case]:
    g = "toy-convergence"
    bad = [("steps-decreasing", "bad-number", "--steps 10 5", ("steps",)),
           ("steps-string", "bad-number", "--steps x", ("--steps",)),
           ("steps-zero", "bad-number", "--steps 0 5", ("steps",)),
           ("spec-unknown", "bad-choice", "--specs cep", ("specs",)),
           ("spec-aepo-without-estimator", "bad-choice", "--specs aepo", ("specs",)),
           ("estimator-unknown", "bad-choice", "--specs aepo:bogus", ("bogus",)),
           ("support-k-zero", "bad-number", "--specs aepo:particles-K0", ("support.k",)),
           ("check-not-a-step-count", "conflict", "--check 7", ("--check",)),
           ("beta-nan", "bad-number", "--beta nan", ("beta",)),
           ("seeds-repeated", "bad-number", "--seeds 1 1", ("seeds",)),
           ("seeds-negative", "bad-number", "--seeds -1", ("seeds",)),
           ("unknown-flag", "bad-choice", "--bogus", ("--bogus",))]
    cases = [Case(f"{g}/{i}", g, cat, f"{CONV} {a}", names) for i, cat, a, names in bad]
    cases.append(Case(f"{g}/render-without-csv", g, "bad-path", f"{CONV} --render-only", ("c.csv",)))
    return cases


def _block_added(rel: str, kept: str, marker: str) -> Callable[[Path, float], str]:
    """A README that the command had to make or extend: it starts with what it held and has the block."""
    def check(c: Path, since: float) -> str:
        p = c / rel
        text = p.read_text() if p.exists() else ""
        return "" if text.startswith(kept) and marker in text else f"{rel} lost its text or has no {marker} block"
    return check


def _csv_cell(rel: str, column: str, value: str) -> Setup:
    def f(c: Path, fx: Path) -> None:
        lines = (c / rel).read_text().splitlines()
        cols = lines[0].split(",")
        cells = lines[1].split(",")
        cells[cols.index(column)] = value
        lines[1] = ",".join(cells)
        (c / rel).write_text("\n".join(lines) + "\n")
    return f


def _sweep_cases() -> list[Case]:
    s = "sweep"
    args = [("nothing", "sweep --out {c}/sweep", "datasets", "bad-choice"),
            ("seeds-negative", f"{SWEEP} --seeds -1", "seeds", "bad-number"),
            ("workers-zero", f"{SWEEP} --workers 0", "workers", "bad-number"),
            ("backend-unknown", f"{SWEEP} --backend slurm", "backend", "bad-choice"),
            ("suite-unknown", "sweep --suite nosuch --out {c}/sweep", "nosuch", "bad-choice"),
            ("preset-unknown", f"{SWEEP} --preset huge", "preset", "bad-choice"),
            ("dataset-malformed", "sweep --datasets ../../x --methods bc --seeds 0 --out {c}/sweep", "../../x",
             "bad-dataset"),
            ("dataset-absent", "sweep --datasets nosuch/hopper/none-v0 --methods bc --seeds 0 --out {c}/sweep",
             "nosuch/hopper/none-v0", "bad-dataset"),
            ("unknown-flag", f"{SWEEP} --bogus", "--bogus", "bad-choice"),
            ("gpus-negative", f"{SWEEP} --gpus-per-run -1", "gpus_per_run", "bad-number"),
            ("methods-unknown", f"{SWEEP} --methods foo", "foo", "bad-choice")]
    cases = [Case(f"{s}/{i}", s, cat, a, (nm,), needs=("dataset",)) for i, a, nm, cat in args]
    cases += [
        Case(f"{s}/overrides-yaml-syntax", s, "bad-config", f"{SWEEP} --overrides {{c}}/o.yaml", ("o.yaml",),
             setup=(write("o.yaml", "energy: {beta: [3\n"),), needs=("dataset",)),
        Case(f"{s}/overrides-unknown-key", s, "unknown-key", f"{SWEEP} --overrides {{c}}/o.json", ("betta",),
             setup=(write("o.json", '{"energy": {"betta": 3}}'),), needs=("dataset",)),
        Case(f"{s}/overrides-bad-value", s, "bad-config", f"{SWEEP} --overrides {{c}}/o.json", ("energy.beta",),
             setup=(write("o.json", '{"energy": {"beta": -3}}'),), needs=("dataset",)),
        Case(f"{s}/out-is-a-file", s, "bad-path", SWEEP.replace("{c}/sweep", "{c}/f"), ("f",),
             setup=(write("f", "keep"),), keep=("f",), needs=("dataset",)),
        Case(f"{s}/results-csv-is-a-folder", s, "bad-path", f"{SWEEP} --results-csv {{c}}/d", ("d",),
             setup=(mkdir("d"),), needs=("dataset",)),
    ]
    return cases


def _suite_bench_demo_cases() -> list[Case]:
    cases = [Case("suite/show-unknown", "suite", "bad-choice", "suite show nosuch", ("nosuch",)),
             Case("suite/show-without-name", "suite", "bad-choice", "suite show", ("name",)),
             Case("suite/unknown-action", "suite", "bad-choice", "suite run", ("run",))]
    b = "bench"
    num = [("state-dim-zero", "--state-dim 0", "state_dim"), ("methods-unknown", "--methods foo", "methods"),
           ("toy-unknown", "--toy nosuch", "nosuch"), ("device-tpu", "--device tpu", "device"),
           ("sample-batches-zero", "--sample-batches 0", "sample_batches"), ("warmup-negative", "--warmup -1", "warmup"),
           ("min-time-nan", "--min-time nan", "min_time"), ("unknown-flag", "--bogus", "--bogus")]
    cases += [Case(f"{b}/{i}", b, "bad-number", f"{BENCH} {a}", (nm,)) for i, a, nm in num]
    cases += [Case(f"{b}/out-under-a-file", b, "bad-path", f"{BENCH} --out {{c}}/f/b.json", ("f",),
                   setup=(write("f", "keep"),), keep=("f",)),
              Case(f"{b}/out-is-a-folder", b, "bad-path", f"{BENCH} --out {{c}}/d", ("d",), setup=(mkdir("d"),))]
    d = "demo"
    cases += [Case(f"{d}/seed-negative", d, "bad-number", f"{DEMO} --seed -1", ("seed",)),
              Case(f"{d}/seed-string", d, "bad-number", f"{DEMO} --seed x", ("seed",)),
              Case(f"{d}/seed-1e20", d, "bad-number", f"{DEMO} --seed 100000000000000000000", ("seed",)),
              Case(f"{d}/scale-unknown", d, "bad-choice", f"{DEMO} --scale huge", ("scale",)),
              Case(f"{d}/out-is-a-file", d, "bad-path", DEMO.replace("{c}/out", "{c}/f"), ("f",),
                   setup=(write("f", "keep"),), keep=("f",)),
              Case(f"{d}/out-under-a-file", d, "bad-path", DEMO.replace("{c}/out", "{c}/f/out"), ("f",),
                   setup=(write("f", "keep"),), keep=("f",)),
              Case(f"{d}/out-unwritable", d, "bad-path", DEMO.replace("{c}/out", "{c}/ro/out"), ("ro",),
                   setup=(mkdir("ro", 0o555),), wrap="unwritable"),
              Case(f"{d}/out-name-too-long", d, "bad-path", DEMO.replace("{c}/out", "{c}/{long}"), ("too long",)),
              Case(f"{d}/disk-full", d, "disk-full", DEMO.replace("{c}/out", "{c}/small"), ("/small/",),
                   wrap="diskfull", disk_kb=16),
              Case(f"{d}/unknown-flag", d, "bad-choice", f"{DEMO} --bogus", ("--bogus",))]
    return cases


def _figures_make_cases() -> list[Case]:
    f = "figures"
    figs = (copy("figs", "figs"),)
    cases = [
        Case(f"{f}/dir-missing", f, "bad-path", FIGS, ("figs",)),
        Case(f"{f}/dir-is-a-file", f, "bad-path", FIGS, ("figs",), setup=(write("figs", "keep"),), keep=("figs",)),
        Case(f"{f}/dir-without-results", f, "bad-path", FIGS, ("figs",), setup=(mkdir("figs"),)),
        Case(f"{f}/checks-json-truncated", f, "corrupt-file", FIGS, ("closed_form_checks.json",),
             setup=figs + (truncate("figs/closed_form_checks.json"),), keep=("figs/closed_form_checks.json",),
             needs=("figs",)),
        Case(f"{f}/rl-csv-truncated", f, "corrupt-file", FIGS, ("rl_results.csv",),
             setup=figs + (truncate("figs/rl_results.csv", 0.2),), keep=("figs/rl_results.csv",), needs=("figs",)),
        Case(f"{f}/toy-csv-garbled", f, "corrupt-file", FIGS, ("toy2d_results.csv",),
             setup=figs + (write("figs/toy2d_results.csv", b"\x00\xff" * 200),), keep=("figs/toy2d_results.csv",),
             needs=("figs",)),
        Case(f"{f}/unknown-flag", f, "bad-choice", f"{FIGS} --bogus", ("--bogus",)),
    ]
    m, nm = "make-dataset", ("dataset",)
    num = [("steps-zero", "--steps 0", "steps"),
           ("steps-string", "--steps x", "steps"), ("steps-1e20", "--steps 1e20", "steps"),
           ("seed-negative", "--seed -1", "seed"), ("seed-2e40", "--seed 1099511627776", "seed"),
           ("learning-starts-negative", "--learning-starts -1", "learning_starts"),
           ("eval-every-beyond-budget", "--eval-every 5000", "eval_every"),
           ("medium-fraction-one", "--medium-fraction 1", "medium_fraction"),
           ("medium-fraction-nan", "--medium-fraction nan", "medium_fraction")]
    cases += [Case(f"{m}/{i}", m, "bad-number", f"{MAKE} {a}", (n,), absent=("minari/local/hopper/new-v0",),
                   env=ISOLATED_MINARI) for i, a, n in num]
    choice = [("env-unknown", "--env NoSuchEnv-v9", "NoSuchEnv-v9"), ("env-empty", "--env ''", "env"),
              ("env-discrete", "--env CartPole-v1", "CartPole-v1"), ("quality-unknown", "--quality great", "quality"),
              ("name-traversal", "--name ../../escape-v0", "name"), ("name-no-version", "--name local/hopper/x", "name"),
              ("name-too-long", "--name local/{long}-v0", "name"), ("unknown-flag", "--bogus", "--bogus")]
    cases += [Case(f"{m}/{i}", m, "bad-choice" if "name" not in i else "bad-dataset", f"{MAKE} {a}", (n,),
                   env=ISOLATED_MINARI) for i, a, n in choice]
    cases += [
        Case(f"{m}/env-missing", m, "bad-choice", MAKE.replace("--env Hopper-v5 ", ""), ("--env",)),
        Case(f"{m}/exists-without-overwrite", m, "data-loss", MAKE.replace("local/hopper/new-v0", DS), (DS, "overwrite"),
             setup=(copy("minari", "minari"),), keep=("minari",), env=ISOLATED_MINARI, needs=nm),
        Case(f"{m}/minari-root-is-a-file", m, "bad-path", MAKE, ("minari",), setup=(write("minari", "keep"),),
             keep=("minari",), env=ISOLATED_MINARI),
        Case(f"{m}/minari-root-unwritable", m, "bad-path", MAKE, ("ro",), setup=(mkdir("ro", 0o555),),
             env={"MINARI_DATASETS_PATH": "{c}/ro/minari"}, wrap="unwritable"),
        Case(f"{m}/sigint", m, "interrupt", MAKE.replace("--train-steps 200", "--train-steps 5000"), expect="interrupt",
             signal_when=("pol/*.partial/td3_100.zip", 60), env=dict(ISOLATED_MINARI, AEPO_POLICY_CACHE="{c}/pol"),
             absent=("minari/local", "pol/*.partial"), heavy=True),
    ]
    return cases


def _results_lab_cases() -> list[Case]:
    r, q = "rl-results", ("dataset", "qgpo", "bc")
    runs = (copy("qgpo", "runs/qgpo"), copy("bc", "runs/bc"))
    collected = runs + (copy("figs_rl", "figs"),)
    cases = [
        Case(f"{r}/runs-missing", r, "bad-path", RESULTS, ("runs",)),
        Case(f"{r}/runs-empty", r, "bad-path", RESULTS, ("runs",), setup=(mkdir("runs"),)),
        Case(f"{r}/runs-a-text-file", r, "bad-path", RESULTS.replace("{c}/runs", "{c}/notes.txt"), ("notes.txt",),
             setup=(write("notes.txt", "hi"),)),
        Case(f"{r}/results-truncated", r, "corrupt-file", RESULTS, ("results.json",),
             setup=collected + (truncate("runs/qgpo/results.json"),), keep=("figs",), needs=q),
        Case(f"{r}/results-empty-dict", r, "corrupt-file", RESULTS, ("results.json",),
             setup=collected + (write("runs/qgpo/results.json", "{}"),), keep=("figs",), needs=q),
        Case(f"{r}/results-a-list", r, "corrupt-file", RESULTS, ("results.json",),
             setup=collected + (write("runs/qgpo/results.json", "[]"),), keep=("figs",), needs=q),
        Case(f"{r}/results-row-lacks-a-key", r, "corrupt-file", RESULTS, ("results.json", "return_mean"),
             setup=collected + (edit_json("runs/qgpo/results.json",
                                          lambda d: dict(d, rows=[{k: v for k, v in row.items() if k != "return_mean"}
                                                                  for row in d["rows"]])),), keep=("figs",), needs=q),
        Case(f"{r}/fewer-rows-without-force", r, "data-loss", RESULTS, ("force",),
             setup=collected + (remove("runs/bc"),), keep=("figs",), needs=q),
        Case(f"{r}/csv-under-a-file", r, "bad-path", RESULTS.replace("{c}/figs/rl_results.csv", "{c}/f/r.csv"), ("f",),
             setup=runs + (write("f", "keep"),), keep=("f",), needs=q),
        Case(f"{r}/csv-is-a-folder", r, "bad-path", RESULTS, ("rl_results.csv",),
             setup=runs + (mkdir("figs/rl_results.csv"),), needs=q),
        Case(f"{r}/csv-garbled", r, "corrupt-file", RESULTS, ("rl_results.csv",),
             setup=collected + (write("figs/rl_results.csv", b"\x00\xff" * 100),), keep=("figs/rl_results.csv",),
             needs=q),
        Case(f"{r}/readme-without-markers", r, "data-loss", f"{RESULTS} --readme {{c}}/R.md", ("R.md",),
             setup=collected + (write("R.md", "# mine\n"),), keep=("R.md", "figs"), needs=q),
        Case(f"{r}/readme-missing-is-made", r, "bad-path", f"{RESULTS} --readme {{c}}/new.md", expect="succeed",
             setup=collected, check=_block_added("new.md", "", "<!-- rl:start -->"), needs=q),
        Case(f"{r}/figures-is-a-file", r, "bad-path", RESULTS.replace("--figures {c}/figs", "--figures {c}/f"), ("f",),
             setup=collected + (write("f", "keep"),), keep=("f", "figs"), needs=q),
        Case(f"{r}/disk-full", r, "disk-full", RESULTS.replace("{c}/figs", "{c}/small"), ("/small/",),
             setup=runs + (copy("figs_rl/rl_results.csv", "seed/rl_results.csv"),
                           copy("figs_rl/rl_speed.csv", "seed/rl_speed.csv")), wrap="diskfull", disk_kb=24, needs=q),
    ]
    lab = "lab --no-browser"
    cases += [
        Case("lab/port-negative", "lab", "bad-number", f"{lab} --port -1", ("port",)),
        Case("lab/port-70000", "lab", "bad-number", f"{lab} --port 70000", ("port",)),
        Case("lab/port-string", "lab", "bad-number", f"{lab} --port x", ("port",)),
        Case("lab/port-in-use", "lab", "conflict", f"{lab} --port {{busy_port}}", ("port",)),
        Case("lab/root-missing", "lab", "bad-path", f"{lab} --root {{c}}/nowhere", ("nowhere",)),
        Case("lab/root-is-a-file", "lab", "bad-path", f"{lab} --root {{c}}/f", ("f",), setup=(write("f", "x"),)),
        Case("lab/check-without-notebooks", "lab", "bad-path", f"{lab} --check --root {{c}}/empty", ("notebooks",),
             setup=(mkdir("empty"),), timeout=60),
        Case("cli/unknown-command", "cli", "bad-choice", "nosuchcmd", ("nosuchcmd",)),
        Case("cli/unknown-global-flag", "cli", "bad-choice", "--bogus train", ("--bogus",)),
    ]
    return cases


def all_cases() -> list[Case]:
    cases = (_train_cases() + _eval_cases() + _toy_cases() + _grid_cases() + _convergence_cases() + _sweep_cases()
             + _suite_bench_demo_cases() + _figures_make_cases() + _results_lab_cases())
    ids = Counter(c.id for c in cases)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"duplicate case ids: {dup}")
    return cases


# ----------------------------------------------------------------------------------------- running

class Workspace:
    """The campaign's folder: ``fixtures/`` (made once, by the commands themselves) and ``cases/<id>/``."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.fx = self.out / "fixtures"
        self.cases = self.out / "cases"
        self.made: set[str] = set()
        self.busy = socket.socket()  # a port in use for the lab case
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen(1)

    def env(self, case_dir: Path, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("AEPO_DEBUG", "MINARI_DATASETS_PATH")}
        env.update(PYTHONPATH=str(ROOT), MINARI_DATASETS_PATH=str(self.fx / "minari"),
                   AEPO_POLICY_CACHE=str(self.fx / "policies"), HOME=str(case_dir), MPLCONFIGDIR=str(case_dir / ".mpl"),
                   MPLBACKEND="Agg", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update({k: self.fmt(v, case_dir) for k, v in extra.items()})
        return env

    def fmt(self, s: str, case_dir: Path) -> str:
        return s.format(c=case_dir, fx=self.fx, ds=DS, long="x" * 300, busy_port=self.busy.getsockname()[1])

    def cli(self, argv: str, case_dir: Path) -> list[str]:
        return [sys.executable, "-m", "aepo_lite", *shlex.split(self.fmt(argv, case_dir))]

    def build(self, needs: set[str], log=print) -> None:
        """Make the fixtures ``needs`` asks for (and what they need), each once, with the commands themselves."""
        steps = [("figs", self._figs), ("dataset", self._dataset), ("qgpo", self._qgpo), ("bc", self._bc)]
        want = set(needs) | ({"qgpo"} if "bc" in needs else set())
        want |= {"dataset"} if want & {"qgpo", "bc"} else set()
        for name, make in steps:
            if name in want and name not in self.made:
                t0 = time.time()
                make()
                self.made.add(name)
                log(f"fixture {name}: {time.time() - t0:.0f} s")

    def _run(self, argv: str) -> None:
        self.fx.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(self.cli(argv, self.fx), cwd=self.fx, env=self.env(self.fx, {}), capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"fixture command failed: aepo-lite {argv}\n{r.stderr[-3000:]}")

    def _figs(self) -> None:
        (self.fx / "figs").mkdir(parents=True, exist_ok=True)
        for name in ("closed_form_checks.json", "toy2d_results.csv", "rl_results.csv", "rl_speed.csv"):
            shutil.copy2(ROOT / "figures" / name, self.fx / "figs" / name)
        shutil.copy2(ROOT / "figures" / "toy2d_results.csv", self.fx / "toy2d_results.csv")

    def _dataset(self) -> None:
        self._run(f"make-dataset --env Hopper-v5 --quality random --steps 300 --name {DS} --train-steps 200 "
                  "--eval-every 100 --learning-starts 100 --ref-episodes 4")

    def _qgpo(self) -> None:
        self._run("train --preset smoke --dataset {ds} --method qgpo --quiet --out {fx}/qgpo")

    def _bc(self) -> None:
        self._run("train --preset smoke --dataset {ds} --method bc --quiet --out {fx}/bc")
        self._run("rl-results --runs {fx}/qgpo {fx}/bc --csv {fx}/figs_rl/rl_results.csv --figures {fx}/figs_rl")


def _digest(path: Path) -> dict:
    """{relative path: sha256} of a file or of every file under a folder (None: the path is missing). A lock file
    (``DIR/.lock``, the pid of the last process that wrote the folder) is bookkeeping, not data: left out."""
    if not path.exists():
        return {"": None}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _wrap(case: Case, cmd: list[str], case_dir: Path) -> list[str]:
    if case.wrap == "unwritable" and os.geteuid() == 0:
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    if case.wrap == "diskfull":
        script = ('mount -t tmpfs -o size="$KB"k tmpfs "$D" || exit 97; if [ -d "$S" ]; then cp -a "$S"/. "$D"/ || exit 98; fi; '
                  '"$@"; rc=$?; (cd "$D" && find . -type f | sort | xargs -r sha256sum) > "$A"; exit $rc')
        (case_dir / "small").mkdir(exist_ok=True)
        return ["unshare", "-m", "sh", "-c", script, "sh", *cmd]
    return cmd


def _can_wrap(kind: str) -> bool:
    if kind == "unwritable" and os.geteuid() == 0:
        return shutil.which("setpriv") is not None
    if kind == "diskfull":  # a tmpfs in a private mount namespace (root, or a user namespace that allows it)
        if shutil.which("unshare") is None:
            return False
        r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"], capture_output=True)
        return r.returncode == 0
    return True


def _popen(cmd, case_dir, env):
    return subprocess.Popen(cmd, cwd=case_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop(p: subprocess.Popen, sig=signal.SIGINT, wait: float = 30.0):
    """Signal ``p``'s process group (as Ctrl-C in a terminal does); kill it if it does not end in ``wait`` s."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        out, err = p.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err
    return p.returncode, out, err


def _wait_for(case_dir: Path, pattern: str, p: subprocess.Popen, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and p.poll() is None:
        if glob.glob(str(case_dir / pattern), recursive=True):
            return True
        time.sleep(0.2)
    return False


def _execute(case: Case, ws: Workspace, case_dir: Path, env: dict) -> tuple[Optional[int], str, str]:
    cmd = _wrap(case, ws.cli(case.argv, case_dir), case_dir)
    if case.wrap == "diskfull":
        env = dict(env, KB=str(case.disk_kb), D=str(case_dir / "small"), S=str(case_dir / "seed"),
                   A=str(case_dir / "after.sha"))
    holder = None
    if case.holder:
        holder = _popen(ws.cli(case.holder, case_dir), case_dir, env)
        if not _wait_for(case_dir, case.holder_ready, holder, 120):
            _stop(holder)
            return -1, "", "the lock holder did not start in time"
    p = _popen(cmd, case_dir, env)
    try:
        if case.signal_when:
            pattern, seconds = case.signal_when
            _wait_for(case_dir, pattern, p, seconds)
            if p.poll() is None:
                return _stop(p, case.sig, case.timeout)
        try:
            out, err = p.communicate(timeout=case.timeout)
            return p.returncode, out, err
        except subprocess.TimeoutExpired:
            _, out, err = _stop(p, signal.SIGINT, 10)
            return None, out, err
    finally:
        if holder is not None:
            _stop(holder)


def _lost(case: Case, case_dir: Path, before: dict) -> str:
    """What a case destroyed: a kept file that changed or vanished, or (on the full disk) a temporary file left."""
    for rel, digest in before.items():
        now = _digest(case_dir / rel)
        if now != digest:
            changed = sorted(k for k in set(now) | set(digest) if now.get(k) != digest.get(k))
            return f"{rel} changed: {changed[:5]}"
    if case.wrap == "diskfull" and (case_dir / "after.sha").exists():
        after = {}
        for ln in (case_dir / "after.sha").read_text().splitlines():
            digest, _, name = ln.partition("  ")
            after[name] = digest
        seed = {f"./{k}": v for k, v in _digest(case_dir / "seed").items()} if (case_dir / "seed").exists() else {}
        lost = [k for k, v in seed.items() if after.get(k) != v]
        temps = [k for k in after if Path(k).name.startswith(".") and k.endswith(".tmp")]
        if lost or temps:
            return f"on the full disk: changed {lost[:5]}, temporary files left {temps[:5]}"
    return ""


def _broken(case: Case, ws: Workspace, case_dir: Path, env: dict) -> str:
    """What a case left that the next command cannot use: files that must not exist, a failing follow-up."""
    for pattern in case.absent:
        found = glob.glob(str(case_dir / pattern), recursive=True)
        if found:
            return f"left behind: {[str(Path(f).relative_to(case_dir)) for f in found[:5]]}"
    since = time.time()
    if case.then:
        r = subprocess.run(ws.cli(case.then, case_dir), cwd=case_dir, env=env, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            return f"the next command failed (rc {r.returncode}): {message_lines(r.stderr)[-1:]}"
    return case.check(case_dir, since) if case.check else ""


def run_case(case: Case, ws: Workspace) -> dict:
    """Run one case in a fresh folder and classify it; returns its record."""
    case_dir = ws.cases / case.id.replace("/", "__")
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    rec = {"id": case.id, "command": case.command, "category": case.category, "argv": ws.fmt(case.argv, case_dir),
           "expect": case.expect, "names": list(case.names)}
    if case.wrap and not _can_wrap(case.wrap):
        return dict(rec, outcome="skipped", detail=f"this machine cannot simulate {case.wrap!r}", rc=None, seconds=0)
    for s in case.setup:
        s(case_dir, ws.fx)
    before = {rel: _digest(case_dir / rel) for rel in case.keep}
    env = ws.env(case_dir, case.env)
    t0 = time.time()
    rc, out, err = _execute(case, ws, case_dir, env)
    outcome, detail = classify(rc, err, case.names, case.expect)
    if case.wrap == "diskfull" and rc in (97, 98):
        outcome, detail = "failed", "the campaign could not set up the full disk (mount or copy failed)"
    lost = _lost(case, case_dir, before) if outcome not in ("accepted", "timeout") else ""
    if lost:
        outcome, detail = "data-loss", lost
    elif outcome in GOOD:
        broken = _broken(case, ws, case_dir, env)
        outcome, detail = ("broken-state", broken) if broken else (outcome, detail)
    for p in case_dir.rglob("*"):  # the next campaign may remove what an unwritable case made
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)
    return dict(rec, outcome=outcome, detail=detail, rc=rc, seconds=round(time.time() - t0, 1),
                stderr_tail=err[-1500:], stdout_tail=out[-500:])


def run_cases(cases: list[Case], out: Path, jobs: int = 2, log=print) -> list[dict]:
    """Build the fixtures the cases need, run them ``jobs`` at a time (training ones first); the records."""
    ws = Workspace(out)
    try:
        ws.build(set().union(*[set(c.needs) for c in cases]) if cases else set(), log=log)
        order = sorted(cases, key=lambda c: not c.heavy)
        records = []
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for rec in pool.map(lambda c: run_case(c, ws), order):
                records.append(rec)
                mark = "  " if rec["outcome"] in GOOD else "!!"
                log(f"{mark} {rec['outcome']:<14} {rec['id']:<48} {rec['seconds']:5.1f} s  {rec['detail'][:110]}")
        return sorted(records, key=lambda r: [c.id for c in cases].index(r["id"]))
    finally:
        ws.busy.close()


# ----------------------------------------------------------------------------------------- reporting

def summary(records: list[dict]) -> str:
    """Counts per outcome, per command and per category, then every case that is not fine."""
    by_cmd: dict = defaultdict(Counter)
    by_cat: dict = defaultdict(Counter)
    for r in records:
        by_cmd[r["command"]][r["outcome"]] += 1
        by_cat[r["category"]][r["outcome"]] += 1
    used = [o for o in OUTCOMES if any(r["outcome"] == o for r in records)]
    lines = [f"{len(records)} cases: " + ", ".join(f"{o} {sum(r['outcome'] == o for r in records)}" for o in used), ""]
    for title, table in (("command", by_cmd), ("category", by_cat)):
        lines.append(f"{title:<14}" + "".join(f"{o:>15}" for o in used) + f"{'total':>8}")
        for k in sorted(table):
            lines.append(f"{k:<14}" + "".join(f"{table[k][o]:>15}" for o in used) + f"{sum(table[k].values()):>8}")
        lines.append("")
    bad = [r for r in records if r["outcome"] not in GOOD]
    if bad:
        lines.append("not fine:")
        lines += [f"  {r['outcome']:<14} {r['id']}: {r['detail'][:200]}" for r in bad]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="campaign folder (default: a new temporary folder)")
    p.add_argument("--jobs", type=int, default=2, help="cases at a time (default 2)")
    p.add_argument("--only", default="", help="comma-separated prefixes of case ids (e.g. train,eval/run)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(c.id.startswith(x.strip()) for x in args.only.split(","))]
    if args.list:
        for c in cases:
            print(f"{c.id:<50} {c.category:<13} aepo-lite {c.argv}")
        print(f"{len(cases)} cases; per category: {dict(Counter(c.category for c in cases))}")
        return 0
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aepo-faults-"))
    t0 = time.time()
    records = run_cases(cases, out, jobs=args.jobs)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    print()
    print(summary(records))
    print(f"\n{len(records)} cases in {time.time() - t0:.0f} s; records: {out / 'results.json'}")
    return 0 if all(r["outcome"] in GOOD for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
