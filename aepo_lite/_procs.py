"""Child processes that do not outlive the command that started them.

A sweep or a toy grid runs its runs in a pool of spawned worker processes. Killed with SIGTERM (``kill``, a
scheduler's time limit), the parent dies at once and, by default, its workers go on training in the background,
holding run locks and CPU. Here each worker asks the kernel (Linux's parent-death signal) for SIGTERM when its
parent dies, however it dies, so the workers stop with it; their runs resume from their checkpoints on a rerun.
Elsewhere than Linux nothing is asked.
"""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int, prctl=None) -> None:
    """In a child process: SIGTERM it when its parent dies; ``parent`` is the pid the child was started by
    (when the parent has already died, the child stops now: nobody would send the signal)."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def process_pool(workers: int):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes that stop when this process dies."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
