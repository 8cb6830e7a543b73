"""A throw-away PostgreSQL cluster from Debian's `postgresql` package on 127.0.0.1: a free port,
trust authentication, its socket in its own folder, run as the `postgres` user when the tests run
as root (PostgreSQL refuses to run as root); stopped and deleted afterwards. Skips with the reason
where PostgreSQL or the psycopg driver is missing."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_cluster():
    """Yields a postgresql://postgres@127.0.0.1:PORT/postgres URL."""
    pytest.importorskip("psycopg", reason="needs the psycopg driver (pip install 'psycopg[binary]', in the test extras)")
    bin_dir = _binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; `make test` installs it as root)")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="cvrecipe-pg-"))
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    run_as = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"

    def pg(*args: str) -> None:
        subprocess.run([str(bin_dir / args[0]), *args[1:]], check=True, capture_output=True, timeout=120,
                       cwd=folder, **run_as)

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F")
    except subprocess.CalledProcessError as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {err.stderr.decode()[-2000:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
