"""Run folders and the three jobs that use them: train, evaluate, predict.

runs/<name>/  config.yaml  run.json  metrics.csv  events.*  best.safetensors  last.ckpt
              skipped_files.txt (when any input file was unreadable)  eval.json
              report.html  plots/*.png  mlflow.json (when tracked with MLflow)
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cvrecipe.config import Config, from_dict, load_config, save_config
from cvrecipe.data import ImageDataset, load_dataset
from cvrecipe.device import resolve_device
from cvrecipe.evaluate.metrics import classification_metrics
from cvrecipe.evaluate.predict import expand_image_paths, load_images_for_model, predict_logits, topk
from cvrecipe.sanity import check_before_training
from cvrecipe.train.checkpoint import load_model, read_metadata
from cvrecipe.train.loop import fit


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


def load_run_config(run_dir: Path) -> Config:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()))


def train(cfg: Config, resume_dir: Path | None = None, console: Console | None = None,
          callbacks: list | None = None) -> Path:
    """Train per `cfg` in a new run folder, or continue the run in `resume_dir`. Returns the folder."""
    console = console or Console(soft_wrap=True)
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        cfg = load_run_config(run_dir)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    sanity = [] if resume_dir is not None else check_before_training(cfg, ds, console)  # a fail raises here
    if resume_dir is None:
        run_dir = new_run_dir(cfg)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({**_run_info(cfg, ds), "sanity": sanity}, indent=1))
    if cfg.track.mlflow:
        from cvrecipe.tracking import MlflowLogger

        callbacks = [*(callbacks or []), MlflowLogger(cfg.track)]
    if ds.skipped:
        (run_dir / "skipped_files.txt").write_text("".join(f"{name}\t{reason}\n" for name, reason in ds.skipped))
        console.print(f"[yellow]skipped {len(ds.skipped)} unreadable file(s); listed in {run_dir / 'skipped_files.txt'}")
    console.print(f"run folder: {run_dir}")
    console.print(f"data: {ds.name}  train {len(ds.train)}  val {len(ds.val)}  "
                  f"{'test ' + str(len(ds.test)) if ds.test is not None else ''}  classes {len(ds.classes)}  "
                  f"image {ds.image_shape}")
    fit(cfg, ds, run_dir, resume=resume_dir is not None, console=console, callbacks=callbacks)
    return run_dir


def _run_info(cfg: Config, ds: ImageDataset) -> dict:
    return {"seed": cfg.train.seed, "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "device": str(resolve_device(cfg.train.device)), "host": platform.node(),
            "hardware": _hardware(resolve_device(cfg.train.device)),
            "dataset": {"name": ds.name, "classes": ds.classes, "train": len(ds.train), "val": len(ds.val),
                        "test": len(ds.test) if ds.test is not None else 0, "skipped_files": len(ds.skipped)}}


def _hardware(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    info = {"cpu": names[0] if names else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def evaluate(run_dir: Path, data: str | None = None, split: str | None = None,
             console: Console | None = None) -> dict:
    """Evaluate the run's best checkpoint on its held-out split (or another dataset); writes eval.json."""
    return _evaluate(run_dir, data, split, console)[0]


def _evaluate(run_dir: Path, data: str | None = None, split: str | None = None,
              console: Console | None = None) -> tuple[dict, torch.Tensor]:
    """evaluate(), also returning the logits (N, K) it scored, so that the report need not compute
    them again (with TTA 2 that pass is 6 forward passes over the split)."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    device = resolve_device(cfg.train.device)
    model = load_model(run_dir / "best.safetensors", device)
    meta = model.meta
    data_cfg = dataclasses.replace(cfg.data, subset=None)
    if data:  # another dataset: bring its images to the model's input shape
        height, width = meta["input_size"]
        data_cfg = dataclasses.replace(data_cfg, name=data, channels=meta["in_channels"],
                                       image_size=height if height == width else None)
    ds = load_dataset(data_cfg, seed=cfg.train.seed)
    split_name, part = (split, getattr(ds, split)) if split else ds.eval_split
    if list(ds.classes) != list(meta["class_names"]):
        raise ValueError(f"dataset {ds.name} has classes {ds.classes}, the model was trained on {meta['class_names']}")
    logits = predict_logits(model, part.x, 512, device, channels_last=cfg.train.channels_last, tta=cfg.eval.tta,
                            tta_mirror=cfg.augment.hflip and ds.hflip_ok)
    result = classification_metrics(logits, torch.from_numpy(part.y), meta["class_names"])
    _, extra = read_metadata(run_dir / "best.safetensors")
    result = {"dataset": ds.name, "split": split_name, "checkpoint_epoch": extra.get("epoch"), "tta": cfg.eval.tta,
              **result}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    console.print(metrics_table(result))
    return result, logits


def metrics_table(result: dict) -> Table:
    table = Table(title=f"{result['dataset']} [{result['split']}]: accuracy {result['accuracy']:.4f}"
                        + (f", top-5 {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else "")
                        + f", macro F1 {result['macro_f1']:.4f} ({result['num_images']} images)")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in result["per_class"]:
        table.add_row(row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      str(row["support"]))
    table.add_row("macro avg", f"{result['macro_precision']:.4f}", f"{result['macro_recall']:.4f}",
                  f"{result['macro_f1']:.4f}", str(result["num_images"]), style="bold")
    return table


def predict(run_dir: Path, paths: list[str], k: int = 5) -> list[dict]:
    """Top-k classes for image files (folders expanded). Unreadable files are reported, not fatal."""
    model = load_model(run_dir, "cpu")
    files = expand_image_paths(paths)
    x, good, skipped = load_images_for_model(files, model.meta)
    results = [{"file": name, "error": reason} for name, reason in skipped]
    if len(good):
        ranked = topk(predict_logits(model, x), model.meta["class_names"], k)
        results += [{"file": str(p), "top": [{"class": c, "probability": pr} for c, pr in r]}
                    for p, r in zip(good, ranked)]
    return results


def run(recipe: str | None, overrides: list[str], console: Console | None = None) -> Path:
    """The main job: train the recipe, then evaluate the best checkpoint on the held-out split."""
    console = console or Console(soft_wrap=True)
    cfg = load_config(recipe, overrides)
    run_dir = train(cfg, console=console)
    _, logits = _evaluate(run_dir, console=console)
    report(run_dir, console=console, eval_logits=logits)  # the same predictions, not computed twice
    console.print(f"done: {run_dir}")
    return run_dir


def report(run_dir: Path, calibrate: bool = False, console: Console | None = None,
           eval_logits: torch.Tensor | None = None) -> Path:
    """RUN/report.html + RUN/plots/; attached to the run's MLflow run when it was tracked.
    `eval_logits`: the best checkpoint's logits on the held-out split, when the caller has them."""
    from cvrecipe.evaluate.report import write_report
    from cvrecipe.tracking import log_report

    path = write_report(run_dir, calibrate, console, eval_logits)
    log_report(run_dir)
    return path
