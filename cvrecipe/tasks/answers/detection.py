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


# one colour per class (cycled), chosen to stay readable on photos: class i gets PALETTE[i % len]
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def annotate(image: np.ndarray, found: list[dict], class_names: list[str]) -> np.ndarray:
    """`image` ((H, W, 3) or (H, W) uint8) with each answer box of `found` drawn on it (a rectangle
    and "class score" above it, coloured by class), as a new (H, W, 3) uint8 array. The boxes must be
    in the image's own pixels (answers(..., image_sizes=...))."""
    from PIL import Image, ImageDraw, ImageFont  # Pillow is a core dependency; imported here to keep this module NumPy-only to load

    image = np.asarray(image, np.uint8)
    canvas = Image.fromarray(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    font = ImageFont.load_default(size=max(9, side // 40))
    width = max(1, side // 200)
    index = {name: i for i, name in enumerate(class_names)}
    for box in found:
        colour = PALETTE[index.get(box["class"], 0) % len(PALETTE)]
        x1, y1, x2, y2 = box["x1"], box["y1"], box["x2"], box["y2"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = f"{box['class']} {box['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font, anchor="lb")
        if top < 0:  # no room above the box: write inside it
            left, top, right, bottom = draw.textbbox((x1, y1), label, font=font, anchor="lt")
        draw.rectangle((left, top, right, bottom), fill=colour)
        draw.text((left, top), label, fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255), font=font, anchor="lt")
    return np.asarray(canvas)
