"""A small detector checkpoint that answers boxes without training, for the predict tests."""
from __future__ import annotations

from pathlib import Path

import torch

from cvrecipe.artifact.checkpoint import save_weights
from cvrecipe.models import create_model

CLASSES = ["ring", "square", "star"]


def confident_detector(path: Path, size: int = 64, seed: int = 0) -> Path:
    """An untrained FCOS (Lite0 FPN from random weights, 32-channel heads) at `size` px whose class
    logits are biased up (sigmoid(4) = 0.98), so its eval output holds boxes above the answers' 0.25
    score floor; saved as a checkpoint `cvrecipe predict` loads. Returns the checkpoint's path."""
    torch.manual_seed(seed)
    model = create_model("fcos-lite0-scratch", len(CLASSES), 3, (size, size), [127.0] * 3, [64.0] * 3, CLASSES,
                         outputs="boxes", fpn_channels=32)
    with torch.no_grad():
        model.net.model.head.classification_head.cls_logits.bias.fill_(4.0)
    model.meta = {"task": "detection", **model.meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return path


def digit_boxes_set(out: Path, splits: dict[str, tuple[int, int]], size=(64, 64), classes: int = 3,
                    max_objects: int = 2) -> Path:
    """Digits 0..classes-1 pasted on dark noise (data/synth_detect.py's compose), written as COCO JSON
    and YOLO labels; `splits`: {split: (images, seed)}."""
    import numpy as np

    from cvrecipe.data.sources import digits
    from cvrecipe.data.synth_detect import compose, write_split

    ds = digits(Path("."))
    keep = ds.train.y < classes
    background = np.random.default_rng(0).integers(0, 60, (4, 3, 16, 16)).astype(np.uint8)
    for split, (n, seed) in splits.items():
        items = compose(ds.train.x[keep], ds.train.y[keep], background, n, size, seed=seed, max_objects=max_objects)
        write_split(out, split, items, [str(i) for i in range(classes)])
    return out
