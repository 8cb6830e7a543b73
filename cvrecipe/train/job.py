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
"""
from __future__ import annotations

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
from cvrecipe.train.launch import has_results, train_processes
from cvrecipe.train.loop import fit
from cvrecipe.train.sanity import check_before_training


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_run_dir(cfg: Config) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when that folder already holds a run (nothing is overwritten)."""
    base = cfg.run_dir
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    if resume_dir is not None:
        cfg = load_run_config(resume_dir)
    nproc = nproc or cfg.train.nproc
    if nproc > 1 and not distributed.launched_by_torchrun():
        try:
            return train_processes(cfg, nproc, resume_dir, console, callbacks, max_restarts, keep_failed)
        except BaseException as err:
            _notify_failed(callbacks, err)
            raise
    with distributed.join(cfg.train) as world:
        return _train_rank(cfg, resume_dir, console if world.is_main else Console(quiet=True),
                           callbacks if world.is_main else None, world, keep_failed)


def _train_rank(cfg: Config, resume_dir: Path | None, console: Console, callbacks: list | None,
                world: World, keep_failed: bool) -> Path:
    resume = resume_dir is not None
    if resume:  # rank 0 checks last.ckpt (or clears a start that never reached one) before any data is read
        resume = world.from_main(_resumable(Path(resume_dir), console) if world.is_main else None)
    elif distributed.restarted():  # torchrun restarted failed ranks: go on from last.ckpt
        resume_dir = world.from_main(_restarted_run(cfg) if world.is_main else None)
        if resume_dir is not None:
            cfg, resume = load_run_config(resume_dir), True
    new = resume_dir is None
    device = world.device(cfg.train.device)
    ds = load_dataset(cfg.data, seed=cfg.train.seed, device=device)
    run_dir = resume_dir
    if new:  # rank 0 checks, makes the folder and tells the others where it is
        run_dir = world.from_main(_new_run(cfg, ds, console, world) if world.is_main else None)
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


def _new_run(cfg: Config, ds: ImageDataset, console: Console, world: World) -> str:
    sanity = check_before_training(cfg, ds, console)  # a fail raises here
    run_dir = new_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    info = {**run_info(cfg, ds), "sanity": sanity, "processes": world.size}
    if distributed.elastic_run_id() is not None:
        info[distributed.ELASTIC_KEY] = distributed.elastic_run_id()
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return str(run_dir)


def _restarted_run(cfg: Config) -> str | None:
    """The folder of the run this torchrun job started before its ranks were restarted, when it has
    a checkpoint to go on from (else None: the run starts again, in a new folder)."""
    found = distributed.find_elastic_run(cfg.runs_dir, distributed.elastic_run_id())
    return str(found) if found is not None and (found / "last.ckpt").is_file() else None
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
