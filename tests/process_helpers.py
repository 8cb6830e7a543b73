"""Watching training jobs started as processes: their ranks (from /proc, Linux) and conditions."""
from __future__ import annotations

import time
from pathlib import Path


def rank_children(pid: int) -> dict[int, int]:
    """{rank: pid} of the rank processes that the process `pid` started (RANK in their environment)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ppid == pid and rank:
            ranks[int(rank[0])] = int(entry.name)
    return ranks


def wait_for_job(condition, proc, seconds: float, what: str) -> None:
    """Poll `condition` every 50 ms until it holds; fail if the job `proc` ends first or `seconds`
    pass (a generous limit that only catches hangs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {seconds} s")
