"""Data-parallel training on CPU processes over Gloo, started for real through torchrun's launcher
(everything binds to 127.0.0.1): SyncBatchNorm over two ranks is BatchNorm over the whole batch,
two processes follow the loss curve of one with the same global batch, only rank 0 writes, runs
resume on another process count, a killed rank is restarted from the last checkpoint
(--max-restarts) or stops the job with a clear message, a hung rank ends it after
train.rank_timeout_s, and callbacks of the launching process (the tuner's) see every epoch and
can stop the ranks."""
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from cvrecipe.config import ConfigError, load_config, load_run_config
from cvrecipe.models.registry import register
from cvrecipe.train.distributed import CpuSyncBatchNorm
from cvrecipe.train.job import train
from cvrecipe.train.launch import RanksFailed, _failure_line
from process_helpers import rank_children as _children
from process_helpers import wait_for_job as _wait_for

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

ROOT = Path(__file__).resolve().parents[2]
# digits, no augmentation, a constant lr (so 2 epochs then 1 more are 3 epochs), BatchNorm over the global batch
SETTINGS = ["runs_dir={runs}", "data.cache_dir={runs}/cache", "name=r", "train.epochs=2", "train.sanity=false", "train.deterministic=true",
            "train.num_threads=1", "augment.crop_padding=0", "schedule.name=constant", "optim.lr=0.02",
            "train.sync_bn=true", "train.rank_timeout_s=60"]


def _config(runs, extra=()):
    return load_config("digits-quick", [s.format(runs=runs) for s in SETTINGS] + list(extra))


def _rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")}
                for row in csv.DictReader(f)]


def _close(a: dict, b: dict, train_rel=0.01, val_rel=0.05):
    """Rows of two runs that saw the same images in the same global batches: the same steps and lr,
    training losses within 1 % and validation losses within 5 % (BatchNorm statistics and the
    summation order of the gradient differ in the last bits, and grow a little over the steps)."""
    return (a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"])
            and a["train_loss"] == pytest.approx(b["train_loss"], rel=train_rel)
            and a["val_loss"] == pytest.approx(b["val_loss"], rel=val_rel))


def _extend(run_dir, epochs):
    """Give a finished run more epochs (with a constant lr, 2 epochs then 1 more are 3 epochs)."""
    path = Path(run_dir) / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


# -- SyncBatchNorm on the CPU -----------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_rank(rank, port, x, weights, out_dir):
    if rank == 0:  # the store listens on 127.0.0.1 only
        listener = socket.create_server(("127.0.0.1", port))
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
    else:
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        bn = CpuSyncBatchNorm(x.shape[1])
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2, x.shape[1]))
            bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
        part = x[rank * 3:(rank + 1) * 3].clone().requires_grad_()
        y = bn(part)
        (y * weights[rank * 3:(rank + 1) * 3]).sum().backward()
        torch.save({"y": y.detach(), "grad_x": part.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                    "mean": bn.running_mean, "var": bn.running_var}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_over_two_ranks_is_batchnorm_over_the_whole_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=gen) * 3 + 1
    weights = torch.randn(6, 4, 5, 5, generator=gen)  # a loss that weighs every output differently
    mp.spawn(_sync_bn_rank, args=(_free_port(), x, weights, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    bn = torch.nn.BatchNorm2d(4)  # the reference: torch's BatchNorm over all six images
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 4))
        bn.bias.copy_(torch.linspace(-1, 1, 4))
    whole = x.clone().requires_grad_()
    y = bn(whole)
    (y * weights).sum().backward()
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]), whole.grad, **close)
    torch.testing.assert_close(parts[0]["grad_w"] + parts[1]["grad_w"], bn.weight.grad, **close)  # DDP adds these
    torch.testing.assert_close(parts[0]["grad_b"] + parts[1]["grad_b"], bn.bias.grad, **close)
    for p in parts:
        torch.testing.assert_close(p["mean"], bn.running_mean, **close)
        torch.testing.assert_close(p["var"], bn.running_var, **close)


# -- runs on one and two processes -------------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.events = []

    def on_train_start(self, model, cfg, run_dir):
        self.events.append(("start", Path(run_dir)))

    def on_epoch_end(self, row, model):
        self.events.append(("epoch", row))

    def on_train_end(self, history, run_dir):
        self.events.append(("end", len(history)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`one`: one process, 3 epochs (2, then resumed for 1 more); `two`: two processes, 2 epochs,
    started from Python with callbacks; `one_at_2`: a copy of `one` after its 2 epochs."""
    root = tmp_path_factory.mktemp("ddp")
    one = train(_config(root / "one"))
    shutil.copytree(one, root / "one_at_2" / "r")
    _extend(one, 3)
    train(load_run_config(one), resume_dir=one)
    recorder = _Recorder()
    two = train(_config(root / "two"), nproc=2, callbacks=[recorder])
    return {"root": root, "one": one, "two": two, "one_at_2": root / "one_at_2" / "r", "recorder": recorder}


def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(runs):
    one, two = _rows(runs["one"]), _rows(runs["two"])
    assert len(two) == 2 and all(_close(a, b) for a, b in zip(two, one))


def test_only_rank_0_writes_and_callbacks_run_in_the_launching_process(runs):
    two = runs["two"]
    assert sorted(p.name for p in two.parent.iterdir()) == ["cache", "r"]  # no second run folder from another rank
    names = sorted(p.name for p in two.iterdir())
    assert [n for n in names if not n.startswith("events.")] == ["best.safetensors", "config.yaml", "last.ckpt",
                                                                   "metrics.csv", "run.json"]
    assert len([n for n in names if n.startswith("events.")]) == 1  # one TensorBoard writer: rank 0's
    assert '"processes": 2' in (two / "run.json").read_text()
    events = runs["recorder"].events
    assert events[0] == ("start", two) and events[-1] == ("end", 2)
    assert [e[1] for e in events[1:-1]] == [{k: v for k, v in row.items()} for row in _rows_all(two)]


def _rows_all(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_a_two_process_run_resumes_on_one(runs):
    run_dir = runs["root"] / "two_to_one" / "r"
    shutil.copytree(runs["two"], run_dir)
    _extend(run_dir, 3)
    train(load_run_config(run_dir), resume_dir=run_dir, nproc=1)
    resumed, two, one = _rows(run_dir), _rows(runs["two"]), _rows(runs["one"])
    assert resumed[:2] == two and _close(resumed[2], one[2])


def test_a_one_process_run_resumes_on_two(runs):
    run_dir = runs["one_at_2"]
    _extend(run_dir, 3)
    train(load_run_config(run_dir), resume_dir=run_dir, nproc=2)
    resumed, one = _rows(run_dir), _rows(runs["one"])
    assert resumed[:2] == one[:2] and _close(resumed[2], one[2])


class _StopAfter:
    def on_epoch_end(self, row, model):
        if row["epoch"] == 1:
            raise KeyError("stop: pruned")


def test_a_callback_that_raises_stops_the_ranks(tmp_path):
    cfg = _config(tmp_path, ["train.epochs=200"])
    with pytest.raises(KeyError, match="pruned"):
        train(cfg, nproc=2, callbacks=[_StopAfter()])
    assert len(_rows(tmp_path / "r")) < 200  # stopped after the callback raised, long before the last epoch
    assert not _children(os.getpid())  # no rank left running


def test_callbacks_need_the_main_thread_and_a_job_without_them_runs_from_any_thread(tmp_path):
    """A callback that raises stops the ranks through the agent's signal handler, which the agent
    installs only from the main thread: elsewhere callbacks are refused before anything starts, and a
    job without callbacks trains (the launcher leaves the signal handlers alone there)."""
    results, handler = {}, signal.getsignal(signal.SIGTERM)

    def in_thread(key, **kw):
        try:
            results[key] = train(_config(tmp_path / key, ["train.epochs=1"]), nproc=2, **kw)
        except Exception as err:  # noqa: BLE001 - checked below
            results[key] = err

    for key, kw in (("with", {"callbacks": [_Recorder()]}), ("without", {})):
        thread = threading.Thread(target=in_thread, args=(key,), kwargs=kw)
        thread.start()
        thread.join(timeout=180)
    assert isinstance(results["with"], RuntimeError) and "must be called from the main thread" in str(results["with"])
    assert not (tmp_path / "with").exists()
    assert results["without"] == tmp_path / "without" / "r" and len(_rows(results["without"])) == 1
    assert signal.getsignal(signal.SIGTERM) == handler


# -- failures -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_failed", [False, True])
def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder_unless_kept(tmp_path, keep_failed):
    """As on one process: rank 0 removes the folder of a new run that failed before any results,
    unless train(..., keep_failed=True) (a tuning trial keeps it, for its trial.json)."""
    cfg = _config(tmp_path, ["model.kwargs={nope: 1}"])  # every rank fails building the model, after the folder
    with pytest.raises(RanksFailed, match=r"rank \d of 2 \(pid \d+\) failed \(exit code 1\)"):
        train(cfg, nproc=2, keep_failed=keep_failed)
    kept = sorted(p.name for p in (tmp_path / "r").iterdir()) if (tmp_path / "r").exists() else []
    assert kept == (["config.yaml", "run.json"] if keep_failed else [])
    assert not _children(os.getpid())


def test_the_failure_line_names_the_cause_not_the_ranks_stopped_after_it(tmp_path):
    """The agent stops the ranks left after a failure with SIGTERM, and ranks that lose a peer exit with
    an error: the line names a rank killed by another signal first, then one that exited with an error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def line(*exitcodes):
        failures = {rank: ProcessFailure(rank, 100 + rank, code, str(tmp_path / "none.json"))
                    for rank, code in enumerate(exitcodes)}
        return _failure_line(ChildFailedError("python", failures), len(exitcodes), None)

    assert line(-signal.SIGTERM, 1).startswith("rank 1 of 2 (pid 101) failed (exit code 1)")
    assert line(1, -signal.SIGKILL).startswith("rank 1 of 2 (pid 101) failed (killed by SIGKILL)")
    assert line(-signal.SIGTERM, -signal.SIGSEGV).startswith("rank 1 of 2 (pid 101) failed (killed by SIGSEGV)")
    assert line(-signal.SIGTERM).startswith("rank 0 of 1 (pid 100) failed (killed by SIGTERM)")


def _launch(tmp_path, extra):
    log = open(tmp_path / "out.txt", "w")
    args = ["digits-quick"] + [s.format(runs=tmp_path) for s in SETTINGS] + ["train.epochs=100000", "--nproc", "2", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "cvrecipe", "train", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    return proc, tmp_path / "out.txt"


def _epochs_written(tmp_path) -> int:
    path = tmp_path / "r" / "metrics.csv"
    return len(_rows(tmp_path / "r")) if path.is_file() else 0


def _kill_rank_1(proc, sig=signal.SIGKILL) -> int:
    pid = _children(proc.pid)[1]
    os.kill(pid, sig)
    return pid


def test_a_killed_rank_is_restarted_from_the_checkpoint_then_stops_the_job(tmp_path):
    proc, out = _launch(tmp_path, ["--max-restarts", "1"])
    try:
        _wait_for(lambda: _epochs_written(tmp_path) >= 1 and 1 in _children(proc.pid), proc, 120, "a first epoch")
        _kill_rank_1(proc)  # restart 1 of 1: the ranks start again and go on from last.ckpt
        before = _epochs_written(tmp_path)
        _wait_for(lambda: "resuming" in out.read_text() and _epochs_written(tmp_path) >= before + 1
                  and 1 in _children(proc.pid), proc, 120, "an epoch after the restart")
        pid = _kill_rank_1(proc)  # no restarts left: the job stops (the time limit only catches a hang)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    text = " ".join(out.read_text().split())
    assert f"rank 1 of 2 (pid {pid}) failed (killed by SIGKILL); the other ranks were stopped" in text
    assert f"resume with: cvrecipe train --resume {tmp_path / 'r'} --nproc 2" in text
    rows = _rows(tmp_path / "r")
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # the restart went on, no epoch twice
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "r"]
    assert not _children(proc.pid)


def test_a_hung_rank_stops_the_job_after_the_rank_timeout(tmp_path):
    proc, out = _launch(tmp_path, ["train.rank_timeout_s=4"])
    try:
        _wait_for(lambda: _epochs_written(tmp_path) >= 1 and 1 in _children(proc.pid), proc, 120, "a first epoch")
        pid = _kill_rank_1(proc, signal.SIGSTOP)  # alive and silent, as a rank on a machine that lost its network
        _wait_for(lambda: "lost the other ranks" in out.read_text(), proc, 120, "rank 0's timeout")
        # the agent stops the stopped rank with SIGTERM, then SIGKILL after its 30 s grace: let SIGTERM through
        os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    text = " ".join(out.read_text().split())
    assert "error: rank 0 of 2: lost the other ranks" in text and "train.rank_timeout_s=4 s" in text
    assert " of 2 (pid " in text and "the other ranks were stopped" in text  # the launcher's line: whichever rank ended first


# -- gradient accumulation ----------------------------------------------------------------------------
class _Mlp(torch.nn.Module):
    """No BatchNorm: a step's gradient is then the mean over its images, however they are split."""

    def __init__(self, num_classes, in_channels, input_size, dropout=0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * input_size[0] * input_size[1], 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


register("test-mlp")(_Mlp)


def test_gradient_accumulation_gives_the_steps_of_the_whole_batch(tmp_path):
    """train.grad_accum=4 runs each step of 64 images as 4 micro-batches of 16: the same gradient,
    so the same losses as steps of 64 at once (to float32 rounding)."""
    rows = {}
    for accum in (1, 4):
        cfg = _config(tmp_path / f"a{accum}", ["model.name=test-mlp", "model.kwargs={}", f"train.grad_accum={accum}", "optim.lr=0.1"])
        rows[accum] = _rows(train(cfg))
    for a, b in zip(rows[4], rows[1]):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_a_global_batch_that_does_not_split_is_refused_before_any_data_is_read():
    with pytest.raises(ConfigError, match=r"train.batch_size=100 does not split into train.nproc=3 x train.grad_accum=1"):
        load_config("digits-quick", ["train.batch_size=100", "train.nproc=3"])
