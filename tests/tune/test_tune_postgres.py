"""Two `cvrecipe tune` commands, as on two machines, share one study through a real PostgreSQL.

The test starts a throw-away cluster from Debian's `postgresql` package on 127.0.0.1 (a free
port, trust authentication, its socket in its own folder), as the `postgres` user when the test
runs as root (PostgreSQL refuses to run as root), and stops and deletes it afterwards. Where
PostgreSQL or the psycopg driver is missing, it skips with the reason."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tune_helpers import env, load, tune_command, write_space


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
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
    data, port = folder / "data", _free_port()

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
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_share_one_study_through_postgres(postgres_url, tmp_path):
    space = write_space(tmp_path / "space.yaml", "optim.lr: {float: [0.05, 0.3], log: true}\n"
                                                 "model.dropout: {float: [0.0, 0.3]}\n")
    args = ["--trials", "4", "--pruner", "none", "--storage", postgres_url, "--study", "shared", "train.epochs=2"]
    machines = [tmp_path / "a", tmp_path / "b"]  # each with its own working folder, as two machines would be
    procs = []
    for i, cwd in enumerate(machines):
        cwd.mkdir()
        procs.append(subprocess.Popen(tune_command(space, *args, "--seed", str(i)), cwd=cwd, env=env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    trials = load(postgres_url, "shared").get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4  # the budget held over both commands
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("over_budget") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}) == 2
    folders = [Path(t.user_attrs["run_dir"]) for t in trials if t.state == TrialState.COMPLETE]
    assert all((f / "metrics.csv").is_file() for f in folders)
    assert {f.parents[2] for f in folders} == set(machines)  # each machine ran trials in its own runs/
    for cwd in machines:
        assert (cwd / "runs" / "shared" / "best.yaml").is_file() and (cwd / "runs" / "shared" / "report.html").is_file()
    assert "optuna-dashboard postgresql+psycopg://postgres@127.0.0.1:" in outputs[0]
