"""``aepo-lite lab``: parses its options and runs the course launcher (:mod:`aepo_lite.course.lab`)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from aepo_lite.course import lab


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lab", help="open the course in JupyterLab (loopback only; prints the URL)",
        description="Start JupyterLab on 127.0.0.1 in the repository, with the .py notebooks opening "
                    "as notebooks (jupytext) and the widgets extension active. Prints the URL with "
                    "its token; Ctrl-C stops the server and its kernels.")
    p.add_argument("--port", type=int, default=None,
                   help="port on 127.0.0.1 (default: a free one); an error if it is taken")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser, only print the URL")
    p.add_argument("--check", action="store_true",
                   help="first run every notebook headless at AEPO_SCALE=smoke (minutes); start JupyterLab "
                        "only if all of them run, else say which failed and why")
    p.add_argument("--root", type=Path, default=None,
                   help="folder JupyterLab serves (default: the current folder; `make lab` runs it in the repository)")
    p.set_defaults(func=run)



# ---------------------------------------------------------------- the command

def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    missing = lab.missing_packages()
    if missing:
        print("aepo-lite lab: error: the course needs packages that are not installed: "
              f"{', '.join(missing)}; install them with: pip install -e '.[course]' "
              "(or run `make lab`, which sets everything up)", file=sys.stderr)
        return 2
    try:
        root = lab.resolve_root(args.root)
        if args.port is not None:
            if not 0 < args.port < 65536:
                raise lab.LabError(f"--port {args.port} is not a port number (1-65535)")
            if not lab.port_is_free(args.port):
                raise lab.LabError(f"port {args.port} on {lab.HOST} is already in use; pick another with "
                               "--port N, or leave --port out to use a free one")
            port = args.port
        else:
            port = lab.free_port()
        if args.check:
            print("aepo-lite lab: running every notebook at AEPO_SCALE=smoke first (--check) ...", flush=True)
            failures = lab.check_notebooks(root)
            if failures:
                print("aepo-lite lab: error: not starting JupyterLab, a notebook does not run:\n  "
                      + "\n  ".join(failures), file=sys.stderr)
                return 1
        server = lab.LabServer(root, port, open_browser=not args.no_browser)  # its log: a temporary folder
        # SIGTERM, or SIGHUP (the terminal closed), stops the server like Ctrl-C does: it runs in its
        # own session, so nothing else would.
        stop_signals = [sig for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig is not None]
        previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in stop_signals}
        try:
            print(f"aepo-lite lab: starting JupyterLab in {root} on {lab.HOST}:{port} ...", flush=True)
            server.start()
            first = sorted((root / "notebooks").glob("[0-9]*.py"))
            print(f"aepo-lite lab: JupyterLab is running (pid {server.proc.pid}, log {server.log_path})\n"
                  f"  open the course: {server.url()}\n"
                  + (f"  chapter 1:       {server.url('lab/tree/notebooks/' + first[0].name)}\n" if first else "")
                  + "  stop it with Ctrl-C", flush=True)
            status = server.proc.wait()
            print(f"aepo-lite lab: JupyterLab exited with status {status}:\n{server.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\naepo-lite lab: stopping JupyterLab ...", flush=True)
            return 0
        finally:
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except lab.LabError as e:
        print(f"aepo-lite lab: error: {e}", file=sys.stderr)
        return 2
