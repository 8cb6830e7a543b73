"""The train job: a run folder, the sanity checks, then the loop.

runs/<name>/  config.yaml  run.json  metrics.csv  events.*  best.safetensors  last.ckpt
              skipped_files.txt (when any input file was unreadable)  mlflow.json (when tracked)
(evaluation adds eval.json, report.html and plots/: see cvrecipe/evaluate/job.py)

The folder is created only once the config, the data and the sanity checks have passed, and a
training that fails before its first checkpoint removes it again: a failed start leaves nothing
behind. A run killed before its first checkpoint (its folder has config.yaml but no last.ckpt)
is started again from its saved config by `--resume`.

With train.nproc > 1 the job starts that many processes through torchrun's launcher (launch.py)
and each of them runs this job again as one rank; in a process torchrun started, rank 0 makes
the run folder, runs the sanity checks and writes everything, and the others train alongside.

One job writes in a run folder at a time: rank 0 (or the launcher of a resumed run) holds its
run.lock while it trains, and a second job in the same folder is refused (runlock.py). The ranks
die with the process that started them, so a killed launcher leaves no rank writing on.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.config import Config, load_run_config, save_config
from cvrecipe.data import ImageDataset, load_dataset, streamed
from cvrecipe.device import resolve_device
from cvrecipe.train import distributed
from cvrecipe.train.distributed import World
from cvrecipe.train.launch import die_with_launcher, has_results, train_processes
from cvrecipe.train.loop import fit
from cvrecipe.train.runlock import LOCK_NAME, RunLock, try_lock
from cvrecipe.train.sanity import check_before_training


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_run_dir(cfg: Config, owned: contextlib.ExitStack) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when that folder already holds a run or another job
    holds it (nothing is overwritten); its run.lock is held in `owned`. Two jobs starting the same
    name at once get two folders: the one that takes the lock second goes on to the next name."""
    base = cfg.run_dir
    path, n = base, 1
    while True:
        if not _holds_a_run(path):
            path.mkdir(parents=True, exist_ok=True)
            lock = try_lock(path)
            if lock is not None and not _holds_a_run(path):
                owned.callback(lock.release)  # held (taken by try_lock) until the run ends
                return path
            if lock is not None:  # filled by a job that held it a moment ago
                lock.release()
        n += 1
        path = base.with_name(f"{base.name}-{n}")


def _holds_a_run(path: Path) -> bool:
    return path.exists() and any(p.name != LOCK_NAME for p in path.iterdir())


def train(cfg: Config, resume_dir: Path | None = None, console: Console | None = None,
          callbacks: list | None = None, keep_failed: bool = False, nproc: int | None = None,
          max_restarts: int = 0) -> Path:
    """Train per `cfg` in a new run folder, or continue the run in `resume_dir`. Returns the folder.
    The folder is created only once the data has loaded and the sanity checks have passed. A new run
    that fails before its first epoch's results is removed again, unless `keep_failed` (a tuning trial
    keeps its folder so that its trial.json says how it failed).

    `nproc` (default: cfg.train.nproc, or the resumed run's): data-parallel processes to start on
    this machine, through torchrun's launcher; the call returns when they have all finished, and
    `callbacks` then run in this process, fed from the run's metrics.csv (their `model` is None).
    `max_restarts`: times torchrun's agent starts failed ranks again (they go on from last.ckpt).
    In a process torchrun started, this process is one rank of that job instead."""
    console = console or Console(soft_wrap=True)
    if distributed.launched_by_torchrun():
        die_with_launcher()  # a rank whose launcher was killed must not train on in the run folder
    if resume_dir is not None:
        cfg = load_run_config(resume_dir)
    nproc = nproc or cfg.train.nproc
    if nproc > 1 and not distributed.launched_by_torchrun():
        try:  # the launcher of a resumed run holds its folder for the ranks, across restarts
            with RunLock(resume_dir) if resume_dir is not None else contextlib.nullcontext():
                return train_processes(cfg, nproc, resume_dir, console, callbacks, max_restarts, keep_failed)
        except BaseException as err:
            _notify_failed(callbacks, err)
            raise
    with distributed.join(cfg.train) as world, contextlib.ExitStack() as owned:
        # `owned`: rank 0's hold on the run folder (run.lock), released when the run ends
        return _train_rank(cfg, resume_dir, console if world.is_main else Console(quiet=True),
                           callbacks if world.is_main else None, world, keep_failed, owned)


def _train_rank(cfg: Config, resume_dir: Path | None, console: Console, callbacks: list | None,
                world: World, keep_failed: bool, owned: contextlib.ExitStack) -> Path:
    resume = resume_dir is not None
    if resume:  # rank 0 takes the folder, then checks last.ckpt (or clears a start that never reached one)
        if world.is_main:
            owned.enter_context(RunLock(resume_dir))  # refused before anything in it is read or written
        resume = world.from_main(_resumable(Path(resume_dir), console) if world.is_main else None)
    elif distributed.restarted():  # torchrun restarted failed ranks: go on from last.ckpt
        resume_dir = world.from_main(_restarted_run(cfg, owned) if world.is_main else None)
        if resume_dir is not None:
            cfg, resume = load_run_config(resume_dir), True
    new = resume_dir is None
    device = world.device(cfg.train.device)
    ds = load_dataset(cfg.data, seed=cfg.train.seed, device=device)
    run_dir = resume_dir
    if new:  # rank 0 checks, makes the folder and tells the others where it is
        run_dir = world.from_main(_new_run(cfg, ds, console, world, owned) if world.is_main else None)
    run_dir = Path(run_dir)
    if cfg.track.mlflow and world.is_main:
        from cvrecipe.train.tracking import MlflowLogger

        callbacks = [*(callbacks or []), MlflowLogger(cfg.track)]
    if ds.skipped and world.is_main:
        (run_dir / "skipped_files.txt").write_text("".join(f"{name}\t{reason}\n" for name, reason in ds.skipped))
        console.print(f"[yellow]skipped {len(ds.skipped)} unreadable file(s); listed in {run_dir / 'skipped_files.txt'}")
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {ds.name}  train {len(ds.train)}  val {len(ds.val)}  "
                  f"{'test ' + str(len(ds.test)) if ds.test is not None else ''}  classes {len(ds.classes)}  "
                  f"image {ds.image_shape}{'  (streamed from disk)' if streamed(ds) else ''}"
                  f"{f'  ranks {world.size}' if world.size > 1 else ''}")
    try:
        fit(cfg, ds, run_dir, resume=resume, console=console, callbacks=callbacks, world=world)
    except BaseException as err:
        _notify_failed(callbacks, err)  # e.g. the MLflow run is marked FAILED with the error
        if new and world.is_main and not keep_failed and isinstance(err, Exception) and not has_results(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            console.print(f"removed {run_dir}: the run failed before its first epoch ended")
        raise
    return run_dir


def _notify_failed(callbacks: list | None, err: BaseException) -> None:
    for callback in callbacks or []:
        if hasattr(callback, "on_train_failed"):
            callback.on_train_failed(err)


def _new_run(cfg: Config, ds: ImageDataset, console: Console, world: World, owned: contextlib.ExitStack) -> str:
    sanity = check_before_training(cfg, ds, console)  # a fail raises here
    run_dir = new_run_dir(cfg, owned)
    save_config(cfg, run_dir / "config.yaml")
    info = {**run_info(cfg, ds), "sanity": sanity, "processes": world.size}
    if distributed.elastic_run_id() is not None:
        info[distributed.ELASTIC_KEY] = distributed.elastic_run_id()
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return str(run_dir)


def _restarted_run(cfg: Config, owned: contextlib.ExitStack) -> str | None:
    """The folder of the run this torchrun job started before its ranks were restarted, when it has
    a checkpoint to go on from (else None: the run starts again, in a new folder). Its run.lock is
    taken again (the failed rank 0 that held it is gone)."""
    found = distributed.find_elastic_run(cfg.runs_dir, distributed.elastic_run_id())
    if found is None or not (found / "last.ckpt").is_file():
        return None
    owned.enter_context(RunLock(found))
    return str(found)


def _resumable(run_dir: Path, console: Console) -> bool:
    """Whether `run_dir` continues from its last.ckpt (refused here, before any data is read, when
    the file is damaged or unsafe), or starts again: a run killed before its first checkpoint has
    only its config, which is all a run needs to start (the logs of the killed start are dropped)."""
    if (run_dir / "last.ckpt").is_file():
        load_resume(run_dir / "last.ckpt")
        return True
    console.print(f"{run_dir} has no last.ckpt (it stopped before its first checkpoint): starting it again from "
                  f"its saved config.yaml")
    for partial in [*run_dir.glob("events.out.tfevents.*"), run_dir / "metrics.csv", run_dir / "best.safetensors"]:
        partial.unlink(missing_ok=True)
    return False


def run_info(cfg: Config, ds: ImageDataset) -> dict:
    """run.json: what reproduces and describes the run besides its config."""
    device = resolve_device(cfg.train.device)
    return {"seed": cfg.train.seed, "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "host": platform.node(), "hardware": hardware(device),
            "dataset": {"name": ds.name, "classes": ds.classes, "train": len(ds.train), "val": len(ds.val),
                        "test": len(ds.test) if ds.test is not None else 0, "skipped_files": len(ds.skipped),
                        "streamed": streamed(ds)}}


def hardware(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    info = {"cpu": names[0] if names else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
