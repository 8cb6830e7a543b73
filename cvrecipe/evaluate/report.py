"""`cvrecipe report RUN`: one self-contained HTML page about a trained run, plus its plots as PNGs.

RUN/report.html  header (summary cards, data, model, parameters, FLOPs, training time, hardware,
                 sanity checks, config), training curves, then the task's own sections (for a
                 classifier: confusion matrix, per-class P/R/F1, calibration, top losses,
                 Grad-CAM, filters: classification_report.py)
RUN/plots/*.png  every figure of the page, also as a file
"""
from __future__ import annotations

import csv
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from cvrecipe import pages
from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.config import load_run_config, to_dict
from cvrecipe.data import load_dataset
from cvrecipe.device import resolve_device
from cvrecipe.evaluate.context import ReportContext
from cvrecipe.tasks import entry, get_task, resolve, spec_of, task_of

CURVE_TITLES = {"acc": "accuracy", "pixel_acc": "pixel accuracy", "miou": "mIoU", "dice": "Dice", "map50": "mAP@.5"}


def write_report(run_dir: Path, calibrate: bool = False, console: Console | None = None,
                 eval_logits: torch.Tensor | None = None) -> Path:
    """Evaluate RUN's best checkpoint on its held-out split and write RUN/report.html + RUN/plots/.

    `eval_logits`: that checkpoint's outputs on that split with the run's TTA, as `cvrecipe run`
    has them from its evaluation; without them they are computed here."""
    console = console or Console(soft_wrap=True)
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    checkpoint = run_dir / "best.safetensors"
    device = resolve_device(cfg.train.device)
    model = load_model(checkpoint, device)
    task = get_task(task_of(model.meta), cfg)
    ds = load_dataset(dataclasses.replace(cfg.data, subset=None), seed=cfg.train.seed)
    split, part = ds.eval_split
    if eval_logits is None:
        eval_logits = predict_logits(model, part.x, 512, device, channels_last=cfg.train.channels_last,
                                     tta=cfg.eval.tta, tta_mirror=cfg.augment.hflip and ds.hflip_ok)
    elif not spec_of(task.name).outputs_fit(tuple(eval_logits.shape), len(part.y), model.meta["num_classes"]):
        raise ValueError(f"eval_logits have shape {tuple(eval_logits.shape)}, not what a {task.name} model gives "
                         f"for the {len(part.y)} images of the {split} split")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    metrics = task.evaluate(eval_logits, task.batch_targets(part.y, 0, len(part.y)), model.meta["class_names"])
    ctx = ReportContext(run_dir, cfg, ds, split, part, model, checkpoint, eval_logits, metrics, device, plots,
                        calibrate, console)
    cards, sections = resolve(entry(task.name).report).sections(ctx)  # the task names its sections' module
    history = read_history(run_dir / "metrics.csv")
    body = [_header(ctx, cards, history, model_facts(model)), _curves(history, task.metrics, plots), *sections]
    title = f"Run report: {run_dir.name}"
    subtitle = f"{ds.name} [{split}] · {model.meta['name']} · written {time.strftime('%Y-%m-%d %H:%M')}"
    (run_dir / "report.html").write_text(pages.page(title, subtitle, body))
    console.print(f"report: {run_dir / 'report.html'} ({time.perf_counter() - t0:.1f}s)")
    return run_dir / "report.html"


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def model_facts(model: torch.nn.Module) -> dict:
    """Parameter count and forward FLOPs for one image (counted by torch's FlopCounterMode)."""
    c, (h, w) = model.meta["in_channels"], model.meta["input_size"]
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, c, h, w, dtype=torch.uint8, device=device))
    return {"parameters": sum(p.numel() for p in model.parameters()), "flops_per_image": counter.get_total_flops()}


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _header(ctx: ReportContext, task_cards: list[tuple[str, str]], history: list[dict], facts: dict) -> str:
    run_dir, cfg, ds = ctx.run_dir, ctx.cfg, ctx.ds
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    train_s = sum(r.get("epoch_time_s", 0) for r in history)
    hardware = info.get("hardware") or {"device": info.get("device", "?")}
    cards = [*task_cards, (_si(facts["parameters"]), "parameters"), (_si(facts["flops_per_image"]), "FLOPs / image"),
             (_duration(train_s), "training time"), (str(len(history)), "epochs")]
    rows = [["dataset", f"{ds.name}: {len(ds.classes)} classes, train {len(ds.train)}, val {len(ds.val)}, "
                        f"{ctx.split} {len(ctx.part)}, image (C, H, W) {ds.image_shape}"],
            ["model", f"{cfg.model.name} ({facts['parameters']:,} parameters, "
                      f"{facts['flops_per_image']:,} FLOPs per image forward)"],
            ["training", f"{len(history)} epochs in {train_s:.1f}s"
                         + (f", {history[-1]['images_per_s']:,.0f} images/s" if history else "")],
            ["hardware", ", ".join(f"{k} {v}" for k, v in hardware.items()) + f" · host {info.get('host', '?')}"],
            ["software", f"python {info.get('python', platform.python_version())}, "
                         f"torch {info.get('torch', torch.__version__)}"],
            ["seed / commit", f"{info.get('seed', cfg.train.seed)} / {info.get('git_commit', '?')}"],
            ["run folder", str(run_dir)]]
    sanity = info.get("sanity", [])
    rows += [[f"sanity: {s['name']}", f"{s['status']}: {s['message']}"] for s in sanity]
    status = [""] * (len(rows) - len(sanity)) + [{"pass": "good", "warn": "warn", "fail": "bad"}.get(s["status"], "")
                                                 for s in sanity]
    config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return (pages.cards(cards) + pages.table(None, rows, status, left=2)
            + f"<details><summary>config</summary><pre>{pages.esc(config)}</pre></details>")


def _curves(history: list[dict], metrics: tuple[str, ...], plots: Path) -> str:
    """One panel per metric (train and validation), and the learning rate."""
    if not history:
        return "<h2>Training curves</h2><p>no metrics.csv in this run.</p>"
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(4 * (len(metrics) + 1), 3.4))
    axes = fig.subplots(1, len(metrics) + 1)
    for ax, key in zip(axes, metrics):
        for split, label in (("train", "train"), ("val", "validation")):
            ax.plot(epochs, [r.get(f"{split}_{key}", float("nan")) for r in history], "o-", label=label, ms=3)
        ax.set_title(CURVE_TITLES.get(key, key))
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[-1].plot(epochs, [r["lr"] for r in history], "o-", color="C2", ms=3)
    axes[-1].set_title("learning rate (end of epoch)")
    axes[-1].set_xlabel("epoch")
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "curves.png")
    return "<h2>Training curves</h2>" + pages.img(png, "training curves")
