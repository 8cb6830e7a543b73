"""Detection's answer layer, NumPy only: the boxes a detector found, in the input image's pixels.

Outputs are the detectors' fixed-shape rows (N, D, 6) [x1, y1, x2, y2, score, class] in the model's
input frame (meta["input_size"]), best first, padded with score 0 and class -1. An answer keeps the
rows scoring at least `score_threshold`, at most `max_detections` of them, rescaled to the image's
own (height, width) when given. Scores are the detector's own (sigmoid or softmax of its head): no
temperature is applied to them (none is fitted for detection).
"""
from __future__ import annotations

import numpy as np

SCORE_THRESHOLD = 0.25  # an answer's default floor: the detectors keep candidates from 0.05, mostly noise
MAX_DETECTIONS = 100


def boxes(rows: np.ndarray, class_names: list[str], input_size: tuple[int, int], image_size: tuple[int, int] | None = None,
          score_threshold: float = SCORE_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> list[dict]:
    """One image's (D, 6) rows → [{"x1", "y1", "x2", "y2", "score", "class"}], best first, in the pixels
    of an image of (H, W) `image_size` (default: the model's input size)."""
    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold={score_threshold}: expected a score in [0, 1]")
    if max_detections < 0:
        raise ValueError(f"max_detections={max_detections}: expected 0 or more")
    rows = np.asarray(rows, np.float64).reshape(-1, 6)
    keep = rows[(rows[:, 5] >= 0) & (rows[:, 4] > 0) & (rows[:, 4] >= score_threshold)]
    keep = keep[np.argsort(-keep[:, 4], kind="stable")][:max_detections]
    in_h, in_w = input_size
    out_h, out_w = image_size or input_size
    scale = np.asarray([out_w / in_w, out_h / in_h] * 2)
    return [{"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2), "score": float(s),
             "class": class_names[int(c)]}
            for (x1, y1, x2, y2), s, c in zip(keep[:, :4] * scale, keep[:, 4], keep[:, 5])]


def answers(outputs: np.ndarray, meta: dict, k: int = MAX_DETECTIONS, score_threshold: float = SCORE_THRESHOLD,
            image_sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Per image of (N, D, 6) rows: {"boxes": [...]} (at most `k`), in each image's pixels when
    `image_sizes` ((H, W) per image) is given, else in the model's input pixels."""
    sizes = image_sizes or [None] * len(outputs)
    return [{"boxes": boxes(rows, meta["class_names"], tuple(meta["input_size"]), size, score_threshold, k)}
            for rows, size in zip(outputs, sizes)]


def text(answer: dict) -> str:
    """One answer as one line for the terminal."""
    if not answer["boxes"]:
        return "no boxes"
    return "  ".join(f"{b['class']} {b['score']:.2f} [{b['x1']:.0f},{b['y1']:.0f},{b['x2']:.0f},{b['y2']:.0f}]"
                     for b in answer["boxes"])
