"""Processes that die with the process that started them (torch-free, so a child calls it first).

A child started in a POSIX session of its own (torch's launcher starts the ranks so) gets no
signal when its parent is killed, and SIGKILL reaches no handler that could pass it on: without
this, ranks and tuning workers would run on, unowned, after their parent died.
"""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process when the process that started it (pid `parent`, default: the
    present parent) dies, SIGKILL included. A parent already gone ends this process now."""
    parent = parent or os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)
