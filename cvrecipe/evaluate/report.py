"""`cvrecipe report RUN`: one self-contained HTML page about a trained run, plus its plots as PNGs.

RUN/report.html  header (data, model, parameters, FLOPs, training time, hardware, config),
                 training curves, confusion matrix, per-class precision/recall/F1, calibration
                 (ECE, reliability diagram, temperature scaling), top losses, Grad-CAM, filters
RUN/plots/*.png  every figure of the page, also as a file

With `calibrate=True` a temperature is fitted on the validation split and stored in the
checkpoint's metadata (`read_metadata(best.safetensors)[1]["calibration"]`), so whatever loads
the weights can load the temperature with them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from cvrecipe import pages
from cvrecipe.config import to_dict
from cvrecipe.data import load_dataset
from cvrecipe.device import resolve_device
from cvrecipe.evaluate.calibration import calibration_summary, fit_temperature
from cvrecipe.evaluate.explain import first_layer_filters, grad_cam, overlay
from cvrecipe.evaluate.metrics import classification_metrics
from cvrecipe.evaluate.predict import predict_logits
from cvrecipe.train.checkpoint import load_model, read_metadata, save_weights

TOP_LOSSES = 16  # most confidently wrong images shown
CAM_SAMPLES = 8  # Grad-CAM images per row (correct, wrong)


def write_report(run_dir: Path, calibrate: bool = False, console: Console | None = None,
                 eval_logits: torch.Tensor | None = None) -> Path:
    """Evaluate RUN's best checkpoint on its held-out split and write RUN/report.html + RUN/plots/.

    `eval_logits` (N, K): that checkpoint's logits on that split with the run's TTA, as `cvrecipe run`
    has them from its evaluation; without them they are computed here."""
    from cvrecipe.runs import load_run_config

    console = console or Console(soft_wrap=True)
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    checkpoint = run_dir / "best.safetensors"
    device = resolve_device(cfg.train.device)
    model = load_model(checkpoint, device)
    ds = load_dataset(dataclasses.replace(cfg.data, subset=None), seed=cfg.train.seed)
    split, part = ds.eval_split
    if eval_logits is None:
        eval_logits = predict_logits(model, part.x, 512, device, channels_last=cfg.train.channels_last,
                                     tta=cfg.eval.tta, tta_mirror=cfg.augment.hflip and ds.hflip_ok)
    elif eval_logits.shape != (len(part.y), model.meta["num_classes"]):
        raise ValueError(f"eval_logits have shape {tuple(eval_logits.shape)}; the {split} split needs "
                         f"({len(part.y)}, {model.meta['num_classes']})")
    logits, y = eval_logits, torch.from_numpy(part.y)
    metrics = classification_metrics(logits, y, model.meta["class_names"])
    temperature = _temperature(model, checkpoint, ds, device, calibrate, console)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    facts = {"split": split, "metrics": metrics, "calibration": calibration_summary(logits, y, temperature),
             "history": read_history(run_dir / "metrics.csv"), "model": model_facts(model)}
    body = [_header(run_dir, cfg, ds, facts), _curves(facts["history"], plots), _confusion(metrics, plots),
            _calibration(facts["calibration"], split, plots),
            _top_losses(part.x, logits, y, model.meta["class_names"], plots),
            _grad_cam(model, part.x, logits, y, model.meta["class_names"], plots), _filters(model, plots)]
    title = f"Run report: {run_dir.name}"
    subtitle = f"{ds.name} [{split}] · {model.meta['name']} · written {time.strftime('%Y-%m-%d %H:%M')}"
    (run_dir / "report.html").write_text(pages.page(title, subtitle, body))
    console.print(f"report: {run_dir / 'report.html'} ({time.perf_counter() - t0:.1f}s)")
    return run_dir / "report.html"


def _temperature(model, checkpoint: Path, ds, device, calibrate: bool, console: Console) -> float | None:
    """The stored temperature, or (calibrate=True) a new one fitted on val and stored in the checkpoint."""
    _, extra = read_metadata(checkpoint)
    if not calibrate:
        return extra.get("calibration", {}).get("temperature")
    if len(ds.val) == 0:
        raise ValueError(f"--calibrate fits a temperature on the val split, and {checkpoint.parent} was trained "
                         "with data.val_fraction=0 (no val split)")
    logits = predict_logits(model, ds.val.x, 512, device)
    y = torch.from_numpy(ds.val.y)
    temperature = fit_temperature(logits, y)
    summary = calibration_summary(logits, y, temperature)
    extra["calibration"] = {"temperature": temperature, "fitted_on": "val", "val_images": len(y),
                            "val_nll": summary["nll"], "val_nll_scaled": summary["nll_scaled"]}
    save_weights(model, checkpoint, extra)
    console.print(f"calibration: temperature {temperature:.3f} fitted on {len(y)} val images "
                  f"(val NLL {summary['nll']:.4f} → {summary['nll_scaled']:.4f}); stored in {checkpoint}")
    return temperature


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


def _header(run_dir: Path, cfg, ds, facts: dict) -> str:
    m, history, cal = facts["metrics"], facts["history"], facts["calibration"]
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    train_s = sum(r.get("epoch_time_s", 0) for r in history)
    hardware = info.get("hardware") or {"device": info.get("device", "?")}
    cards = [(f"{m['accuracy']:.4f}", f"accuracy [{facts['split']}]"), (f"{m['macro_f1']:.4f}", "macro F1"),
             *([(f"{m['top5_accuracy']:.4f}", "top-5 accuracy")] if "top5_accuracy" in m else []),
             (f"{cal['ece']:.4f}", "ECE (15 bins)"), (_si(facts["model"]["parameters"]), "parameters"),
             (_si(facts["model"]["flops_per_image"]), "FLOPs / image"), (_duration(train_s), "training time"),
             (str(len(history)), "epochs")]
    rows = [["dataset", f"{ds.name}: {len(ds.classes)} classes, train {len(ds.train)}, val {len(ds.val)}, "
                        f"{facts['split']} {m['num_images']}, image (C, H, W) {ds.image_shape}"],
            ["model", f"{cfg.model.name} ({facts['model']['parameters']:,} parameters, "
                      f"{facts['model']['flops_per_image']:,} FLOPs per image forward)"],
            ["training", f"{len(history)} epochs in {train_s:.1f}s"
                         + (f", {history[-1]['images_per_s']:,.0f} images/s" if history else "")],
            ["hardware", ", ".join(f"{k} {v}" for k, v in hardware.items()) + f" · host {info.get('host', '?')}"],
            ["software", f"python {info.get('python', platform.python_version())}, "
                         f"torch {info.get('torch', torch.__version__)}"],
            ["seed / commit", f"{info.get('seed', cfg.train.seed)} / {info.get('git_commit', '?')}"],
            ["run folder", str(run_dir)]]
    sanity = info.get("sanity", [])
    rows += [[f"sanity: {s['name']}", f"{s['status']}: {s['message']}"] for s in sanity]
    status = [""] * (len(rows) - len(sanity)) + [{"pass": "good", "warn": "warn", "fail": "bad"}[s["status"]]
                                                 for s in sanity]
    config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return (pages.cards(cards) + pages.table(None, rows, status, left=2)
            + f"<details><summary>config</summary><pre>{pages.esc(config)}</pre></details>")


def _curves(history: list[dict], plots: Path) -> str:
    if not history:
        return "<h2>Training curves</h2><p>no metrics.csv in this run.</p>"
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train", ms=3)
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="validation", ms=3)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(epochs, [r["lr"] for r in history], "o-", color="C2", ms=3)
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "curves.png")
    return "<h2>Training curves</h2>" + pages.img(png, "training curves")


def _confusion(metrics: dict, plots: Path) -> str:
    cm = np.array(metrics["confusion_matrix"], dtype=np.float64)
    names = [c["class"] for c in metrics["per_class"]]
    normalised = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(names)
    side = min(7.5, 1.8 + 0.5 * k)  # inches per matrix
    fig = Figure(figsize=(2 * side + 0.5, side))
    for ax, matrix, title, fmt in zip(fig.subplots(1, 2), (cm, normalised), ("counts", "row-normalised (recall)"),
                                      ("{:.0f}", "{:.2f}")):
        ax.imshow(matrix / max(matrix.max(), 1e-12), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    dark = matrix[i, j] / max(matrix.max(), 1e-12) > 0.6
                    ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "confusion.png")
    rows = [[c["class"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
            for c in metrics["per_class"]]
    rows.append(["macro average", f"{metrics['macro_precision']:.4f}", f"{metrics['macro_recall']:.4f}",
                 f"{metrics['macro_f1']:.4f}", metrics["num_images"]])
    worst = min(range(len(rows) - 1), key=lambda i: metrics["per_class"][i]["f1"])
    classes = ["bad" if i == worst else "" for i in range(len(rows))]
    return ("<h2>Confusion matrix</h2>" + pages.img(png, "confusion matrix")
            + "<h2>Per-class precision, recall, F1</h2><p class='note'>lowest F1 highlighted</p>"
            + pages.table(["class", "precision", "recall", "F1", "support"], rows, classes))


def _calibration(cal: dict, split: str, plots: Path) -> str:
    curves = [("before", cal["reliability"])]
    if "temperature" in cal:
        curves.append((f"after temperature scaling (T = {cal['temperature']:.3f})", cal["reliability_scaled"]))
    fig = Figure(figsize=(5 * len(curves), 4.2))
    for ax, (title, rel) in zip(np.atleast_1d(fig.subplots(1, len(curves))), curves):
        centres = (np.array(rel["edges"][:-1]) + np.array(rel["edges"][1:])) / 2
        filled = np.array(rel["count"]) > 0
        ax.bar(centres[filled], np.array(rel["accuracy"])[filled], width=1 / rel["bins"], edgecolor="k",
               alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.plot(np.array(rel["confidence"])[filled], np.array(rel["accuracy"])[filled], "o", color="C3", ms=3,
                label="(mean confidence, accuracy)")
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE {rel['ece']:.4f}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "reliability.png")
    rows = [["before", f"{cal['ece']:.4f}", f"{cal['nll']:.4f}"]]
    note = "no temperature fitted yet: run `cvrecipe report RUN --calibrate` to fit one on the validation split"
    if "temperature" in cal:
        rows.append([f"T = {cal['temperature']:.3f}", f"{cal['ece_scaled']:.4f}", f"{cal['nll_scaled']:.4f}"])
        note = ("temperature fitted on the validation split, stored in best.safetensors' metadata"
                + (" — this table is on that same split, so it flatters the scaling" if split == "val" else ""))
    return (f"<h2>Calibration [{split}]</h2>" + pages.img(png, "reliability diagram")
            + pages.table(["", "ECE", "NLL"], rows) + f"<p class='note'>{pages.esc(note)}</p>")


def _image_grid(images: np.ndarray, titles: list[str], columns: int, path: Path, colours: list[str] | None = None):
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(1.6 * columns, 1.85 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(images):
            image = images[i]
            ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_title(titles[i], fontsize=7, color=(colours or ["black"] * len(images))[i])
    fig.tight_layout()
    return pages.figure_png(fig, path)


def _top_losses(x: np.ndarray, logits: torch.Tensor, y: torch.Tensor, names: list[str], plots: Path) -> str:
    probs = logits.softmax(1)
    loss = -probs.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()
    wrong = torch.nonzero(logits.argmax(1) != y)[:, 0]
    if len(wrong) == 0:
        return "<h2>Top losses</h2><p>no wrong predictions.</p>"
    order = wrong[loss[wrong].argsort(descending=True)][:TOP_LOSSES]
    pred = probs[order].argmax(1)
    titles = [f"true {names[y[i]]}\npred {names[p]} {probs[i, p]:.2f}" for i, p in zip(order.tolist(), pred.tolist())]
    png = _image_grid(x[order.numpy()], titles, 8, plots / "top_losses.png")
    return ("<h2>Top losses</h2><p class='note'>the most confidently wrong held-out images: true label, predicted "
            f"label and its probability ({len(wrong)} wrong in all)</p>" + pages.img(png, "top losses"))


def _grad_cam(model, x: np.ndarray, logits: torch.Tensor, y: torch.Tensor, names: list[str], plots: Path) -> str:
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return "<h2>Grad-CAM</h2><p class='note'>not shown: the model has no convolutional feature maps</p>"
    pred = logits.argmax(1)
    rng = np.random.default_rng(0)
    picks = []
    for mask in (pred == y, pred != y):
        idx = torch.nonzero(mask)[:, 0].numpy()
        picks.append(np.sort(rng.choice(idx, min(CAM_SAMPLES, len(idx)), replace=False)) if len(idx) else idx)
    device = next(model.parameters()).device
    images, titles, colours = [], [], []
    for label, idx in zip(("right", "wrong"), picks):
        if len(idx) == 0:
            continue
        cams = grad_cam(model, torch.from_numpy(x[idx]).to(device))  # for the predicted class
        shown = overlay(x[idx], cams)
        for i, image, cam_image in zip(idx.tolist(), x[idx], shown):
            images += [np.repeat(image, 3, 0) if image.shape[0] == 1 else image, cam_image]
            titles += [f"true {names[y[i]]}", f"pred {names[pred[i]]}"]
            colours += ["black", "green" if label == "right" else "red"]
    if not images:
        return ""
    png = _image_grid(np.stack(images), titles, 8, plots / "gradcam.png", colours)
    return ("<h2>Grad-CAM</h2><p class='note'>where the evidence for the predicted class lies in the last feature "
            "map (red = most): pairs of image and heatmap, correct predictions (green) then wrong ones (red)</p>"
            + pages.img(png, "Grad-CAM overlays"))


def _filters(model, plots: Path) -> str:
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return "<h2>First-layer filters</h2><p class='note'>not shown: the model has no convolution</p>"
    filters = first_layer_filters(model)  # (K, C, kh, kw) uint8
    scale = pages.display_scale(filters.shape[-1], 40)
    png = pages.array_png(pages.tile(filters, 16, gap=1), scale)
    (plots / "filters.png").write_bytes(png)
    return (f"<h2>First-layer filters</h2><p class='note'>{len(filters)} kernels of "
            f"{filters.shape[-2]}×{filters.shape[-1]}, each stretched to its own range</p>"
            + pages.img(png, "first-layer filters", pixelated=True, cls="thumb"))
