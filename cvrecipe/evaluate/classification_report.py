"""The classification sections of the run report: confusion matrix, per-class precision/recall/F1,
calibration (ECE, reliability diagram, temperature scaling), top losses, Grad-CAM, first-layer filters.

Evaluation fits a temperature on held-out data and stores it in the checkpoint's metadata
(meta["temperature"], details in `read_metadata(best.safetensors)[1]["calibration"]`), where the
answers of predict, the server and the monitor take it from; `calibrate=True` fits it again on the
validation split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console

from cvrecipe import pages
from cvrecipe.artifact.checkpoint import read_metadata, save_weights
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.evaluate.calibration import calibration_summary, fit_temperature
from cvrecipe.evaluate.context import ReportContext
from cvrecipe.evaluate.explain import first_layer_filters, grad_cam, overlay

TOP_LOSSES = 16  # most confidently wrong images shown
CAM_SAMPLES = 8  # Grad-CAM images per row (correct, wrong)


def sections(ctx: ReportContext) -> tuple[list[tuple[str, str]], list[str]]:
    """(summary cards, HTML sections) for a classifier's report."""
    m, model, names = ctx.metrics, ctx.model, ctx.model.meta["class_names"]
    y = torch.from_numpy(ctx.part.y)
    temperature = _temperature(model, ctx.checkpoint, ctx.ds, ctx.device, ctx.calibrate, ctx.console)
    calibration = calibration_summary(ctx.outputs, y, temperature)
    calibration["fitted_on"] = read_metadata(ctx.checkpoint)[1].get("calibration", {}).get("fitted_on", "val")
    cards = [(f"{m['accuracy']:.4f}", f"accuracy [{ctx.split}]"), (f"{m['macro_f1']:.4f}", "macro F1"),
             *([(f"{m['top5_accuracy']:.4f}", "top-5 accuracy")] if "top5_accuracy" in m else []),
             (f"{calibration['ece']:.4f}", "ECE (15 bins)")]
    body = [_confusion(m, ctx.plots), _calibration(calibration, ctx.split, ctx.plots),
            _top_losses(ctx.part.x, ctx.outputs, y, names, ctx.plots),
            _grad_cam(model, ctx.part.x, ctx.outputs, y, names, ctx.plots), _filters(model, ctx.plots)]
    return cards, body


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
    model.meta["temperature"] = temperature  # what the answers are scaled by (tasks/answers/)
    save_weights(model, checkpoint, extra)
    console.print(f"calibration: temperature {temperature:.3f} fitted on {len(y)} val images "
                  f"(val NLL {summary['nll']:.4f} → {summary['nll_scaled']:.4f}); stored in {checkpoint}")
    return temperature


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
        note = (f"temperature fitted on {cal['fitted_on']}, stored in best.safetensors' metadata and applied to "
                f"every answer (predict, the server, the monitor)"
                + (" — this table includes the images it was fitted on, so it flatters the scaling"
                   if cal["fitted_on"].split(" ")[0] == split else ""))
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
