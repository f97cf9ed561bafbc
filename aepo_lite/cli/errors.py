"""The command line's one error boundary: a failure becomes one line, never a traceback.

    aepo-lite CMD: error: WHAT WAS WRONG: WHAT TO DO

``run_command(name, fn, debug)`` runs ``fn()`` (a command, already parsed) and turns whatever it
raises into that line and an exit status:

  - 2: the input was wrong (a ``ValueError`` from a check, a missing or existing file, a path
    that is a file where a folder is needed or the reverse, a name too long, no permission);
  - 1: the run failed (disk full, out of memory, numbers that went non-finite, a damaged saved
    file, a missing package, or a bug: then the line says to re-run with ``--debug``);
  - 130: interrupted by Ctrl-C (the atomic writers leave no half-written file behind).

A usage error (a bad flag or value, seen by argparse or tyro) is one line of the same form, from
:class:`OneLineParser` and ``aepo_lite.cli._config.tyro_cli``. The traceback is printed only with
``debug`` (``aepo-lite --debug CMD ...`` or ``AEPO_DEBUG=1``). The library raises plain exceptions;
only this module knows how a terminal user should read them.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, TextIO

__all__ = ["run_command", "describe", "debug_requested", "OneLineParser", "EXIT_USAGE", "EXIT_FAILED",
           "EXIT_INTERRUPTED"]

EXIT_FAILED = 1  # the command ran and failed (resources, diverged numbers, damaged files, bugs)
EXIT_USAGE = 2  # the input was wrong (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

_DEBUG_HINT = "re-run with --debug (or AEPO_DEBUG=1) for the traceback"


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` on the command line, or ``AEPO_DEBUG`` set to 1/true/yes in the environment."""
    return bool(flag) or os.environ.get("AEPO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line like every other error, ``PROG: error: WHAT (see PROG --help)``,
    instead of the usage block and the error (``--help`` still prints the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if type(e).__name__ in ("OutOfMemoryError",):  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg.lower() or "DefaultCPUAllocator" in msg
                                             or "can't allocate memory" in msg)


def _is_damaged_file(e: BaseException) -> bool:
    """Errors that unpickling or reading a half-written checkpoint raises."""
    if isinstance(e, (pickle.UnpicklingError, EOFError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "PytorchStreamReader", "failed finding central directory", "invalid header or archive is corrupted",
        "unexpected EOF", "Error(s) in loading state_dict"))


def _file_in_traceback(e: BaseException) -> Optional[str]:
    """The file a reader was reading when ``e`` was raised (innermost frame holding one), if any."""
    tb, found = e.__traceback__, None
    while tb is not None:
        for key in ("path", "f", "filename", "file", "name", "fname"):
            v = tb.tb_frame.f_locals.get(key)
            v = getattr(v, "name", v) if not isinstance(v, (str, Path)) else v
            if isinstance(v, (str, Path)) and str(v) and os.path.isfile(v):
                found = str(v)
                break
        tb = tb.tb_next
    return found


def _path_of(e: OSError) -> str:
    names = [n for n in (e.filename, e.filename2) if n is not None]
    return " -> ".join(str(n) for n in names) if names else ""


def _os_error(e: OSError) -> tuple[str, int]:
    if e.errno is None and isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                                          IsADirectoryError)):
        return _one_line(e), EXIT_USAGE  # raised by a check, with its own message
    path = _path_of(e)
    at = f" ({path})" if path else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "the disk quota is used up"
        return (f"{what} while writing{at or ' a file'}: free some space or write elsewhere (--out, --csv, "
                "--figures ...); files written before this one are complete", EXIT_FAILED)
    if e.errno == errno.ENAMETOOLONG:
        longest = max((len(p) for p in str(path).split(os.sep)), default=0)
        return (f"a file name is too long{at}: its longest part has {longest} characters (most file systems "
                "allow 255): choose a shorter --out, --name or dataset id", EXIT_USAGE)
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied{at}: choose a folder you can write to (--out, --csv, ...) or change the "
                "permissions of that one", EXIT_USAGE)
    if e.errno == errno.EROFS:
        return f"the file system is read-only{at}: write elsewhere (--out, --csv, ...)", EXIT_USAGE
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        return (f"a part of the path {path or '(unknown)'} is a file, not a folder: choose another path, or move "
                "that file away", EXIT_USAGE)
    if isinstance(e, IsADirectoryError) or e.errno == errno.EISDIR:
        return f"{path or 'the path'} is a folder where a file was expected: give a file path", EXIT_USAGE
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
        return f"no such file or folder: {path or _one_line(e)}", EXIT_USAGE
    if isinstance(e, FileExistsError) or e.errno == errno.EEXIST:
        if e.filename is not None and os.path.isfile(e.filename):  # mkdir over a file: the path names a file
            return (f"{e.filename} is a file where a folder is needed: choose another path, or move that file "
                    "away", EXIT_USAGE)
        return f"{path or 'the path'} already exists: remove it or choose another path", EXIT_USAGE
    msg = _one_line(e)
    if any(s in msg for s in ("Unable to open file", "Unable to synchronously open", "file signature not found",
                              "truncated file", "HDF5", "Unable to read", "bad object header")):
        where = path or _file_in_traceback(e) or "a dataset file"
        return (f"{where} could not be read ({msg[:200]}): the file is damaged (an interrupted download or make); "
                "delete that dataset's folder and make or download it again", EXIT_FAILED)
    return f"{msg}{'' if path and path in msg else at}", EXIT_FAILED


def describe(e: BaseException) -> tuple[str, int]:
    """(the one-line message, the exit status) for an exception raised by a command."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; files written so far are complete (no half-written file is left)", EXIT_INTERRUPTED
    if _is_oom(e):
        first = _one_line(e)[:200]
        return (f"out of memory ({type(e).__name__}: {first}): use a smaller preset or batch size, fewer parallel "
                "environments or evaluation candidates, or another --device", EXIT_FAILED)
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, FloatingPointError):
        return (f"numbers went non-finite ({_one_line(e)}): the training diverged; try a smaller learning rate or "
                "guidance scale, or check the data for extreme values", EXIT_FAILED)
    if _is_damaged_file(e):
        where = _file_in_traceback(e)
        what = f"the saved file {where}" if where else "a saved file (checkpoint or cache)"
        return (f"{what} is damaged ({type(e).__name__}: {_one_line(e)[:160]}): delete it so that the step that "
                f"makes it runs again{'' if where else '; ' + _DEBUG_HINT + ' to see which file'}", EXIT_FAILED)
    if isinstance(e, ModuleNotFoundError):
        return (f"the package {e.name!r} is not installed: install the extra that needs it, e.g. "
                "pip install 'aepo-lite[rl,datasets]'", EXIT_FAILED)
    import csv
    if isinstance(e, (UnicodeDecodeError, csv.Error)):
        where = _file_in_traceback(e)  # a results CSV or text file holding binary junk, a CSV with a broken quote
        return (f"{where or 'a text file'} is not readable text or CSV ({type(e).__name__}: {_one_line(e)[:160]}): "
                "the file is damaged; restore or delete it" + ("" if where else f"; {_DEBUG_HINT} to see which file"),
                EXIT_FAILED)
    if isinstance(e, ValueError):
        import json
        if isinstance(e, json.JSONDecodeError):
            where = _file_in_traceback(e)
            return (f"{where or 'a JSON file'} is damaged ({_one_line(e)}): restore or delete it"
                    + ("" if where else f"; {_DEBUG_HINT} to see which file"), EXIT_FAILED)
        return _one_line(e) or "invalid value", EXIT_USAGE
    tb = traceback.extract_tb(e.__traceback__)
    at = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return (f"internal error ({type(e).__name__}: {_one_line(e)[:300]}{at}); this is a bug in aepo-lite or an "
            f"input it does not check yet: {_DEBUG_HINT} and report it", EXIT_FAILED)


def run_command(name: str, fn: Callable[[], Optional[int]], debug: bool = False, *,
                err: Optional[TextIO] = None) -> int:
    """Run ``fn()`` (one parsed command) inside the error boundary; returns the exit status.

    ``name`` is the command as typed (``train``, ``toy-grid`` ...); ``fn`` returns an exit status
    (``None`` = 0). ``SystemExit`` passes through (argparse and ``--help`` use it).
    """
    err = err or sys.stderr
    debug = debug_requested(debug)
    prog = f"aepo-lite {name}" if name else "aepo-lite"
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except BrokenPipeError:  # `aepo-lite ... | head`: the reader left; nothing to report
        try:
            sys.stdout = open(os.devnull, "w")  # Python would complain again while flushing at exit
        except OSError:
            pass
        return EXIT_FAILED
    except BaseException as e:  # KeyboardInterrupt included: one line and 130, not a traceback
        if debug:
            traceback.print_exception(type(e), e, e.__traceback__, file=err)
        msg, code = describe(e)
        try:
            print(f"{prog}: error: {msg}", file=err, flush=True)
        except (OSError, ValueError):  # stderr itself is gone
            pass
        return code
