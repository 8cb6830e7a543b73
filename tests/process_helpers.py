"""Finding the rank processes a training launcher started, from /proc (Linux)."""
from __future__ import annotations

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
