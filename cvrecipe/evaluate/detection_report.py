"""The detection sections of the run report: per-class AP (pycocotools) with the confusion matrix at
IoU 0.5 (background row: false detections; background column: missed objects), and images of the
evaluated split with their true boxes (green) and the detections scoring at least the answer
layer's threshold (red, with class and score). Not yet here: precision-recall curves, the worst
images, true/false positives coloured apart."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cvrecipe import pages
from cvrecipe.evaluate.context import ReportContext
from cvrecipe.tasks.answers.detection import SCORE_THRESHOLD

IMAGES = 8  # images drawn with their boxes, the first of the split


def sections(ctx: ReportContext) -> tuple[list[tuple[str, str]], list[str]]:
    """(summary cards, HTML sections) for a detector's report."""
    m = ctx.metrics
    cards = [(_f(m["map"]), f"mAP@[.5:.95] [{ctx.split}]"), (_f(m["map50"]), "mAP@.5"), (_f(m["ar100"]), "AR@100")]
    return cards, [_per_class(m), _boxes(ctx)]


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
            + "<h3>Confusion at IoU 0.5</h3><p class='note'>rows: true class (background: detections matching "
              "no object); columns: detected class (background: objects no detection found)</p>"
            + pages.table(["true \\ detected", *names], confusion))


def _boxes(ctx: ReportContext) -> str:
    names, n = ctx.model.meta["class_names"], min(IMAGES, len(ctx.part))
    cols = min(4, n) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3 * cols, 3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        image = ctx.part.x[i]
        ax.imshow(image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0], cmap="gray")
        truth, labels = ctx.part.y.boxes_of(i)
        for (x1, y1, x2, y2), label in zip(truth, labels):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
        for x1, y1, x2, y2, score, label in ctx.outputs[i].numpy():
            if label < 0 or score < SCORE_THRESHOLD:
                continue
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1))
            ax.text(x1, y1, f"{names[int(label)]} {score:.2f}", color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": "red", "alpha": 0.6, "pad": 0.5, "linewidth": 0})
    fig.tight_layout()
    png = pages.figure_png(fig, ctx.plots / "boxes.png")
    return (f"<h2>Boxes</h2><p class='note'>the first {n} images of the split: true boxes green, detections "
            f"scoring ≥ {SCORE_THRESHOLD} red</p>" + pages.img(png, "true and detected boxes"))


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
