"""Staged training with one checkpoint store: the only training loop in the library.

A :class:`Stage` is a name, its config part, its upstream stages, a learner, a batch source and a
step count. :func:`run_stage` trains one:

- its checkpoint is keyed by a content hash of the stage's config part, step count and seed plus
  its upstream stages' hashes (:func:`stage_hash`); checkpoints carry a format version, and one
  written by an older layout, or by another config, is refused with a message naming the file;
- checkpoints are written atomically every ``checkpoint_every`` steps and at the end, with the
  learner's state (networks, optimiser, schedule) and every random-number state, so a run killed
  at step 900k of 1M resumes at its last checkpoint and ends with the same weights as a run that
  was never interrupted (on the CPU, bit for bit);
- metrics are read back from the device only at logged steps, checked for NaN/inf there (a
  :class:`FloatingPointError` naming the stage, step and metric), written to ``metrics.jsonl``
  (lines past the resumed step are dropped, never duplicated) and shown on one progress bar;
- each stage seeds torch and its own batch generator from the stage's seed.

A :class:`StageStore` is a folder of checkpoints: a run directory (one file per stage name; a file
from another config is an error) or a shared cache (``keyed=True``: one file per name and hash,
so runs that share a stage, e.g. one behaviour model per toy task, train it once). A store given the
fingerprint of the data its stages read (``data=``, the offline-RL dataset's) writes it into every
checkpoint and refuses one written on other data (:class:`DataMismatch`): the hash names the dataset,
not its contents, and a dataset remade under the same id (another CPU) must not reuse stages trained on
the old copy. Checkpoints written before fingerprints were recorded carry none and are not checked.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from aepo_lite._io import RunLock, _default, append_jsonl, atomic_torch_save, atomic_write_text, torch_load
from aepo_lite.training.learners import Learner

__all__ = ["FORMAT", "Stage", "StageStore", "DataMismatch", "RunLock", "MetricsLog", "stage_hash", "run_stage",
           "run_cached_stage", "check_run_folder"]

FORMAT = 2  # checkpoint format: 1 = before the stage mechanism (refused), 2 = this module


@dataclass
class Stage:
    """One training stage.

    ``learner`` is a factory, called once the upstream stages are trained (it may close over their
    networks); ``batches(generator)`` returns one batch dict for ``learner.step``, drawing its
    indices from ``generator`` (the stage's own, seeded and checkpointed here).
    """

    name: str  # the checkpoint's name, e.g. "behaviour"
    config: Any  # the config part the stage's result depends on (a dataclass or a JSON-able dict)
    steps: int  # gradient steps (or chunks, for a sampling stage)
    learner: Callable[[], Learner]  # builds the learner (after the upstream stages are trained)
    batches: Callable[[torch.Generator], dict]  # one batch per call
    upstream: tuple = ()  # hashes of the stages this one reads (from stage_hash)
    seed: int = 0  # seeds torch and the batch generator at the stage's start
    device: str | torch.device = "cpu"  # where the batch generator lives (the data's device)


def _jsonable(config: Any) -> Any:
    """The config as hashed: dataclasses as dicts, without the fields marked ``metadata={"hash_default": v}``
    that hold that value (an option added later, at the value that reproduces older runs, so their
    checkpoints keep their hashes)."""
    if is_dataclass(config) and not isinstance(config, type):
        return {f.name: _jsonable(getattr(config, f.name)) for f in fields(config)
                if not ("hash_default" in f.metadata and getattr(config, f.name) == f.metadata["hash_default"])}
    if isinstance(config, dict):
        return {k: _jsonable(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_jsonable(v) for v in config]
    return config


def stage_hash(stage: Stage) -> str:
    """A content hash of the stage's config part, step count, seed and upstream hashes (and the format)."""
    key = {"format": FORMAT, "stage": stage.name, "config": _jsonable(stage.config), "steps": stage.steps,
           "seed": stage.seed, "upstream": list(stage.upstream)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=_default).encode()).hexdigest()[:16]


class DataMismatch(ValueError):
    """A checkpoint trained on other data than the store's (another copy of the same dataset id)."""


class StageStore:
    """Stage checkpoints in one folder: ``<name>.pt`` (a run) or ``<name>-<hash>.pt`` (``keyed``, a cache).

    ``data``: a fingerprint of the data the stages read (``OfflineData.fingerprint``), written into every
    checkpoint saved here; loading one that records another is a :class:`DataMismatch`."""

    def __init__(self, root, *, keyed: bool = False, data: str | None = None):
        self.root, self.keyed, self.data = Path(root), keyed, data

    def path(self, name: str, h: str) -> Path:
        return self.root / (f"{name}-{h}.pt" if self.keyed else f"{name}.pt")

    def load(self, name: str, h: str, map_location="cpu") -> Optional[dict]:
        """The stage's checkpoint (finished or periodic), None if there is none; refuses a foreign one."""
        p = self.path(name, h)
        if not p.exists():
            return None
        try:
            ck = torch_load(p, map_location=map_location, weights_only=False)
        except ValueError as e:
            raise ValueError(f"checkpoint: {p} could not be read ({str(e).split(' (', 1)[-1].split('):')[0]}). It was "
                             "left in place; move it away to train that stage again.") from None
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            found = ck.get("format", 1) if isinstance(ck, dict) else "unknown"
            raise ValueError(f"checkpoint: {p} was written by an older aepo-lite layout (format {found}, this "
                             f"version reads {FORMAT}); it is not reused. Train into a new folder, or move the old "
                             "checkpoint away to retrain that stage here.")
        if ck.get("hash") != h:
            raise ValueError(f"checkpoint: {p} was trained with another config (stage hash {ck.get('hash')} != "
                             f"{h}); use a new output folder, or move it away to retrain that stage")
        if self.data is not None and ck.get("data") is not None and ck["data"] != self.data:
            raise DataMismatch(f"checkpoint: {p} was trained on other data than the dataset holds now (data "
                               f"fingerprint {ck['data']} there, {self.data} now): the dataset was remade or "
                               "changed since (make-dataset on another CPU makes another dataset under the same "
                               "id). Use a new output folder and stage cache, or restore the dataset it was "
                               "trained on.")
        return ck

    def is_complete(self, name: str, h: str) -> bool:
        ck = self.load(name, h)
        return ck is not None and ck["step"] >= ck["steps"]

    def copy_from(self, other: "StageStore", name: str, h: str) -> Optional[dict]:
        """Copy another store's finished checkpoint of this stage and hash (a shared upstream stage); its stats."""
        if self.path(name, h).exists() or not other.path(name, h).exists():
            return None
        try:
            ck = other.load(name, h)
        except DataMismatch:
            raise
        except ValueError:
            return None  # another config there: train it here
        if ck["step"] < ck["steps"]:
            return None
        self.save(name, h, ck)
        return ck["stats"]

    def save(self, name: str, h: str, ck: dict) -> Path:
        extra = {} if self.data is None else {"data": self.data}
        return atomic_torch_save(self.path(name, h), dict(ck, format=FORMAT, stage=name, hash=h, **extra))


class MetricsLog:
    """``metrics.jsonl`` (one line per logged step) and, optionally, TensorBoard scalars."""

    def __init__(self, path, tensorboard_dir=None):
        self.path, self.tb = Path(path), None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError as e:
                warnings.warn(f"tensorboard: not available ({e}); install the 'tensorboard' extra. Metrics go to "
                              f"{self.path} only")

    def rewind(self, stage: str, step: int) -> None:
        """Drop the stage's lines after ``step`` (logged after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not _after(ln, stage, step)]
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(keep))

    def log(self, stage: str, step: int, metrics: dict) -> None:
        append_jsonl(self.path, {"stage": stage, "step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _after(line: str, stage: str, step: int) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return True  # a line cut by a kill
    return rec.get("stage") == stage and rec.get("step", 0) > step


def _rng_state(g: torch.Generator) -> dict:
    out = {"torch": torch.get_rng_state(), "batches": g.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(g: torch.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    g.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_metrics(stage: str, step: int, m: dict) -> dict[str, float]:
    m = {k: float(v) for k, v in m.items()}  # the only host synchronisation of the loop
    bad = sorted(k for k, v in m.items() if not math.isfinite(v))
    if bad:
        raise FloatingPointError(f"{stage}: step {step} has non-finite {bad} ({m}); check the learning rate, beta, "
                                 "the critic and the data")
    return m


def run_stage(stage: Stage, store: StageStore, *, log: MetricsLog | None = None, log_every: int = 1000,
              checkpoint_every: int = 10_000, progress: bool = True, map_location="cpu",
              before_step: Callable[[], None] | None = None) -> tuple[Learner, dict]:
    """Train ``stage`` (or load it when finished; or resume it from its last periodic checkpoint).

    Returns the learner, holding the trained networks, and the stage's stats (steps, seconds,
    steps per second, and ``resumed_from`` when it resumed).
    """
    from tqdm.auto import tqdm
    h = stage_hash(stage)
    ck = store.load(stage.name, h, map_location)
    torch.manual_seed(stage.seed)  # before the learner is built: anything it draws is seeded too
    learner = stage.learner()
    if ck is not None and ck["step"] >= ck["steps"]:
        learner.load_state_dict(ck["learner"])
        return learner, ck["stats"]
    g = torch.Generator(device=stage.device)
    start, seconds, stats = 0, 0.0, {}
    if ck is None:
        g.manual_seed(stage.seed)
    else:
        learner.load_state_dict(ck["learner"])
        _set_rng_state(g, ck["rng"])
        start, seconds = ck["step"], ck["stats"]["seconds"]
        stats["resumed_from"] = start
    if log is not None:
        log.rewind(stage.name, start)

    def save(step: int) -> None:
        stats.update(steps=stage.steps, seconds=seconds + time.perf_counter() - t0)
        stats["steps_per_s"] = (step - start) / max(time.perf_counter() - t0, 1e-9)
        store.save(stage.name, h, {"step": step, "steps": stage.steps, "learner": learner.state_dict(),
                                   "rng": _rng_state(g), "stats": dict(stats)})

    t0 = time.perf_counter()
    bar = tqdm(range(start + 1, stage.steps + 1), desc=stage.name, disable=not progress, mininterval=1.0,
               initial=start, total=stage.steps)
    for i in bar:
        if before_step is not None:
            before_step()
        m = learner.step(stage.batches(g))
        if i % log_every == 0 or i == stage.steps:
            m = _read_metrics(stage.name, i, m)
            if log is not None:
                log.log(stage.name, i, m)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(m.items())[:3]})
        if i % checkpoint_every == 0 or i == stage.steps:
            save(i)
    return learner, stats


def run_cached_stage(stage: Stage, cache: StageStore, **kw) -> tuple[Learner, dict]:
    """:func:`run_stage` on a shared, keyed store: a finished entry is loaded; otherwise the entry's lock makes a
    second process wait for the one training it (the same work), then load it. ``kw`` as for run_stage."""
    h = stage_hash(stage)
    if cache.is_complete(stage.name, h):
        return run_stage(stage, cache, **kw)
    cache.root.mkdir(parents=True, exist_ok=True)
    with RunLock(cache.root, what="cache", name=f".{stage.name}-{h}.lock", wait=24 * 3600):
        return run_stage(stage, cache, **kw)


def check_run_folder(folder, new: dict, *, ignore=(), part: str = "behaviour") -> None:
    """Refuse a run folder whose ``config.json`` belongs to another run: unreadable, another method, the
    layout before nested configs (no ``part`` section), or different settings outside ``ignore``. A folder
    without one is free. ``new`` is the new run's config as a nested dict."""
    from aepo_lite.config import config_diff, flatten
    folder = Path(folder)
    p = folder / "config.json"
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"out: {p} is not readable JSON ({e}); refusing to reuse {folder}") from None
    if not isinstance(old, dict) or old.get("method") != new.get("method"):
        got = old.get("method") if isinstance(old, dict) else None
        raise ValueError(f"out: {folder} was made by method {got!r}, not {new.get('method')!r}; "
                         "use another --out directory")
    if not isinstance(old.get(part), dict):
        raise ValueError(f"out: {folder} was made by an older aepo-lite layout (a flat config.json); its files are "
                         "not reused. Use another --out directory.")
    diff = config_diff(old, new, ignore=ignore)
    if diff:
        a, b = flatten(old), flatten(new)
        raise ValueError(f"out: {folder} holds another run, made with a different config ("
                         + ", ".join(f"{k}={a[k]!r} there vs {b[k]!r} now" for k in diff[:4])
                         + "); use another --out directory")
