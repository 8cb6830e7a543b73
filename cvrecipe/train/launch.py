"""`cvrecipe train --nproc N` (train.nproc=N): N data-parallel processes on this machine, started
through torchrun's launcher API (torch.distributed.launcher.elastic_launch: the elastic agent that
torchrun itself runs), each running `python -m cvrecipe train` as one rank (distributed.py).

The agent watches the ranks: when one dies, it stops the others within a second and the launch
fails with a ChildFailedError, which becomes one line naming the rank, its pid and how it ended.
With max_restarts > 0 the agent starts the ranks again, and they go on from the run's last.ckpt.
The agent's rendezvous is a file store, and the ranks' store and connections bind to 127.0.0.1:
this launcher is for one machine (several machines: `torchrun --nnodes M ... -m cvrecipe train`,
see docs/distributed.md).

Callers in Python (the tuner runs one trial on several processes this way) call
`cvrecipe.train.job.train(cfg, nproc=N, callbacks=...)`: the callbacks run here, in the launching
process, fed from the run's metrics.csv as rows appear (their `model` argument is None); one that
raises (a pruned trial) stops the ranks, and its exception comes out of train(). Such callers
must call from the main thread: that stop goes through the agent's signal handler.

The ranks die with the launcher: torch starts each in a POSIX session of its own, so a launcher
killed by SIGKILL (which no handler sees) would leave them training on, unowned, in the run
folder. Each rank asks Linux for a SIGKILL when its parent dies (die_with_launcher).
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from rich.console import Console

from cvrecipe.config import Config, save_config
from cvrecipe.train.distributed import find_elastic_run
from cvrecipe.train.parent import die_with_parent
from cvrecipe.train.runlock import HELD_ENV, try_lock

SHUTDOWN_S = 5  # seconds the agent gives the other ranks to stop after one failed, before SIGKILL
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the agent installs its own handlers for these
LAUNCHER_ENV = "CVRECIPE_LAUNCHER_PID"  # set for the ranks: the pid of the process that started them


class RanksFailed(RuntimeError):
    """A rank of a local data-parallel job failed; the others were stopped."""


def train_processes(cfg: Config, nproc: int, resume_dir: Path | None = None, console: Console | None = None,
                    callbacks: list | None = None, max_restarts: int = 0, keep_failed: bool = False) -> Path:
    """Train `cfg` (or resume `resume_dir`) on `nproc` local processes; returns the run folder.
    `keep_failed`: rank 0 keeps the folder of a new run that fails before its first epoch ends."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    console = console or Console(soft_wrap=True)
    _check_devices(cfg, nproc)
    if callbacks and threading.current_thread() is not threading.main_thread():
        # a callback that raises stops the ranks by a SIGTERM to this process, which only the agent's
        # handler turns into stopping them, and the agent installs it only from the main thread
        raise RuntimeError(f"train(..., nproc={nproc}, callbacks=...) must be called from the main thread "
                           f"(called from thread {threading.current_thread().name!r}): a callback that raises "
                           f"stops the ranks through the launcher's signal handler")
    run_id = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="cvrecipe-launch-") as tmp:
        if resume_dir is None:
            save_config(cfg, Path(tmp) / "config.yaml")
            args = ["train", str(Path(tmp) / "config.yaml")]
        else:
            args = ["train", "--resume", str(resume_dir)]
        if keep_failed:
            args.append("--keep-failed")
        # the rendezvous of one machine's agent needs no socket: torch's c10d rendezvous on a file store
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id, rdzv_backend="c10d",
                              rdzv_endpoint=str(Path(tmp) / "rendezvous"), rdzv_configs={"store_type": "file"},
                              local_addr="127.0.0.1", max_restarts=max_restarts, monitor_interval=0.1,
                              shutdown_timeout=SHUTDOWN_S)
        console.print(f"starting {nproc} processes (torchrun's launcher; the ranks meet on 127.0.0.1)")
        relay = _Relay(cfg, run_id, resume_dir, callbacks) if callbacks else None
        with _rank_environment(nproc, cfg.train.num_threads, resume_dir), _own_signal_handlers():
            try:
                if relay is not None:
                    relay.start()
                elastic_launch(config, sys.executable)("-u", "-m", "cvrecipe", *args)
            except ChildFailedError as err:
                run_dir = resume_dir or find_elastic_run(cfg.runs_dir, run_id)
                line = _failure_line(err, nproc, run_dir)
                if resume_dir is None and run_dir is not None and (lock := try_lock(run_dir)) is not None:
                    lock.release()  # the run.lock of a rank 0 the agent stopped before it could remove it
                if resume_dir is None and not keep_failed and run_dir is not None and not has_results(run_dir):
                    # rank 0 removes it itself unless the agent stopped it first (another rank failed sooner)
                    shutil.rmtree(run_dir, ignore_errors=True)
                    console.print(f"removed {run_dir}: the run failed before its first epoch ended")
                raise RanksFailed(line) from None
            except SignalException as err:
                if relay is not None and relay.error is not None:
                    raise relay.error from None  # a callback asked to stop (e.g. a pruned trial)
                raise KeyboardInterrupt(f"stopped by {signal.Signals(err.sigval).name}") from None
            finally:
                if relay is not None:
                    relay.stop()
    run_dir = Path(resume_dir) if resume_dir is not None else find_elastic_run(cfg.runs_dir, run_id)
    if run_dir is None:
        raise RanksFailed(f"the {nproc} processes ended without creating a run folder under {cfg.runs_dir}")
    if relay is not None:
        relay.finish(run_dir)
    return run_dir


def has_results(run_dir: Path) -> bool:
    """Did the run get as far as an epoch's metrics or a checkpoint? (Then its folder is kept, e.g.
    for a run stopped after epoch 1, or a tuning trial pruned there.)"""
    return any((Path(run_dir) / name).is_file() for name in ("last.ckpt", "best.safetensors", "metrics.csv"))


def die_with_launcher() -> None:
    """In a rank: die with `cvrecipe train --nproc`'s launcher (or with torchrun's agent, the parent
    of the ranks `torchrun` starts)."""
    launcher = os.environ.get(LAUNCHER_ENV)
    die_with_parent(int(launcher) if launcher and launcher.isdigit() else None)


def _check_devices(cfg: Config, nproc: int) -> None:
    """One GPU per process: refuse more processes than GPUs before anything starts."""
    import torch

    from cvrecipe.device import resolve_device

    if resolve_device(cfg.train.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"train.nproc={nproc} processes need one GPU each; this machine has "
                         f"{torch.cuda.device_count()} (run more processes with train.device=cpu, or fewer)")


def _failure_line(err, nproc: int, run_dir: Path | None) -> str:
    # the cause first: a rank killed by a signal (SIGKILL from the OOM killer, SIGSEGV), then one that
    # exited with an error; SIGTERM last, since that is how the agent stops the ranks left after a failure
    def cause_order(item):
        code = item[1].exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2, item[1].timestamp)

    rank, failure = min(err.failures.items(), key=cause_order)
    how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    resume = (f"; resume with: cvrecipe train --resume {run_dir} --nproc {nproc}"
              if run_dir is not None and (Path(run_dir) / "last.ckpt").is_file() else "")
    return f"rank {rank} of {nproc} (pid {failure.pid}) failed ({how}); the other ranks were stopped{resume}"


@contextlib.contextmanager
def _rank_environment(nproc: int, threads: int | None, resume_dir: Path | None):
    """Environment of the agent and the ranks: CPU threads shared out (torchrun's default is 1 per
    rank; with 2 ranks on 2 cores that is the same), Gloo on the loopback interface, a store per
    attempt, this process's pid (the ranks die with it) and the resumed folder whose lock it holds."""
    saved = dict(os.environ)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    if resume_dir is not None:
        os.environ[HELD_ENV] = str(Path(resume_dir).resolve())
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    # each attempt of the ranks gets a store of its own, hosted by its rank 0: the agent's shared store
    # keeps what failed ranks published, which restarted ones would read (pytorch#135712)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _own_signal_handlers():
    """The agent replaces the handlers of HANDLED_SIGNALS while it runs; put ours back after. (Off the
    main thread the agent leaves them alone, and Python allows no change there.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {name: signal.getsignal(getattr(signal, name)) for name in HANDLED_SIGNALS if hasattr(signal, name)}
    try:
        yield
    finally:
        for name, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)


class _Relay(threading.Thread):
    """Calls training callbacks in the launching process from what rank 0 writes: on_train_start
    once the run folder exists, on_epoch_end per new metrics.csv row, on_train_end at the end.
    A callback that raises stops the ranks (SIGTERM to this process, which the agent handles by
    stopping them) and its exception is re-raised by train_processes."""

    POLL_S = 0.5

    def __init__(self, cfg: Config, run_id: str, resume_dir: Path | None, callbacks: list):
        super().__init__(daemon=True, name="callback-relay")
        self.cfg, self.run_id, self.callbacks = cfg, run_id, callbacks
        self.run_dir = Path(resume_dir) if resume_dir is not None else None
        self.seen = len(_rows(self.run_dir)) if self.run_dir is not None else 0
        self.started = False
        self.error: BaseException | None = None
        self.history: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.POLL_S):
            try:
                self.poll()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def poll(self) -> None:
        if self.run_dir is None:
            self.run_dir = find_elastic_run(self.cfg.runs_dir, self.run_id)
            if self.run_dir is None:
                return
        if not self.started:
            self.started = True
            self._notify("on_train_start", None, self.cfg, self.run_dir)
        rows = _rows(self.run_dir)
        for row in rows[self.seen:]:
            self.history.append(row)
            self._notify("on_epoch_end", row, None)
        self.seen = max(self.seen, len(rows))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def finish(self, run_dir: Path) -> None:
        """After the ranks finished: the rows not relayed yet, then on_train_end."""
        self.run_dir = self.run_dir or run_dir
        self.poll()
        self._notify("on_train_end", self.history, self.run_dir)

    def _notify(self, event: str, *args) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(*args)


def _rows(run_dir: Path) -> list[dict]:
    """metrics.csv's rows with numbers as numbers (rank 0 replaces the file whole, atomically)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
