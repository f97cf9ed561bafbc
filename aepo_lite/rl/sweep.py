"""Sweeps: datasets (or toy tasks) x methods x seeds, each an ordinary run directory made by the same
code path as ``aepo-lite train`` (or ``aepo-lite toy``), on a local process pool or on Ray.

- Resumable: a finished run (trained and evaluated with the current settings, on this copy of its dataset) is
  skipped; an unfinished one resumes from its stage checkpoints (:mod:`aepo_lite.training`). A finished run
  evaluated on another copy of its dataset (remade since under the same id) is an error naming it, not "skipped".
- A failed run is isolated: it is listed at the end with its log (``RUN/sweep.log``) and the others go on.
- A dataset that is not here and cannot be downloaded (always so offline) is skipped, with the reason.
- One sweep at a time per output folder (a lock); results merge into the report through
  :func:`aepo_lite.rl.report.collect`.
- Backends: ``local`` (a process pool: ``workers`` processes, ``threads`` torch threads each; one run per
  GPU with ``gpus_per_run=1``) or ``ray`` (an existing cluster at ``address``, or a local one; CPUs
  and a GPU fraction per run). Ray is the scheduler; nothing here schedules.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from aepo_lite.config import METHODS

__all__ = ["SweepConfig", "RunSpec", "plan", "run_one", "run_sweep", "TOY_PREFIX"]

TOY_PREFIX = "toy:"  # a dataset named "toy:<task>" is a toy 2D task, run by the toy pipeline
BACKENDS = ("local", "ray")


@dataclass
class SweepConfig:
    """What a sweep runs and where."""

    suite: str = ""  # a named suite (`aepo-lite suite list`); or give datasets
    datasets: tuple[str, ...] = ()  # Minari ids, or toy:<task> for a toy 2D task
    methods: tuple[str, ...] = ("bc", "aepo", "qgpo")  # aepo | qgpo | mse | bc
    seeds: tuple[int, ...] = (0, 1, 2)  # one run per seed
    preset: str = "smoke"  # smoke | bench | full (toy tasks: smoke | full)
    out: str = "runs/sweep"  # the sweep's folder: one run directory per dataset, method and seed
    backend: str = "local"  # local (a process pool) | ray
    workers: int = 1  # local: runs at a time
    threads: int = 1  # torch threads per run
    address: Optional[str] = None  # ray: an existing cluster (host:port); None starts a local one
    cpus_per_run: float = 1.0  # ray: CPUs reserved per run
    gpus_per_run: float = 0.0  # ray: GPU fraction per run (local: 1 gives each run its own GPU in turn)
    evaluate: bool = True  # evaluate each run after training (skipped when already evaluated)
    overrides: Optional[str] = None  # a JSON/YAML file of nested config overrides for every run, e.g. {"energy": {"beta": 3}}
    stage_cache: Optional[str] = None  # RL: stages shared by runs (behaviour, support, critic) are trained once here; None = OUT/stage_cache
    stack_seeds: bool = False  # RL: first train the seeds of each dataset and method together (stacked networks, in this process); the runs then evaluate


@dataclass
class RunSpec:
    """One run of a sweep."""

    dataset: str
    method: str
    seed: int
    preset: str
    run_dir: str
    overrides: dict = field(default_factory=dict)
    evaluate: bool = True
    stage_cache: Optional[str] = None  # RL: the shared stage folder (see SweepConfig.stage_cache)
    # RL: the fingerprint of the dataset's copy here (OfflineData.fingerprint), set by run_sweep where a finished run
    # may be skipped; such a run evaluated on another copy is refused, not skipped
    data_fingerprint: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.method} seed {self.seed}"


def _check(cfg: SweepConfig) -> tuple[str, ...]:
    from aepo_lite.rl.suites import get_suite
    datasets = tuple(cfg.datasets) + (get_suite(cfg.suite).datasets if cfg.suite else ())
    if not datasets:
        raise ValueError("datasets: give --suite NAME or --datasets ID [ID ...]")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ValueError(f"methods: unknown method(s) {bad} (known: {', '.join(METHODS)})")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    for name in ("workers", "threads"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(cfg, name)!r}")
    if not cfg.seeds or any(int(s) < 0 for s in cfg.seeds):
        raise ValueError(f"seeds: expected non-negative integers, got {cfg.seeds!r}")
    if not (cfg.cpus_per_run > 0 and cfg.gpus_per_run >= 0 and math.isfinite(cfg.cpus_per_run + cfg.gpus_per_run)):
        raise ValueError(f"cpus_per_run, gpus_per_run: expected a CPU count > 0 and a GPU fraction >= 0, got "
                         f"{cfg.cpus_per_run!r} and {cfg.gpus_per_run!r}")
    from aepo_lite.config import PRESETS
    from aepo_lite.rl.data import check_dataset_id
    for ds in datasets:  # a malformed id is a typo, refused here; a well-formed one that is not here is skipped later
        kind = "toy" if ds.startswith(TOY_PREFIX) else "rl"
        if kind == "rl":
            check_dataset_id("datasets", ds)
        if cfg.preset not in PRESETS[kind]:
            raise ValueError(f"preset: expected one of {tuple(PRESETS[kind])} for {ds}, got {cfg.preset!r}")
    return datasets


def _read_overrides(path) -> dict:
    if not path:
        return {}
    from aepo_lite.config import read_config_file
    return read_config_file(path)


def plan(cfg: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, in order (dataset, method, seed), with its run directory."""
    out = Path(cfg.out)
    specs, over = [], _read_overrides(cfg.overrides)
    for ds in _check(cfg):
        for m in cfg.methods:
            for seed in cfg.seeds:
                d = out / ds.replace(":", "_").replace("/", "_") / f"{m}-{cfg.preset}-s{seed}"
                cache = cfg.stage_cache or str(out / "stage_cache")
                specs.append(RunSpec(ds, m, int(seed), cfg.preset, str(d), overrides=over, evaluate=cfg.evaluate,
                                     stage_cache=cache))
    for ds, m in dict.fromkeys((s.dataset, s.method) for s in specs):  # before the first run starts
        _make_config(next(s for s in specs if (s.dataset, s.method) == (ds, m)))
    return specs


def _make_config(spec: RunSpec):
    """The run's checked config (a toy task's or an offline-RL run's); a bad override is an error naming it."""
    if spec.dataset.startswith(TOY_PREFIX):
        from aepo_lite.toy.pipeline import make_config as toy_config
        return toy_config(spec.dataset[len(TOY_PREFIX):], spec.method, spec.preset, seed=spec.seed, **spec.overrides)
    from aepo_lite.rl.agent import make_config
    return make_config(spec.dataset, spec.method, spec.preset, seed=spec.seed, **spec.overrides)


# ----------------------------------------------------------------------------------- one run
def _rl_run(spec: RunSpec, progress: bool) -> str:
    from aepo_lite.rl.agent import evaluate_run, evaluation_done, train
    cfg = _make_config(spec)
    d = Path(spec.run_dir)
    if spec.evaluate and evaluation_done(d, cfg):
        _check_same_copy(spec)
        return "skipped"  # without evaluation, train() itself loads finished stages and trains the rest
    train(cfg, d, progress=progress, stage_cache=spec.stage_cache)
    if spec.evaluate:
        evaluate_run(d, progress=progress)
    return "done"


def _check_same_copy(spec: RunSpec) -> None:
    """A finished run whose results record another fingerprint than the dataset's copy here was trained and
    evaluated on another copy (the dataset remade under its id since): an error naming its results, never "skipped"
    (its rows would then be reported as this copy's). Results from before fingerprints record none: not checked."""
    from aepo_lite._io import read_json
    path = Path(spec.run_dir) / "results.json"
    recorded = read_json(path).get("data_fingerprint")
    if spec.data_fingerprint and recorded and recorded != spec.data_fingerprint:
        raise ValueError(f"{path} was evaluated on another copy of {spec.dataset} (data fingerprint {recorded}; the "
                         f"copy here: {spec.data_fingerprint}), remade since under the same id; its rows and stages "
                         "are not this copy's. Sweep into another --out (or move that run folder away) to run it "
                         "on this copy")


def _fingerprints(specs: list[RunSpec]) -> dict:
    """{dataset: fingerprint of its copy here} for the offline-RL datasets with a finished-looking run among
    ``specs`` (one load each; none when nothing could be skipped). A copy that does not load is left out here:
    its runs report the loader's error themselves, as before."""
    from aepo_lite.rl.data import load_minari
    out = {}
    for ds in dict.fromkeys(s.dataset for s in specs
                            if not s.dataset.startswith(TOY_PREFIX) and (Path(s.run_dir) / "results.json").exists()):
        try:
            out[ds] = load_minari(ds)[0].fingerprint()
        except ValueError:
            pass
    return out


def _toy_run(spec: RunSpec, progress: bool) -> str:
    from aepo_lite.toy.pipeline import run_toy
    d = Path(spec.run_dir)
    if (d / "results.json").exists():
        return "skipped"
    cfg = _make_config(spec)
    run_toy(cfg, d, cache_dir=Path(spec.run_dir).parents[1] / "toy_cache", progress=progress, figure=False)
    return "done"


def run_one(spec: RunSpec | dict, threads: int = 1, progress: bool = False) -> dict:
    """Run (or skip, or resume) one run; never raises: a failure is returned with its log's path."""
    import torch
    spec = RunSpec(**spec) if isinstance(spec, dict) else spec
    torch.set_num_threads(threads)
    log = Path(spec.run_dir) / "sweep.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            fn = _toy_run if spec.dataset.startswith(TOY_PREFIX) else _rl_run
            status, error = fn(spec, progress), None
    except Exception as e:  # isolated: the sweep goes on, the log keeps the traceback
        status, error = "failed", f"{type(e).__name__}: {e}"
        buf.write(traceback.format_exc())
    with open(log, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name}: {status}\n{buf.getvalue()}")
    return {"run": spec.name, "run_dir": spec.run_dir, "status": status, "error": error, "log": str(log),
            "seconds": time.perf_counter() - t0}


def _stack_seeds(specs: list[RunSpec], echo) -> None:
    """``stack_seeds``: per offline-RL dataset and method, the seeds some unfinished run needs are trained together
    in this process (:func:`aepo_lite.rl.agent.train_seeds`: behaviour, critic and energy stages each as one stacked
    model; shared stages in the stage cache); the runs then find their stages finished and evaluate. A failure
    here is reported and those runs train alone as usual."""
    from aepo_lite.rl.agent import evaluation_done, train_seeds
    for ds, m in dict.fromkeys((s.dataset, s.method) for s in specs if not s.dataset.startswith(TOY_PREFIX)):
        pending = [s for s in specs if (s.dataset, s.method) == (ds, m)
                   and not (s.evaluate and evaluation_done(Path(s.run_dir), _make_config(s)))]
        if len({s.seed for s in pending}) < 2:
            continue
        t0 = time.perf_counter()
        try:
            train_seeds([_make_config(s) for s in pending], [Path(s.run_dir) for s in pending],
                        stage_cache=pending[0].stage_cache, progress=False)
        except Exception as e:  # the runs still train their own stages
            echo(f"stack_seeds: {ds} {m}: {type(e).__name__}: {e}; each run trains alone")
            continue
        echo(f"stack_seeds: {ds} {m}: seeds {sorted(s.seed for s in pending)} trained together "
             f"({time.perf_counter() - t0:.1f} s)")


# ----------------------------------------------------------------------------------- availability
def available(dataset: str) -> Optional[str]:
    """None when the dataset can be used here; else why not (a toy task always can)."""
    if dataset.startswith(TOY_PREFIX):
        from aepo_lite.toy.tasks import get_task
        try:
            get_task(dataset[len(TOY_PREFIX):])
        except ValueError as e:
            return str(e)
        return None
    from aepo_lite.rl.data import open_minari
    try:
        open_minari(dataset)  # the local copy, else a download: fails fast and clearly offline
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


# ----------------------------------------------------------------------------------- backends
def _run_local(specs: list[RunSpec], cfg: SweepConfig, on_result) -> None:
    if cfg.workers == 1:
        for s in specs:
            on_result(run_one(s, cfg.threads))
        return
    from concurrent.futures import as_completed

    from aepo_lite._procs import process_pool
    with process_pool(cfg.workers) as pool:  # its workers stop if the sweep is killed
        futures = [pool.submit(run_one, asdict(s), cfg.threads) for s in specs]
        for f in as_completed(futures):
            on_result(f.result())


def _check_address(address: str, timeout: float = 10.0) -> None:
    host, _, port = address.replace("ray://", "").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise ValueError(f"address: no Ray cluster answers at {address!r} ({e}); start one with `ray start --head` "
                         "or leave --address out to start a local one") from None


def _ray_sessions() -> set[Path]:
    """The folders of Ray's local sessions on this machine (in Ray's temp folder); none known where this Ray has no
    ``ray._common.utils.get_default_ray_temp_dir`` (a private helper of recent Rays: then a failed start-up's
    session is not found, its processes are not stopped and the error names no log)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:
        return set()
    return set(Path(get_default_ray_temp_dir()).glob("session_2*"))


def _raylet_gave_up(session: Optional[Path]) -> Optional[str]:
    """The raylet log of ``session`` that records the raylet giving up on the dashboard agent's port file (Ray's
    fixed 15 s wait at start-up, ray-project/ray#65983), or None."""
    for name in ("raylet.err", "raylet.out"):
        log = session / "logs" / name if session else None
        if log and log.is_file() and "Timed out waiting for file" in log.read_text(errors="replace"):
            return str(log)
    return None


def _stop_session(session: Optional[Path]) -> None:
    """Stop the processes a failed ``ray.init`` left running (the GCS server and dashboard of ``session``, which
    ``ray.shutdown`` does not know of when the node did not start): those whose command line names the session.
    Linux only (it reads /proc); elsewhere, or with ``session`` None, nothing is stopped."""
    import signal
    proc = Path("/proc")
    if session is None or not proc.is_dir():
        return
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if session.name in (d / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(d.name), signal.SIGTERM)
        except OSError:  # gone meanwhile, or not ours
            continue


def _init_ray(kw: dict) -> None:
    """``ray.init`` of a sweep's driver, tried once more when the node timed out during start-up: on a busy machine
    the raylet can give up waiting for Ray's dashboard agent (a fixed 15 s wait in Ray, ray-project/ray#65983), and
    Ray's own error then names neither that cause nor a way round, so the second failure's error does. The
    processes a failed attempt leaves are stopped."""
    import ray
    for attempt in (1, 2):
        before = _ray_sessions()
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
            return
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            new = _ray_sessions() - before  # the failed attempt's session, unless another start-up made one meanwhile
            session = new.pop() if len(new) == 1 else None
            _stop_session(session)
            if attempt == 2:
                log = _raylet_gave_up(session)
                cause = (f"its raylet gave up waiting for Ray's dashboard agent ({log}), Ray's fixed 15 s wait at "
                         "start-up, which a busy machine can miss (ray-project/ray#65983)") if log else \
                    f"see the raylet's log in {session or 'its session folder'}/logs"
                raise ValueError(f"backend: Ray's local node did not start, twice ({type(e).__name__}: {e}): "
                                 f"{cause}; use --backend local, run on a less busy machine, or start a cluster "
                                 "yourself (`ray start --head`) and pass its --address") from e


def _run_ray(specs: list[RunSpec], cfg: SweepConfig, on_result) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("backend: 'ray' needs Ray; install the sweep extra: pip install 'aepo-lite[sweep]'") from None
    if cfg.address:
        _check_address(cfg.address)
    started = not ray.is_initialized()
    if started:
        _init_ray({"address": cfg.address} if cfg.address else {"num_cpus": max(cfg.workers, int(cfg.cpus_per_run))})
    try:
        remote = ray.remote(num_cpus=cfg.cpus_per_run, num_gpus=cfg.gpus_per_run)(run_one)
        pending = [remote.remote(asdict(s), cfg.threads) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_result(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def run_sweep(cfg: SweepConfig, *, results_csv: str | Path | None = None, echo=print) -> dict:
    """Run the sweep; returns {"done", "skipped", "failed", "unavailable"} lists. With ``results_csv``, the
    runs' results are merged into that CSV (and its table and figure) by the report command's code."""
    from aepo_lite.training import RunLock
    specs = plan(cfg)
    out = {"done": [], "skipped": [], "failed": [], "unavailable": []}
    with RunLock(cfg.out, what="out", name=".sweep.lock"):
        why = {ds: available(ds) for ds in dict.fromkeys(s.dataset for s in specs)}
        for ds, reason in why.items():
            if reason:
                out["unavailable"].append({"dataset": ds, "reason": reason})
                echo(f"skipped {ds}: {reason}")
        todo = [s for s in specs if not why[s.dataset]]
        fps = _fingerprints(todo)
        todo = [replace(s, data_fingerprint=fps.get(s.dataset)) for s in todo]
        if not todo:  # nothing can run: an error, not a sweep that "succeeded" with no run
            raise ValueError("datasets: none of the sweep's datasets is available here ("
                             + "; ".join(f"{ds}: {reason}" for ds, reason in why.items()) + ")")

        def on_result(r: dict) -> None:
            out[r["status"]].append(r)
            echo(f"[{sum(len(v) for k, v in out.items() if k != 'unavailable')}/{len(todo)}] {r['run']}: "
                 f"{r['status']} ({r['seconds']:.1f} s)" + (f" -> {r['error']} (log: {r['log']})" if r["error"] else ""))

        if cfg.stack_seeds:
            _stack_seeds(todo, echo)
        (_run_ray if cfg.backend == "ray" else _run_local)(todo, cfg, on_result)
    if results_csv is not None and (out["done"] or out["skipped"]):
        from aepo_lite.rl import report
        if any(not s.dataset.startswith(TOY_PREFIX) for s in todo):
            report.collect([cfg.out], results_csv)
    for r in out["failed"]:
        echo(f"FAILED {r['run']}: {r['error']} (log: {r['log']})")
    return out

