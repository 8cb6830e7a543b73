"""A synthetic detection set made from data already on the machine, seeded and documented.

Each image is a background photo (CIFAR-10 by default, 32×32, upsampled bilinearly to the image's
size: a blurry but cluttered scene) with 1–6 objects pasted on it. An object is a Fashion-MNIST item
(10 classes) resized to a random side, tinted with a random colour and alpha-composited with the
item's own intensity as alpha:

    out = alpha · tint · (0.35 + 0.65 · alpha) + (1 − alpha) · background,   alpha = item / 255

so dark parts of the item let the background through and its bright parts carry the tint with the
item's texture. Its box is the tight box of the pixels with alpha > ALPHA_EDGE. Objects avoid
overlapping an earlier one by more than MAX_IOU where a few draws allow it (later ones occlude).
Training images take their objects and backgrounds from the sources' train splits, test images from
their test splits, so no item or photo is shared between the two.

Written twice, so any tool reads it:

    OUT/data.yaml                          YOLO: names, train: images/train, val: images/test
    OUT/images/{train,test}/NNNNNN.jpg     JPEG quality 95
    OUT/labels/{train,test}/NNNNNN.txt     `class cx cy w h`, normalised
    OUT/annotations/instances_{train,test}.json   COCO: bbox [x, y, w, h] pixels, category ids 1..10
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ALPHA_EDGE = 0.1  # an object's box holds its pixels more opaque than this
MAX_IOU = 0.3  # placements overlapping an earlier object more than this are redrawn
PLACEMENT_TRIES = 10
OBJECT_SIDE = (0.15, 0.5)  # an object's longer side, as a fraction of the image's shorter side
JPEG_QUALITY = 95


@dataclass
class Synthetic:
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2 pixels
    labels: np.ndarray  # (n,) int64


def compose(objects: np.ndarray, object_labels: np.ndarray, backgrounds: np.ndarray, count: int,
            size: tuple[int, int], seed: int, max_objects: int = 6) -> list[Synthetic]:
    """`count` images. objects (N, 1, h, w) uint8 grey items with labels (N,); backgrounds
    (M, 1 or 3, h', w') uint8; image sides drawn uniformly in `size` = (min, max) pixels."""
    rng = np.random.default_rng(seed)
    return [_one(objects, object_labels, backgrounds, size, rng, max_objects) for _ in range(count)]


def _one(objects, object_labels, backgrounds, size, rng, max_objects) -> Synthetic:
    height, width = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
    bg = torch.from_numpy(np.asarray(backgrounds[rng.integers(len(backgrounds))])).float()[None]
    bg = F.interpolate(bg.expand(1, 3, *bg.shape[-2:]) if bg.shape[1] == 1 else bg, size=(height, width),
                       mode="bilinear", align_corners=False)[0]  # (3, H, W) float 0..255
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = int(rng.integers(len(objects)))
        alpha = _scaled(objects[k], rng, min(height, width))  # (h, w) float 0..1
        tight = _tight_box(alpha)
        if tight is None:
            continue
        y0, x0 = _place(alpha.shape, tight, (height, width), boxes, rng)
        tint = torch.from_numpy(rng.uniform(40, 255, 3)).float()[:, None, None]
        h, w = alpha.shape
        a = alpha[None]
        patch = bg[:, y0:y0 + h, x0:x0 + w]
        bg[:, y0:y0 + h, x0:x0 + w] = a * tint * (0.35 + 0.65 * a) + (1 - a) * patch
        ty0, tx0, ty1, tx1 = tight
        boxes.append((x0 + tx0, y0 + ty0, x0 + tx1, y0 + ty1))
        labels.append(int(object_labels[k]))
    image = bg.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Synthetic(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64))


def _scaled(item: np.ndarray, rng, short_side: int) -> torch.Tensor:
    """The item (1, h, w) resized so its longer side is a random fraction of the image's shorter
    side, aspect ratio jittered ±25 %; (h', w') float alpha in [0, 1]."""
    side = rng.uniform(*OBJECT_SIDE) * short_side
    aspect = rng.uniform(0.75, 1.33)
    h, w = item.shape[-2:]
    scale = side / max(h, w)
    out_h, out_w = max(4, round(h * scale * aspect ** 0.5)), max(4, round(w * scale / aspect ** 0.5))
    x = torch.from_numpy(np.asarray(item, np.float32)).reshape(1, 1, h, w) / 255.0
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def _tight_box(alpha: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the pixels above ALPHA_EDGE (exclusive ends), None for a blank item."""
    rows = torch.nonzero((alpha > ALPHA_EDGE).any(1)).flatten()
    cols = torch.nonzero((alpha > ALPHA_EDGE).any(0)).flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _place(shape, tight, image_hw, boxes, rng) -> tuple[int, int]:
    """Top-left corner for a patch of `shape` whose tight box overlaps earlier boxes ≤ MAX_IOU."""
    (h, w), (height, width) = shape, image_hw
    ty0, tx0, ty1, tx1 = tight
    best = None
    for _ in range(PLACEMENT_TRIES):
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        box = (x0 + tx0, y0 + ty0, x0 + tx1, y0 + ty1)
        worst = max((_iou(box, b) for b in boxes), default=0.0)
        if best is None or worst < best[0]:
            best = (worst, y0, x0)
        if worst <= MAX_IOU:
            break
    return best[1], best[2]


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---- writing ------------------------------------------------------------------------------------

def write_split(out: Path, split: str, items: list[Synthetic], classes: list[str]) -> None:
    """images/SPLIT/*.jpg, labels/SPLIT/*.txt and annotations/instances_SPLIT.json."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}
    for n, item in enumerate(items):
        name = f"{n:06d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(item.image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        (out / "images" / split / name).write_bytes(buf.getvalue())
        h, w = item.image.shape[:2]
        lines = []
        for (x1, y1, x2, y2), label in zip(item.boxes.tolist(), item.labels.tolist()):
            lines.append(f"{label} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                         f"{(y2 - y1) / h:.6f}")
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n + 1,
                                        "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        (out / "labels" / split / f"{n:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        coco["images"].append({"id": n + 1, "file_name": f"images/{split}/{name}", "width": w, "height": h})
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def synth_detect(out: Path, objects_train, objects_test, backgrounds_train, backgrounds_test, classes: list[str],
                 train: int = 5000, test: int = 500, size: tuple[int, int] = (128, 256), seed: int = 0,
                 max_objects: int = 6) -> dict[str, tuple[int, int]]:
    """Write the set (module docstring). objects_*: (x (N, 1, h, w) uint8, labels (N,)); backgrounds_*:
    (M, C, h, w) uint8. Train and test draw from separate seeds. Returns {split: (images, boxes)}."""
    out = Path(out)
    counts = {}
    for split, count, (ox, oy), bgs, split_seed in (("train", train, objects_train, backgrounds_train, seed),
                                                    ("test", test, objects_test, backgrounds_test, seed + 1)):
        items = compose(ox, oy, bgs, count, size, split_seed * 1_000_003 + 17, max_objects)
        write_split(out, split, items, classes)
        counts[split] = (len(items), sum(len(i.labels) for i in items))
    spec = {"path": ".", "train": "images/train", "val": "images/test", "test": "images/test",
            "names": {i: name for i, name in enumerate(classes)}}
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return counts
