"""The segmentation sections of the run report: per-class IoU and Dice with the pixel confusion
matrix, overlays of image, ground truth, prediction, error map and per-pixel confidence, the worst
images, and confidence against accuracy over all pixels (in place of a classifier's Grad-CAM: where
the model is unsure is what a segmentation user looks at)."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from cvrecipe import pages
from cvrecipe.data.dataset import IGNORE
from cvrecipe.data.mask_images import class_colours, colour_mask, overlay_mask
from cvrecipe.evaluate.context import ReportContext

OVERLAYS = 4  # images shown with their overlays (the worst first)
WORST_LISTED = 10  # rows of the worst-images table
CONFIDENCE_BINS = 10


def sections(ctx: ReportContext) -> tuple[list[tuple[str, str]], list[str]]:
    """(summary cards, HTML sections) for a segmentation model's report."""
    m, names = ctx.metrics, ctx.model.meta["class_names"]
    colours = class_colours(len(names), ctx.ds.colours)
    probs = ctx.outputs.float().softmax(1)  # (N, K, H, W)
    confidence, pred = probs.max(1)
    masks = torch.from_numpy(ctx.part.y)
    cards = [(f"{m['pixel_accuracy']:.4f}", f"pixel accuracy [{ctx.split}]"),
             (f"{m['pixel_error']:.4f}", "pixel error"),
             (f"{m['miou']:.4f}", "mIoU"), (f"{m['mean_dice']:.4f}", "Dice (mean over classes)")]
    body = [_per_class(m, ctx.plots), _overlays(ctx, pred, confidence, colours, names),
            _worst(ctx, m), _confidence(confidence, pred, masks, ctx.plots)]
    return cards, body


def _per_class(m: dict, plots) -> str:
    rows = [[c["class"], _f(c["iou"]), _f(c["dice"]), f"{c['precision']:.4f}", f"{c['recall']:.4f}",
             f"{c['pixels']:,}", f"{c['predicted_pixels']:,}"] for c in m["per_class"]]
    rows.append(["mean", _f(m["miou"]), _f(m["mean_dice"]), "", "", f"{m['pixels']:,}", ""])
    scores = [c["iou"] if c["iou"] is not None else 1.0 for c in m["per_class"]]
    worst = int(np.argmin(scores))
    cm = np.array(m["confusion_matrix"], np.float64)
    k = len(cm)
    fig = Figure(figsize=(1.8 + 0.6 * k, 1.5 + 0.5 * k))
    ax = fig.subplots()
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    labels = [c["class"] for c in m["per_class"]]
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("pixels, row-normalised", fontsize=10)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{shares[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.6 else "black")
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "pixel_confusion.png")
    return ("<h2>Per-class IoU and Dice</h2><p class='note'>over all labelled pixels of the split (one confusion "
            "matrix, not a mean of per-image scores); lowest IoU highlighted</p>"
            + pages.table(["class", "IoU", "Dice", "precision", "recall", "pixels", "predicted"], rows,
                          ["bad" if i == worst else "" for i in range(len(rows))])
            + pages.img(png, "pixel confusion matrix"))


def _error_map(pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3, H, W): right pixels dark grey, wrong ones red, unlabelled white."""
    out = np.full((3, *mask.shape), 60, np.uint8)
    wrong = (pred != mask) & (mask != IGNORE)
    out[:, wrong] = np.array([230, 40, 40], np.uint8)[:, None]
    out[:, mask == IGNORE] = 255
    return out


def _overlays(ctx: ReportContext, pred: torch.Tensor, confidence: torch.Tensor, colours: np.ndarray,
              names: list[str]) -> str:
    order = [r["index"] for r in sorted(ctx.metrics["per_image"], key=lambda r: r["pixel_accuracy"])][:OVERLAYS]
    if not order:
        return ""
    titles = ["image", "ground truth", "prediction", "errors (red)", "confidence (max probability)"]
    fig = Figure(figsize=(3.0 * len(titles), 3.1 * len(order)))
    axes = np.atleast_2d(fig.subplots(len(order), len(titles)))
    for row, i in enumerate(order):
        image, mask, p = ctx.part.x[i], ctx.part.y[i], pred[i].numpy().astype(np.uint8)
        panels = [np.repeat(image, 3, 0) if image.shape[0] == 1 else image, overlay_mask(image, mask, colours),
                  overlay_mask(image, p, colours), _error_map(p, mask)]
        for ax, panel in zip(axes[row], panels):
            ax.imshow(panel.transpose(1, 2, 0), interpolation="nearest")
        shown = axes[row][4].imshow(confidence[i].numpy(), cmap="viridis", vmin=1 / len(names), vmax=1)
        fig.colorbar(shown, ax=axes[row][4], fraction=0.046, pad=0.02)
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            ax.set_title(titles[col] if row == 0 else "", fontsize=10)
        axes[row][0].set_title(f"{_name(ctx, i)}\npixel accuracy {ctx.metrics['per_image'][i]['pixel_accuracy']:.4f}",
                               fontsize=9)
    fig.tight_layout()
    png = pages.figure_png(fig, ctx.plots / "overlays.png")
    legend = " ".join(f"<span style='display:inline-block;width:12px;height:12px;background:rgb{tuple(c)}'></span> "
                      f"{pages.esc(n)}" for n, c in zip(names, colours.tolist()))
    return ("<h2>Overlays</h2><p class='note'>the held-out images with the lowest pixel accuracy: ground truth and "
            f"prediction over the image ({legend}), the wrong pixels, and the model's confidence per pixel (the "
            "largest class probability: low along uncertain boundaries)</p>" + pages.img(png, "segmentation overlays"))


def _name(ctx: ReportContext, i: int) -> str:
    return ctx.part.names[i] if ctx.part.names else f"{ctx.split} #{i}"


def _worst(ctx: ReportContext, m: dict) -> str:
    ranked = sorted(m["per_image"], key=lambda r: r["pixel_accuracy"])[:WORST_LISTED]
    rows = [[_name(ctx, r["index"]), f"{r['pixel_accuracy']:.4f}", f"{1 - r['pixel_accuracy']:.4f}", _f(r["miou"]),
             _f(r["dice"]), f"{r['pixels']:,}"] for r in ranked]
    return ("<h2>Worst images</h2><p class='note'>per image, lowest pixel accuracy first</p>"
            + pages.table(["image", "pixel accuracy", "pixel error", "mIoU", "Dice", "labelled pixels"], rows))


def _confidence(confidence: torch.Tensor, pred: torch.Tensor, masks: torch.Tensor, plots) -> str:
    """Pixel accuracy per confidence bin, and how many pixels fall in each: a reliability diagram."""
    keep = masks != IGNORE
    conf, right = confidence[keep].numpy(), (pred[keep] == masks[keep].long()).numpy()
    if conf.size == 0:
        return ""
    low = float(np.floor(conf.min() * CONFIDENCE_BINS) / CONFIDENCE_BINS)
    edges = np.linspace(low, 1.0, CONFIDENCE_BINS + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, CONFIDENCE_BINS - 1)
    counts = np.bincount(which, minlength=CONFIDENCE_BINS)
    hits = np.bincount(which, weights=right, minlength=CONFIDENCE_BINS)
    mean_conf = np.bincount(which, weights=conf, minlength=CONFIDENCE_BINS) / np.maximum(counts, 1)
    acc = hits / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(acc - mean_conf)) / counts.sum())
    fig = Figure(figsize=(10, 3.6))
    a1, a2 = fig.subplots(1, 2)
    filled = counts > 0
    a1.plot(mean_conf[filled], acc[filled], "o-", label="pixels")
    a1.plot([low, 1], [low, 1], "--", color="gray", label="perfect calibration")
    a1.set_xlabel("confidence (max probability)")
    a1.set_ylabel("pixel accuracy")
    a1.set_title(f"reliability over pixels (ECE {ece:.4f})", fontsize=10)
    a1.legend(fontsize=8)
    centres = (edges[:-1] + edges[1:]) / 2
    a2.bar(centres, counts - hits, width=np.diff(edges), color="C3", label="wrong")
    a2.bar(centres, hits, width=np.diff(edges), bottom=counts - hits, color="C0", alpha=0.6, label="right")
    a2.set_yscale("log")
    a2.set_xlabel("confidence")
    a2.set_ylabel("pixels")
    a2.legend(fontsize=8)
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "pixel_confidence.png")
    wrong_share = float((1 - right[conf < 0.75]).mean()) if (conf < 0.75).any() else float("nan")
    note = (f"{(conf < 0.75).mean():.1%} of labelled pixels have confidence below 0.75; "
            f"{_f(wrong_share)} of those are wrong")
    return ("<h2>Per-pixel confidence</h2><p class='note'>" + pages.esc(note) + "</p>"
            + pages.img(png, "pixel confidence"))


def _f(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
