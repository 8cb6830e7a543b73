"""The train job: a run folder, the sanity checks, then the loop.

runs/<name>/  config.yaml  run.json  metrics.csv  events.*  best.safetensors  last.ckpt
              skipped_files.txt (when any input file was unreadable)  mlflow.json (when tracked)
(evaluation adds eval.json, report.html and plots/: see cvrecipe/evaluate/job.py)

The folder is created only once the config, the data and the sanity checks have passed, and a
training that fails before its first checkpoint removes it again: a failed start leaves nothing
behind. A run killed before its first checkpoint (its folder has config.yaml but no last.ckpt)
is started again from its saved config by `--resume`.
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
from cvrecipe.data import ImageDataset, load_dataset
from cvrecipe.device import resolve_device
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
          callbacks: list | None = None, keep_failed: bool = False) -> Path:
    """Train per `cfg` in a new run folder, or continue the run in `resume_dir`. Returns the folder.
    The folder is created only once the data has loaded and the sanity checks have passed. A new run
    that fails before its first epoch's results is removed again, unless `keep_failed` (a tuning trial
    keeps its folder so that its trial.json says how it failed)."""
    console = console or Console(soft_wrap=True)
    resume = resume_dir is not None
    if resume:
        run_dir = Path(resume_dir)
        cfg = load_run_config(run_dir)
        resume = _resumable(run_dir, console)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    sanity = [] if resume_dir is not None else check_before_training(cfg, ds, console)  # a fail raises here
    if resume_dir is None:
        run_dir = new_run_dir(cfg)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({**run_info(cfg, ds), "sanity": sanity}, indent=1))
    if cfg.track.mlflow:
        from cvrecipe.train.tracking import MlflowLogger

        callbacks = [*(callbacks or []), MlflowLogger(cfg.track)]
    if ds.skipped:
        (run_dir / "skipped_files.txt").write_text("".join(f"{name}\t{reason}\n" for name, reason in ds.skipped))
        console.print(f"[yellow]skipped {len(ds.skipped)} unreadable file(s); listed in {run_dir / 'skipped_files.txt'}")
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {ds.name}  train {len(ds.train)}  val {len(ds.val)}  "
                  f"{'test ' + str(len(ds.test)) if ds.test is not None else ''}  classes {len(ds.classes)}  "
                  f"image {ds.image_shape}")
    try:
        fit(cfg, ds, run_dir, resume=resume, console=console, callbacks=callbacks)
    except BaseException as err:
        for callback in callbacks or []:  # e.g. the MLflow run is marked FAILED with the error
            if hasattr(callback, "on_train_failed"):
                callback.on_train_failed(err)
        if resume_dir is None and not keep_failed and isinstance(err, Exception) and not _has_results(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            console.print(f"removed {run_dir}: the run failed before its first epoch ended")
        raise
    return run_dir


def _has_results(run_dir: Path) -> bool:
    """Did the run get as far as an epoch's metrics or a checkpoint? (Then its folder is kept, e.g.
    for a run stopped after epoch 1, or a tuning trial pruned there.)"""
    return any((run_dir / name).is_file() for name in ("last.ckpt", "best.safetensors", "metrics.csv"))


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
                        "test": len(ds.test) if ds.test is not None else 0, "skipped_files": len(ds.skipped)}}


def hardware(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    info = {"cpu": names[0] if names else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
