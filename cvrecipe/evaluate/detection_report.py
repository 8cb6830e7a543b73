"""The detection sections of the run report, all read from the task's one evaluation of the split
(tasks/box_metrics.py coco_metrics: one pycocotools run):

- per-class AP, AP by object size, and the confusion matrix at IoU 0.5 (background row: false
  detections; background column: missed objects);
- precision-recall curves at IoU 0.5 per class and over all classes: pycocotools' accumulated
  interpolated precision at its 101 recall points (the mean of a curve is its AP@.5);
- images with their outcomes at IoU 0.5 for the detections an answer keeps (score ≥ the answer
  layer's threshold), by pycocotools' own matching: true positives green, false positives red
  (a right box of the wrong class is one), missed objects orange dashed. The first images of the
  split, and the worst: most errors (false positives + misses), then lowest F1.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cvrecipe import pages
from cvrecipe.evaluate.context import ReportContext
from cvrecipe.tasks.answers.detection import SCORE_THRESHOLD
from cvrecipe.tasks.box_metrics import RECALL_POINTS

IMAGES = 8  # images drawn with their outcomes, the first of the split
WORST_SHOWN = 8  # worst images drawn
WORST_LISTED = 20  # rows of the worst-images table
COLOURS = {"tp": "lime", "fp": "red", "missed": "orange"}


def sections(ctx: ReportContext) -> tuple[list[tuple[str, str]], list[str]]:
    """(summary cards, HTML sections) for a detector's report."""
    m = ctx.metrics
    cards = [(_f(m["map"]), f"mAP@[.5:.95] [{ctx.split}]"), (_f(m["map50"]), "mAP@.5"), (_f(m["ar100"]), "AR@100")]
    first = list(range(min(IMAGES, len(ctx.part))))
    return cards, [_per_class(m), _pr_curves(m, ctx.plots), _first(ctx, first), _worst(ctx)]


def _per_class(m: dict) -> str:
    rows = [[name, _f(row["ap"]), _f(row["ap50"]), str(row["boxes"])] for name, row in m["per_class"].items()]
    rows.append(["all classes", _f(m["map"]), _f(m["map50"]), str(m["num_boxes"])])
    sizes = [["small (< 32² px)", _f(m["map_small"])], ["medium", _f(m["map_medium"])],
             ["large (> 96² px)", _f(m["map_large"])]]
    names = list(m["per_class"]) + ["background"]
    confusion = [[names[i], *map(str, row)] for i, row in enumerate(m["confusion_at_iou50"])]
    return ("<h2>Per-class AP</h2><p class='note'>COCO's metrics by pycocotools over the split: AP averaged over "
            "IoU 0.5:0.95, and at IoU 0.5</p>"
            + pages.table(["class", "AP", "AP@.5", "boxes"], rows)
            + "<h3>AP by object size</h3>" + pages.table(["objects", "AP"], sizes)
            + f"<h3>Confusion at IoU 0.5</h3><p class='note'>detections scoring ≥ {SCORE_THRESHOLD}, paired with "
              "objects whatever their class; rows: true class (background: detections matching no object); "
              "columns: detected class (background: objects no detection found)</p>"
            + pages.table(["true \\ detected", *names], confusion))


def _pr_curves(m: dict, plots) -> str:
    curves = [c for c in m["pr_at_iou50"] if c["precision"] is not None]
    if not curves:
        return "<h2>Precision-recall curves</h2><p>no objects in the split: no curve.</p>"
    recall = RECALL_POINTS.numpy()
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for c in curves:
        overall = c["class"] == "all classes"
        ax.plot(recall, c["precision"], color="black" if overall else None, linewidth=2.5 if overall else 1.2,
                label=f"{c['class']} (AP@.5 {np.mean(c['precision']):.3f})", zorder=3 if overall else 2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=1 + len(curves) // 12)
    ax.set_title("precision-recall at IoU 0.5", fontsize=10)
    fig.tight_layout()
    png = pages.figure_png(fig, plots / "pr_curves.png")
    return ("<h2>Precision-recall curves</h2><p class='note'>at IoU 0.5, from pycocotools' accumulated precision "
            "(made monotone, read at COCO's 101 recall points; all detections, whatever their score): a curve's "
            "mean is its AP@.5; all classes is their mean</p>" + pages.img(png, "precision-recall curves"))


def _first(ctx: ReportContext, indices: list[int]) -> str:
    png = _draw(ctx, indices, "boxes.png")
    return (f"<h2>Boxes</h2><p class='note'>the first {len(indices)} images of the split, at IoU 0.5 for detections "
            f"scoring ≥ {SCORE_THRESHOLD}: {_legend()}</p>" + pages.img(png, "true and detected boxes"))


def _worst(ctx: ReportContext) -> str:
    """The images with the most errors (false positives + misses), then the lowest F1."""
    ranked = sorted(ctx.metrics["per_image"], key=lambda r: (-(r["fp"] + r["missed"]), r["f1"], r["index"]))
    ranked = [r for r in ranked if r["fp"] + r["missed"]]
    head = ("<h2>Worst images</h2><p class='note'>ranked by errors at IoU 0.5 (false positives + missed objects, for "
            f"detections scoring ≥ {SCORE_THRESHOLD}), then by lowest F1 = 2·TP / (2·TP + FP + missed)</p>")
    if not ranked:
        return head + "<p>no image has a false positive or a missed object.</p>"
    rows = [[_name(ctx, r["index"]), str(r["tp"]), str(r["fp"]), str(r["missed"]), f"{r['f1']:.3f}"]
            for r in ranked[:WORST_LISTED]]
    png = _draw(ctx, [r["index"] for r in ranked[:WORST_SHOWN]], "worst_images.png")
    return (head + pages.table(["image", "true positives", "false positives", "missed", "F1"], rows)
            + f"<p class='note'>{_legend()}</p>" + pages.img(png, "worst images"))


def _draw(ctx: ReportContext, indices: list[int], file: str) -> bytes:
    """A grid of the images at `indices`, each with its outcomes drawn; also written to plots/`file`."""
    names, n = ctx.model.meta["class_names"], len(indices)
    cols = min(4, n) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, indices):
        image = ctx.part.x[i]
        ax.imshow(image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0], cmap="gray")
        outcome = ctx.metrics["per_image"][i]
        truth, labels = ctx.part.y.boxes_of(i)
        for t in outcome["missed_boxes"]:
            _box(ax, truth[t], names[int(labels[t])], "missed", dashed=True)
        detections = ctx.outputs[i].numpy()
        for r, (*corners, score, label) in enumerate(detections):
            if label >= 0 and score >= SCORE_THRESHOLD:
                _box(ax, corners, f"{names[int(label)]} {score:.2f}", "fp" if r in outcome["false_rows"] else "tp")
        ax.set_title(f"{_name(ctx, i)}\nTP {outcome['tp']} · FP {outcome['fp']} · missed {outcome['missed']}",
                     fontsize=8)
    fig.tight_layout()
    return pages.figure_png(fig, ctx.plots / file)


def _box(ax, corners, text: str, outcome: str, dashed: bool = False) -> None:
    x1, y1, x2, y2 = corners
    colour = COLOURS[outcome]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5,
                           linestyle="--" if dashed else "-"))
    ax.text(x1, y1, text, color="black", fontsize=6, va="bottom",
            bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0})


def _legend() -> str:
    swatch = "<span style='display:inline-block;width:12px;height:12px;border:2px {} {}'></span>"
    return (f"{swatch.format('solid', 'lime')} true positive (detection matching an object of its class) · "
            f"{swatch.format('solid', 'red')} false positive (detection with class and score) · "
            f"{swatch.format('dashed', 'orange')} missed object (true class)")


def _name(ctx: ReportContext, i: int) -> str:
    return ctx.part.names[i] if ctx.part.names else f"{ctx.split} #{i}"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
