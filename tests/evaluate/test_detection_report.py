"""The detection report's sections on a hand-made split: per-image outcomes drawn in their colours,
the worst images in the documented order, the precision-recall curves, and the page in a real
browser. (The report of a trained detector end to end: tests/tasks/test_detection_run.py.)"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from cvrecipe import pages
from cvrecipe.data.box_targets import BoxTargets
from cvrecipe.data.dataset import Split
from cvrecipe.evaluate import detection_report
from cvrecipe.evaluate.context import ReportContext
from cvrecipe.tasks import get_task
from pagecheck import view_page

CLASSES = ["a", "b"]
PAD = [0, 0, 0, 0, 0, -1]
# image: (true boxes [x1, y1, x2, y2, class], detection rows [x1, y1, x2, y2, score, class])
CASE = [([[10, 10, 40, 40, 0], [60, 60, 90, 90, 1]],  # 2 found, 1 false (nothing there), 1 false (wrong class)
         [[10, 10, 40, 40, .9, 0], [50, 5, 70, 25, .95, 0], [60, 60, 90, 90, .3, 1], [60, 60, 90, 90, .8, 0]]),
        ([[5, 5, 95, 95, 1], [60, 60, 90, 90, 0]],  # 1 found, 1 duplicate (false), a missed (its find scores .2)
         [[7, 7, 95, 95, .6, 1], [5, 5, 95, 95, .7, 1], [60, 60, 90, 90, .2, 0]]),
        ([], [[5, 5, 25, 25, .5, 0]]),  # nothing to find, 1 false
        ([[20, 20, 50, 50, 0]], [])]  # 1 missed
EXPECTED = [(2, 2, 0), (1, 1, 1), (0, 1, 0), (0, 0, 1)]  # (tp, fp, missed) at IoU 0.5, score ≥ 0.25


def context(tmp_path: Path) -> ReportContext:
    truth = [np.array(t, np.float32).reshape(-1, 5) for t, _ in CASE]
    flat = np.concatenate([np.c_[t, np.full(len(t), i)] for i, t in enumerate(truth)]).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in truth])])
    outputs = torch.tensor([d + [PAD] * (5 - len(d)) for _, d in CASE], dtype=torch.float32)  # (4, 5, 6) padded
    x = np.full((len(CASE), 3, 100, 100), 128, np.uint8)  # plain grey: only the drawn boxes carry colour
    part = Split(x, BoxTargets(flat, offsets), [f"test/{i}.jpg" for i in range(len(CASE))])
    task = get_task("detection")
    metrics = task.evaluate(outputs, task.batch_targets(part.y, 0, len(part)), CLASSES)
    model = SimpleNamespace(meta={"class_names": CLASSES})  # the sections read only the class names
    plots = tmp_path / "plots"
    plots.mkdir()
    return ReportContext(tmp_path, None, None, "test", part, model, tmp_path / "best.safetensors", outputs, metrics,
                         torch.device("cpu"), plots, False, Console(quiet=True))


def colour_share(png: Path, rgb: tuple[int, int, int]) -> float:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((np.abs(pixels - np.array(rgb)).sum(-1) < 60).mean())


def test_the_report_counts_draws_and_ranks_outcomes_and_renders_in_a_browser(tmp_path):
    ctx = context(tmp_path)
    per_image = ctx.metrics["per_image"]
    assert [(r["tp"], r["fp"], r["missed"]) for r in per_image] == EXPECTED
    cards, body = detection_report.sections(ctx)
    for file in ("boxes.png", "worst_images.png", "pr_curves.png"):
        assert (ctx.plots / file).stat().st_size > 1000
    boxes = ctx.plots / "boxes.png"
    for rgb in ((0, 255, 0), (255, 0, 0), (255, 165, 0)):  # true positives, false positives, misses
        assert colour_share(boxes, rgb) > 1e-4, rgb
    page = tmp_path / "report.html"
    page.write_text(pages.page("Run report: hand-made", "detection", [pages.cards(cards), *body]))
    info = view_page(page, tmp_path / "report.png")
    assert info["headings"] == ["Per-class AP", "Precision-recall curves", "Boxes", "Worst images"]
    alts = [i["alt"] for i in info["images"]]
    assert alts == ["precision-recall curves", "true and detected boxes", "worst images"]
    assert all(i["width"] > 0 and i["shown"] > 0 for i in info["images"])
    html = page.read_text()
    worst = html[html.index("<h2>Worst images"):]
    # most errors first (fp + missed: 2, 2, 1, 1), then lowest F1 (0.5 before 0.667; 0 and 0 by index)
    order = [worst.index(f"test/{i}.jpg") for i in (1, 0, 2, 3)]
    assert order == sorted(order)
    assert info["tables"][-1] == 4  # every image has an error


def test_a_split_without_errors_says_so(tmp_path):
    ctx = context(tmp_path)
    for r in ctx.metrics["per_image"]:
        r.update(fp=0, missed=0, false_rows=[], missed_boxes=[])
    assert "no image has a false positive or a missed object" in detection_report._worst(ctx)
