"""One writer per run folder: RUN/run.lock, held by the job that trains in RUN.

The hold is an exclusive fcntl.flock on the open file, which the kernel drops when the holder
ends, however it ends (SIGKILL, the OOM killer): a lock left by a killed job is never stale, and
the next job simply takes it (its file stays behind until then). The holder writes its pid, host
and start time into the file, so that a second writer is refused with one line naming the holder.
A job that ends removes the file while it still holds it; a job that locked the removed file a
moment later sees that it is no longer the one at the path, and locks that one instead.

Who holds it: a process training alone; rank 0 of a torchrun job; `cvrecipe train --nproc N`'s
launcher when it resumes a run (it sets HELD_ENV for its ranks, whose rank 0 then leaves the hold
to it instead of refusing its own launcher).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HELD_ENV = "CVRECIPE_RUN_LOCK_HELD"  # the run folder whose lock the launcher of this rank holds


class RunBusy(ValueError):
    """Another live job writes in the run folder (a ValueError: the command asked for a folder in use)."""


class RunLock:
    """The hold on one run folder; `with RunLock(run_dir):` or acquire()/release()."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Hold the folder, or raise RunBusy naming the live holder. Writes nothing when refused."""
        if held_by_launcher(self.run_dir):
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunBusy(f"{self.run_dir} is in use by another job ({holder}); one job writes in a run folder "
                              f"at a time: wait for it to end or stop it") from None
            if _is_at(fd, self.path):
                break
            os.close(fd)  # the job before us removed this file as it ended: lock the one at the path now
        info = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):  # (gone with the folder of a failed start)
            self.path.unlink()  # while still held: whoever locks next locks a new file
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(run_dir: str | Path) -> RunLock | None:
    """The hold on `run_dir` when no other job has it, else None (for picking a free folder)."""
    try:
        return RunLock(run_dir).acquire()
    except RunBusy:
        return None


def held_by_launcher(run_dir: str | Path) -> bool:
    held = os.environ.get(HELD_ENV)
    return held is not None and Path(held).resolve() == Path(run_dir).resolve()


def _is_at(fd: int, path: Path) -> bool:
    try:
        at, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"  # the holder locked it a moment ago
