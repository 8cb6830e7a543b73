"""Cut a box dataset's large images into square tiles, written as a detection set split by tile.

For sets of a few large annotated images (DeepForest's aerial crops: 400×400 to 2,299×2,472 px):

- each image is read through data/boxes.py (any format it reads: COCO, YOLO, Pascal VOC) and cut
  into a grid of TILE×TILE tiles without overlap; the last row and column are padded with black
  to a full tile, so every tile has the same size and no pixel is in two tiles;
- a box is kept in a tile when at least MIN_VISIBLE of its area lies in it, clipped to the tile;
  the smaller slivers are dropped (their object is unlabelled there, the same for every tool);
- `one_class` (e.g. "tree") merges every class into one; without it the classes are kept;
- tiles are split at random, seeded: a TEST_FRACTION of each image's tiles (rounded, at least one
  where an image has two or more) are the test split, the rest train. Neighbouring tiles of one
  scene may fall on both sides; they share no pixel.

Written like `cvrecipe data synth-detect` (data/synth_detect.py): OUT/images/{train,test}/*.jpg,
OUT/labels/{train,test}/*.txt (YOLO), OUT/annotations/instances_{train,test}.json (COCO),
OUT/data.yaml.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cvrecipe.data.boxes import BoxImage, read_boxes, read_image_bytes
from cvrecipe.data.dataset import DataError
from cvrecipe.data.synth_detect import Synthetic, write_split

TILE = 400
MIN_VISIBLE = 0.5  # fraction of a box's area inside a tile for it to be labelled there
TEST_FRACTION = 0.25


def tile_image(image: np.ndarray, item: BoxImage, tile: int, min_visible: float = MIN_VISIBLE,
               one_class: bool = False) -> list[Synthetic]:
    """An image (H, W, 3) uint8 and its boxes → its tiles, row by row (module docstring)."""
    h, w = image.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    padded[:h, :w] = image
    boxes = item.boxes.astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    labels = np.zeros_like(item.labels) if one_class else item.labels
    out = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * tile, r * tile
            clipped = np.clip(boxes - [x0, y0, x0, y0], 0, tile)
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= min_visible * np.maximum(area, 1e-9)
            out.append(Synthetic(np.ascontiguousarray(padded[y0:y0 + tile, x0:x0 + tile]),
                                 clipped[keep].astype(np.float32), labels[keep].astype(np.int64)))
    return out


def tile_set(source: str | Path, out: Path, tile: int = TILE, test_fraction: float = TEST_FRACTION, seed: int = 0,
             one_class: str | None = None, fmt: str | None = None,
             min_visible: float = MIN_VISIBLE) -> dict[str, tuple[int, int]]:
    """Read the box dataset `source` (all its splits) and write its tiles into `out` (module
    docstring). Returns {split: (tiles, boxes)}."""
    ds = read_boxes(source, fmt=fmt)
    if ds.problems:
        raise DataError(f"{source}: {len(ds.problems)} annotation problem(s), e.g. {ds.problems[0].file}: "
                        f"{ds.problems[0].kind} {ds.problems[0].detail}")
    items = sorted((item for split in ds.splits.values() for item in split), key=lambda item: item.file)
    if not items:
        raise DataError(f"{source}: no annotated images")
    data = read_image_bytes(source, [item.file for item in items])
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": []}
    for item in items:
        image = np.asarray(Image.open(io.BytesIO(data[item.file])).convert("RGB"))
        parts = tile_image(image, item, tile, min_visible, one_class is not None)
        n_test = max(1, round(test_fraction * len(parts))) if len(parts) > 1 and test_fraction > 0 else 0
        test = set(rng.permutation(len(parts))[:n_test].tolist())
        for k, part in enumerate(parts):
            splits["test" if k in test else "train"].append(part)
    classes = [one_class] if one_class is not None else ds.classes
    for split, parts in splits.items():
        write_split(Path(out), split, parts, classes)
    spec = {"path": ".", "train": "images/train", "val": "images/test", "test": "images/test",
            "names": dict(enumerate(classes))}
    (Path(out) / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return {split: (len(parts), sum(len(p.labels) for p in parts)) for split, parts in splits.items()}
