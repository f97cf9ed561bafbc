"""``aepo-lite lab``: bad input says which and why and leaves no server; a real start serves the
``.py`` notebooks as notebooks and Ctrl-C/SIGTERM stops the server. (The browser test drives it.)"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aepo_lite import cli
from aepo_lite.course import lab

ROOT = Path(__file__).resolve().parents[1]
HAVE_LAB = not lab.missing_packages()


def _no_popen(*a, **k):
    raise AssertionError("a server was started")


def test_port_in_use_is_an_error_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.setattr(lab.subprocess, "Popen", _no_popen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["lab", "--no-browser", "--port", str(port), "--root", str(ROOT)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"port {port}" in err and "in use" in err


def test_bad_port_number_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(lab.subprocess, "Popen", _no_popen)
    assert cli.main(["lab", "--no-browser", "--port", "70000", "--root", str(ROOT)]) == 2
    assert "not a port number" in capsys.readouterr().err


def test_missing_jupyterlab_names_the_package_and_how_to_install(monkeypatch, capsys):
    real = lab.importlib.util.find_spec
    monkeypatch.setattr(lab.importlib.util, "find_spec", lambda name, *a: None if name == "jupyterlab" else real(name, *a))
    monkeypatch.setattr(lab.subprocess, "Popen", _no_popen)
    assert lab.missing_packages() == ["jupyterlab"]
    assert cli.main(["lab", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "jupyterlab" in err and "pip install" in err and "[course]" in err


def test_missing_root_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(lab.subprocess, "Popen", _no_popen)
    assert cli.main(["lab", "--no-browser", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"aepo-lite lab: error: --root {tmp_path / 'nope'}: no such folder", err
    (tmp_path / "file.txt").write_text("x")
    assert cli.main(["lab", "--no-browser", "--root", str(tmp_path / "file.txt")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_serves_the_folder_it_is_started_in(monkeypatch, tmp_path, capsys):
    served = []

    class FakeServer:
        def __init__(self, root, port, **kw):
            served.append(Path(root))
            raise lab.LabError("stop here")

    monkeypatch.setattr(lab, "LabServer", FakeServer)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lab", "--no-browser"]) == 2
    assert served == [tmp_path.resolve()]
    assert lab.start_path(tmp_path) == "lab"  # no notebooks/ there: open the top of the folder
    (tmp_path / "notebooks").mkdir()
    assert lab.start_path(tmp_path) == "lab/tree/notebooks"


def test_a_server_that_dies_at_start_is_reported_with_its_log(monkeypatch, tmp_path, capsys):
    fake = [sys.executable, "-c", "import sys; print('jupyter: cannot start, something is wrong'); sys.exit(3)"]
    monkeypatch.setattr(lab, "lab_argv", lambda *a, **k: fake)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "jupytext.toml").write_text("")
    assert cli.main(["lab", "--no-browser", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exited with status 3" in err and "something is wrong" in err


def test_argv_is_loopback_only_and_root_only_when_root():
    argv = lab.lab_argv(ROOT, 8888, open_browser=False)
    assert "--ServerApp.ip=127.0.0.1" in argv and "--ServerApp.port_retries=0" in argv
    assert any("jupytext" in a for a in argv if "contents_manager_class" in a)
    assert ("--allow-root" in argv) == (os.geteuid() == 0)
    assert not any("token" in a.lower() for a in argv)  # the token travels in the environment


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not HAVE_LAB, reason=f"course packages missing: {lab.missing_packages()}")
def test_lab_serves_py_notebooks_as_notebooks_and_stops_on_sigterm(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "jupytext.toml").write_text((ROOT / "jupytext.toml").read_text())
    (tmp_path / ".jupyter").symlink_to(ROOT / ".jupyter")
    (tmp_path / "notebooks" / "01_tiny.py").write_text("# %% [markdown]\n# # Tiny\n\n# %%\nprint(1)\n")
    port = lab.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aepo_lite", "lab", "--no-browser", "--port", str(port),
                             "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    jupyter_pid = None
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "JupyterLab is running (pid" in line:
                jupyter_pid = int(line.split("(pid ")[1].split(",")[0])
            if "open the course:" in line:
                url = line.split("open the course:")[1].strip()
                break
        else:
            pytest.fail("no URL printed:\n" + "".join(lines))
        assert jupyter_pid, "".join(lines)
        assert url.startswith(f"http://127.0.0.1:{port}/lab") and "token=" in url
        token = url.split("token=")[1]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/notebooks/01_tiny.py",
                                     headers={"Authorization": f"token {token}"})
        import json
        with urllib.request.urlopen(req, timeout=10) as r:
            model = json.loads(r.read())
        assert model["type"] == "notebook"  # jupytext's contents manager
        assert model["content"]["cells"][0]["cell_type"] == "markdown"
        # the repository's default viewer for .py: Jupytext Notebook
        req = urllib.request.Request(f"http://127.0.0.1:{port}/lab/api/settings/@jupyterlab/docmanager-extension:plugin",
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            schema = json.loads(r.read())["schema"]
        assert schema["properties"]["defaultViewers"]["default"].get("python") == "Jupytext Notebook"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            if jupyter_pid:
                os.killpg(jupyter_pid, signal.SIGKILL)
            pytest.fail("aepo-lite lab did not stop on SIGTERM")
    assert proc.returncode == 0
    time.sleep(0.5)
    assert _port_closed(port), "the server still listens after aepo-lite lab stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(jupyter_pid, 0)


@pytest.mark.skipif(not HAVE_LAB, reason=f"course packages missing: {lab.missing_packages()}")
def test_check_names_the_notebook_and_cell_that_fail_and_starts_no_server(monkeypatch, tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "jupytext.toml").write_text((ROOT / "jupytext.toml").read_text())
    (tmp_path / "notebooks" / "01_fine.py").write_text("# %%\nimport os\nprint(os.environ['AEPO_SCALE'])\n")
    (tmp_path / "notebooks" / "02_broken.py").write_text("# %%\nx = 1\n\n# %%\nraise KeyError('no results file')\n")

    def no_start(self, *a, **k):
        raise AssertionError("JupyterLab was started although a notebook failed")

    monkeypatch.setattr(lab.LabServer, "start", no_start)
    monkeypatch.delenv("AEPO_SCALE", raising=False)
    assert cli.main(["lab", "--no-browser", "--check", "--root", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert "notebooks/01_fine.py: ran" in cap.out
    assert "notebooks/02_broken.py failed to execute: code cell 2" in cap.err
    assert "KeyError" in cap.err and "no results file" in cap.err
    assert "AEPO_SCALE" not in os.environ  # restored


def _put_notebook(server, rel: str, nb: dict) -> None:
    import json
    body = json.dumps({"type": "notebook", "format": "json", "content": nb}).encode()
    req = urllib.request.Request(f"{server.base_url}/api/contents/{rel}", data=body, method="PUT",
                                 headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def _as_if_run(nb: dict) -> dict:
    """What a Run All in JupyterLab adds to a notebook model: outputs, counts, run-time metadata."""
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            c["execution_count"] = i + 1
            c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": f"out {i}\n"}]
            c["metadata"]["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    return nb


@pytest.mark.skipif(not HAVE_LAB, reason=f"course packages missing: {lab.missing_packages()}")
def test_saving_a_run_chapter_leaves_its_files_unchanged_and_lists_it_once(tmp_path):
    """JupyterLab's autosave after a Run All writes the .py and the paired .ipynb through jupytext:
    both keep their bytes; an edit still reaches both files (without outputs); an unpaired notebook
    keeps its outputs; the file browser lists the chapter once."""
    import json
    import shutil

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for f in ("jupytext.toml",):
        shutil.copy(ROOT / f, tmp_path / f)
    pair = sorted((ROOT / "notebooks").glob("[0-9]*.py"))[0]
    for p in (pair, pair.with_suffix(".ipynb")):
        shutil.copy(p, nb_dir / p.name)
    (nb_dir / "scratch.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    files = {p: p.read_bytes() for p in nb_dir.iterdir()}
    py_rel = f"notebooks/{pair.name}"
    with lab.LabServer(tmp_path, lab.free_port()) as server:
        listed = [c["name"] for c in server._api("api/contents/notebooks")["content"]]
        assert sorted(listed) == sorted([pair.name, "scratch.ipynb"]), listed
        nb = server._api(f"api/contents/{py_rel}")["content"]
        _put_notebook(server, py_rel, _as_if_run(nb))
        changed = [p.name for p, data in files.items() if p.read_bytes() != data]
        assert changed == [], f"saving a run chapter changed {changed}"
        # an edit is saved to both files, still without outputs
        nb["cells"][-1]["source"] += "\nprint('an edit')"
        _put_notebook(server, py_rel, _as_if_run(nb))
        assert "print('an edit')" in (nb_dir / pair.name).read_text()
        saved = json.loads((nb_dir / pair.with_suffix(".ipynb").name).read_text())
        assert "print('an edit')" in "".join(saved["cells"][-1]["source"])
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in saved["cells"])
        assert "language_info" not in saved["metadata"] and "widgets" not in saved["metadata"]
        # a notebook that is not paired keeps what it shows
        own = server._api("api/contents/notebooks/scratch.ipynb")["content"]
        own["cells"] = [{"cell_type": "code", "source": "1", "metadata": {}, "outputs": [], "execution_count": None,
                         "id": "a1"}]
        _put_notebook(server, "notebooks/scratch.ipynb", _as_if_run(own))
        assert json.loads((nb_dir / "scratch.ipynb").read_text())["cells"][0]["outputs"], "outputs were stripped"


def test_scrub_touches_only_paired_notebooks():
    paired = {"metadata": {"jupytext": {"formats": "ipynb,py:percent"}}, "cells": []}
    assert lab.is_paired(paired) and not lab.is_paired({"metadata": {}})
    assert not lab.is_paired({"metadata": {"jupytext": {"formats": "py:percent"}}})
    model = {"type": "notebook", "content": _as_if_run({**paired, "cells": [
        {"cell_type": "code", "source": "x", "metadata": {"tags": ["keep"]}, "outputs": [], "execution_count": None}]})}
    lab.scrub_paired_notebook(model, "notebooks/a.ipynb")
    cell = model["content"]["cells"][0]
    assert cell["outputs"] == [] and cell["execution_count"] is None and cell["metadata"] == {"tags": ["keep"]}
    assert set(model["content"]["metadata"]) == {"jupytext"}
    text = {"type": "file", "content": "print(1)"}
    lab.scrub_paired_notebook(text, "notebooks/a.py")
    assert text == {"type": "file", "content": "print(1)"}


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed orphan may wait to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.skipif(not HAVE_LAB or not sys.platform.startswith("linux"), reason="needs the course packages, on Linux")
def test_server_and_kernels_end_when_the_launcher_is_killed(tmp_path):
    """SIGKILL gives ``aepo-lite lab`` no chance to clean up: the parent-death signal stops JupyterLab,
    which shuts its kernels down."""
    import json

    port = lab.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aepo_lite", "lab", "--no-browser", "--port", str(port),
                             "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    jupyter_pid = token = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and token is None:
            line = proc.stdout.readline()
            if not line:
                break
            if "JupyterLab is running (pid" in line:
                jupyter_pid = int(line.split("(pid ")[1].split(",")[0])
            if "open the course:" in line:
                token = line.split("token=")[1].strip()
        assert jupyter_pid and token, "aepo-lite lab did not start"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/kernels", data=b"{}", method="POST",
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["id"]
        deadline = time.monotonic() + 60
        kernels = []
        while not kernels and time.monotonic() < deadline:
            kernels = [c for c in _children(jupyter_pid) if "ipykernel" in Path(f"/proc/{c}/cmdline").read_text()]
            time.sleep(0.2)
        assert kernels, "no kernel process under JupyterLab"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in (jupyter_pid, *kernels)):
            time.sleep(0.2)
        left = [p for p in (jupyter_pid, *kernels) if _alive(p)]
        assert not left, f"still running after aepo-lite lab was killed: {left}"
        assert _port_closed(port)
    finally:
        for pid in [jupyter_pid] if jupyter_pid else []:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
