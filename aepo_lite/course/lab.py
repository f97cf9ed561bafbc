"""``aepo-lite lab``: open the course in JupyterLab, on loopback, with the ``.py`` notebooks
opening as notebooks and the widgets extension active.

What makes the ``.py`` files open as notebooks is configured in the repository:

- ``jupytext.toml`` pairs every ``notebooks/*.py`` (percent format, the source) with its ``.ipynb``;
- JupyterLab runs with jupytext's contents manager, so the server hands a ``.py`` to the browser
  as a notebook;
- ``.jupyter/labconfig/default_setting_overrides.json`` makes "Jupytext Notebook" the default
  viewer for Python files; the command puts ``.jupyter`` on ``JUPYTER_CONFIG_PATH`` so JupyterLab
  reads it as a default (your own JupyterLab settings still win).

Running the course leaves the repository as it was. A chapter is a pair: the ``.py`` is the
source, the ``.ipynb`` (for reading on GitHub) is tracked without outputs. When JupyterLab saves a
chapter (autosave after a Run All, or Ctrl-S) jupytext writes both files; the server's
``pre_save_hook``, :func:`scrub_paired_notebook`, removes the outputs, execution counts and the
kernel's run-time metadata from the paired ``.ipynb`` first, so both files keep their bytes unless
you edited a cell. (Notebooks that are not paired with a text file keep their outputs.) The file
browser lists each chapter once: the paired ``.ipynb`` files are hidden from it.

It serves the folder it is started in (``make lab``: the repository), or ``--root``. The server
listens on 127.0.0.1 only, with a fresh random token. Ctrl-C (or SIGTERM, SIGHUP) stops it and its
kernels; a server that failed to start is never left behind; and if ``aepo-lite lab`` itself is
killed (even with SIGKILL), the kernel sends the server SIGTERM (Linux's parent-death signal), so the
server shuts its kernels down and exits too.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
# Importable module -> the package that provides it (what the error message tells you to install).
REQUIRED = {
    "jupyterlab": "jupyterlab",
    "jupytext": "jupytext",
    "ipywidgets": "ipywidgets",
    "jupyterlab_widgets": "jupyterlab_widgets (comes with ipywidgets)",
    "ipykernel": "ipykernel",
}
START_TIMEOUT_S = 90.0
# JupyterLab's own hidden names (ContentsManager.hide_globs' default), kept when we add ours.
DEFAULT_HIDE_GLOBS = ("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*~")
# What a kernel run adds to a notebook and a paired .ipynb must not keep (the .py never has it).
RUNTIME_NOTEBOOK_METADATA = ("language_info", "widgets")
RUNTIME_CELL_METADATA = ("execution", "ExecuteTime", "scrolled", "collapsed", "trusted")


class LabError(RuntimeError):
    """A reason the course could not be opened; the message says which and why."""


# ---------------------------------------------------------------- checks

def missing_packages() -> list[str]:
    """Packages the course needs that are not importable, as install names."""
    return [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when ``host:port`` can be bound now (same SO_REUSEADDR as Jupyter's server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A port on ``host`` that the kernel reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_root(root: Path | None) -> Path:
    """The folder to serve: ``--root`` if given (it must be an existing folder), else the current one."""
    if root is None:
        return Path.cwd().resolve()
    path = Path(root).expanduser()
    if not path.is_dir():
        raise LabError(f"--root {root}: {'not a folder' if path.exists() else 'no such folder'}")
    return path.resolve()


# ---------------------------------------------------------------- saving paired notebooks

def is_paired(nb: dict) -> bool:
    """A notebook paired by jupytext with a text file (its ``jupytext.formats`` names ipynb and another)."""
    formats = (nb.get("metadata", {}).get("jupytext", {}) or {}).get("formats", "")
    if isinstance(formats, list):
        formats = ",".join(str(f) for f in formats)
    names = [f.strip() for f in str(formats).split(",") if f.strip()]
    return len(names) > 1 and any(n.split(":")[0].lstrip(".") == "ipynb" for n in names)


def scrub_paired_notebook(model: dict, path: str, contents_manager=None, **kwargs) -> None:
    """Jupyter server ``pre_save_hook``: a paired ``.ipynb`` is saved without outputs, execution
    counts and run-time metadata (kernel language_info, widget state, cell timings). Other files,
    and notebooks that are not paired, are saved unchanged."""
    if model.get("type") != "notebook" or not str(path).endswith(".ipynb") or not isinstance(model.get("content"), dict):
        return
    nb = model["content"]
    if not is_paired(nb):
        return
    nb = copy.deepcopy(nb)
    for key in RUNTIME_NOTEBOOK_METADATA:
        nb.get("metadata", {}).pop(key, None)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in RUNTIME_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    model["content"] = nb


def paired_ipynb_names(root: Path) -> list[str]:
    """Names of the ``notebooks/*.ipynb`` that have a ``.py`` beside them (hidden in the file browser)."""
    nb_dir = Path(root) / "notebooks"
    return sorted(p.name for p in nb_dir.glob("*.ipynb") if p.with_suffix(".py").is_file()) if nb_dir.is_dir() else []


# ---------------------------------------------------------------- the server

def lab_argv(root: Path, port: int, open_browser: bool) -> list[str]:
    """The JupyterLab command line (the token is passed through the environment, not argv)."""
    argv = [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # a taken port is an error, never a silent other port
        f"--ServerApp.root_dir={root}",
        "--ServerApp.contents_manager_class=jupytext.AsyncTextFileContentsManager",
        "--ContentsManager.pre_save_hook=aepo_lite.course.lab.scrub_paired_notebook",
        f"--LabApp.default_url=/{start_path(root)}",
        f"--ServerApp.open_browser={open_browser}",
    ]
    argv += [f"--ContentsManager.hide_globs={g}" for g in (*DEFAULT_HIDE_GLOBS, *paired_ipynb_names(root))]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    return argv


def start_path(root: Path) -> str:
    """Where the browser opens: the course's notebooks/ when the served folder has one, else its top."""
    return "lab/tree/notebooks" if (Path(root) / "notebooks").is_dir() else "lab"


def parent_death_signal():
    """Linux: a ``preexec_fn`` that asks the kernel to send the child SIGTERM when its parent (this
    process) dies, however it dies; ``None`` elsewhere. libc is looked up here, before the fork."""
    from aepo_lite._procs import _prctl, die_with_parent

    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def set_signal() -> None:  # runs in the child, between fork and exec
        die_with_parent(parent, prctl)

    return set_signal


def lab_env(root: Path, token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    config_path = [str(root / ".jupyter")]
    if env.get("JUPYTER_CONFIG_PATH"):
        config_path.append(env["JUPYTER_CONFIG_PATH"])
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(config_path)
    env["JUPYTER_TOKEN"] = token
    # A non-interactive MPLBACKEND (Agg, from a script or a test run) would hide every plot: let
    # the kernel pick its inline backend.
    env.pop("MPLBACKEND", None)
    env.update(extra or {})
    return env


class LabServer:
    """A JupyterLab process in its own session (so a terminal Ctrl-C reaches only us, and we
    stop it in order). Use as a context manager: the server is stopped on the way out, always."""

    def __init__(self, root: Path, port: int, *, open_browser: bool = False,
                 env: dict[str, str] | None = None, log_path: Path | None = None):
        self.root, self.port, self.open_browser = Path(root), port, open_browser
        self.token = secrets.token_hex(24)
        self.extra_env = env or {}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="aepo-lab-")) / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str | None = None) -> str:
        path = start_path(self.root) if path is None else path
        return f"{self.base_url}/{path.lstrip('/')}?token={self.token}"

    def start(self, timeout: float = START_TIMEOUT_S) -> "LabServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                lab_argv(self.root, self.port, self.open_browser), cwd=self.root,
                env=lab_env(self.root, self.token, self.extra_env),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=parent_death_signal())
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
            self._check_jupytext()
        except BaseException:
            self.stop()
            raise
        return self

    def _api(self, path: str, timeout: float = 5.0) -> dict:
        req = urllib.request.Request(f"{self.base_url}/{path}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"JupyterLab exited with status {self.proc.returncode} before it was ready:\n"
                               f"{self.log_tail()}")
            try:
                self._api("api/status", timeout=2.0)
                return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"JupyterLab did not answer on {self.base_url} within {timeout:.0f} s:\n"
                               f"{self.log_tail()}")
            time.sleep(0.25)

    def _check_jupytext(self) -> None:
        """The server must hand a paired ``.py`` to the browser as a notebook."""
        nb = sorted((self.root / "notebooks").glob("[0-9]*.py"))
        if not nb:
            return
        rel = nb[0].relative_to(self.root).as_posix()
        model = self._api(f"api/contents/{rel}?content=0")
        if model.get("type") != "notebook":
            raise LabError(f"{rel} is served as a {model.get('type')!r}, not a notebook: jupytext's "
                           f"contents manager is not active (is jupytext installed in {sys.prefix}?)")

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in lines[-n:]) + f"\n(full log: {self.log_path})"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM lets Jupyter shut its kernels down; SIGKILL the group if it does not in time."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)

    def __enter__(self) -> "LabServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- checking the notebooks

def check_notebooks(root: Path, scale: str = "smoke", timeout: int = 1200, out=None) -> list[str]:
    """Run every ``notebooks/[0-9]*.py`` in a fresh kernel at ``AEPO_SCALE=scale``, in order.
    Returns one message per notebook that failed: which notebook, which cell, and the error; a ``LabError``
    when there is no notebook to run."""
    chapters = sorted((Path(root) / "notebooks").glob("[0-9]*.py"))
    if not chapters:  # nothing to check is not a pass: the wrong --root
        raise LabError(f"--check: {Path(root) / 'notebooks'} holds no chapters ([0-9]*.py) to run; give --root the "
                       "course's folder (the repository)")
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    out = out or sys.stdout
    failures = []
    previous = os.environ.get("AEPO_SCALE")
    os.environ["AEPO_SCALE"] = scale
    try:
        for path in chapters:
            rel = path.relative_to(root)
            t0 = time.monotonic()
            nb = jupytext.read(path)
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent)}})
            try:
                client.execute()
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
                failures.append(f"{rel} failed to execute: {_failed_cell(nb, e)}")
                print(f"  {rel}: FAILED after {time.monotonic() - t0:.0f} s", file=out, flush=True)
                continue
            print(f"  {rel}: ran in {time.monotonic() - t0:.0f} s at AEPO_SCALE={scale}", file=out, flush=True)
    finally:
        if previous is None:
            os.environ.pop("AEPO_SCALE", None)
        else:
            os.environ["AEPO_SCALE"] = previous
    return failures


def _failed_cell(nb, err) -> str:
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells, 1):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                first = next((line for line in cell.source.splitlines() if line.strip()), "")
                return f"code cell {i} ({first.strip()[:60]!r}) raised {o['ename']}: {o['evalue']}"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
