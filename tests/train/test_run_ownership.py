"""Who may write in a run folder, checked on real training processes: the ranks of
`cvrecipe train --nproc 2` die with their launcher when it is killed by SIGKILL, and a second
writer in a folder a live job holds (a resume beside it, on one process or two) is refused with
one line naming the holder, writing nothing; once the holder is killed, the next job takes the
folder over."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cvrecipe.train.runlock import LOCK_NAME, RunBusy, RunLock
from process_helpers import rank_children as _ranks
from process_helpers import wait_for_job as _wait_for

ROOT = Path(__file__).resolve().parents[2]
# digits, a constant lr and many epochs: the job is still running whatever the machine's speed when killed
SETTINGS = ["runs_dir={runs}", "data.cache_dir={runs}/cache", "name=r", "train.epochs=300", "train.sanity=false",
            "train.num_threads=1", "schedule.name=constant", "data.subset=600"]


def _start(tmp_path, *extra) -> subprocess.Popen:
    args = ["digits-quick", *(s.format(runs=tmp_path) for s in SETTINGS), *extra]
    return subprocess.Popen([sys.executable, "-m", "cvrecipe", "train", *args], cwd=ROOT,
                            stdout=open(tmp_path / "out.txt", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"})


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return len(list(csv.DictReader(f)))


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (a dead rank's parent may be a PID 1 that never reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvrecipe", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_the_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path):
    launcher = _start(tmp_path, "--nproc", "2")
    ranks = {}
    try:
        _wait_for(lambda: _rows(tmp_path / "r") >= 1 and len(_ranks(launcher.pid)) == 2, launcher, 180,
                  "first metrics row")
        ranks = _ranks(launcher.pid)
        launcher.kill()  # SIGKILL: no handler of the launcher's runs
        launcher.wait()
        t0 = time.monotonic()
        while any(_alive(pid) for pid in ranks.values()) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        outlived = time.monotonic() - t0
    finally:
        launcher.kill()
        for pid in ranks.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # what an unfixed launcher would leave behind
    assert not any(_alive(pid) for pid in ranks.values()), f"ranks {ranks} still ran 60 s after the launcher died"
    assert outlived < 5, f"the ranks outlived their launcher by {outlived:.1f} s"


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_takes_over_once_it_died(tmp_path):
    holder = _start(tmp_path)
    run = tmp_path / "r"
    try:
        _wait_for(lambda: _rows(run) >= 1, holder, 180, "first metrics row")
        os.kill(holder.pid, signal.SIGSTOP)  # alive and holding, but writing nothing while we look
        before = _snapshot(run)
        for extra in ([], ["--nproc", "2"]):
            second = _cli("train", "--resume", run, *extra, timeout=60)
            assert second.returncode == 2, second
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "in use by another job" in lines[0], lines
            assert f"pid {holder.pid} on {os.uname().nodename}, started 20" in lines[0]
            assert "Traceback" not in second.stdout + second.stderr
        assert _snapshot(run) == before  # the refused writers wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    done = _rows(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["epochs"] = done + 1
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = _cli("train", "--resume", run, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _rows(run) == done + 1


HOLD = "import sys, time; from cvrecipe.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_a_held_folder_is_refused_until_its_holder_is_killed_then_the_lock_file_goes_with_the_last_holder(tmp_path):
    """Two writers on one folder through the lock alone (seconds, no training): the second is
    refused naming the first, a holder killed by SIGKILL leaves no stale lock, and a holder that
    ends removes the file."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (tmp_path / LOCK_NAME).read_bytes()
        with pytest.raises(RunBusy, match=rf"in use by another job \(pid {holder.pid} on {os.uname().nodename}, "
                                          rf"started \d{{4}}-\d\d-\d\dT"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / LOCK_NAME).read_bytes() == before  # refused: nothing written
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the killed holder's lock
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()
