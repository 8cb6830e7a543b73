"""ISBI 2012 cells as a detection set: `cvrecipe data cells OUT [--masks PATH]`.

The ISBI 2012 electron-microscopy stack (30 images of 512×512, `masks:PATH` layout, data/masks.py)
labels each pixel membrane (mask value 0) or not (255). A cell is a connected component of the
non-membrane pixels, and gets one box, class "cell":

- connectivity 4 (scipy.ndimage.label's default cross structure): pixels touching only at a corner
  are separate cells, as the membrane between them is one pixel wide;
- components smaller than MIN_AREA pixels are dropped (specks left between membrane branches);
- components touching the image or tile border are kept, their box clipped to it (the box of the
  part that is visible).

On the whole 512-pixel images this gives 3,332 boxes in 30 images. Images are cut into TILE×TILE
tiles (default 256: four per image, ~28 cells per tile rather than ~111 per image, under the usual
100 detections per image) and the components are labelled per tile, so a cell cut by a tile edge is
a clipped box in each tile it shows in. The split is fixed, by image, never by tile: the images
numbered TEST_IMAGES (24-29) are the test split, 0-23 train, so no test cell was seen in training.
There is nothing random in it.

Written like `cvrecipe data synth-detect` (data/synth_detect.py): OUT/images/{train,test}/*.jpg,
OUT/labels/{train,test}/*.txt (YOLO), OUT/annotations/instances_{train,test}.json (COCO),
OUT/data.yaml.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from scipy import ndimage

from cvrecipe.data.cache import cache_root
from cvrecipe.data.dataset import DataError
from cvrecipe.data.masks import load_masks
from cvrecipe.data.synth_detect import Synthetic, write_split

MASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "isbi2012-membrane.tar.gz"
CELL_VALUE = "255"  # the mask value (class name data/masks.py gives it) of the non-membrane pixels
MIN_AREA = 20  # pixels: smaller components are specks, not cells
TILE = 256
TEST_IMAGES = range(24, 30)  # image numbers (file stems) of the test split
CONNECTIVITY = ndimage.generate_binary_structure(2, 1)  # 4-connectivity: the cross


def component_boxes(mask: np.ndarray, min_area: int = MIN_AREA) -> np.ndarray:
    """(n, 4) float32 boxes x1, y1, x2, y2 (pixel edges: x2 = last column + 1) of the 4-connected
    components of the True pixels of `mask` (H, W) with at least `min_area` pixels, in label order
    (scan order of each component's first pixel)."""
    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop)
             for k, s in enumerate(ndimage.find_objects(labels), start=1) if areas[k] >= min_area]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def tiles(image: np.ndarray, cells: np.ndarray, tile: int, min_area: int) -> list[Synthetic]:
    """An image (C, H, W) uint8 and its cell mask (H, W) bool → one item per tile×tile tile (row by
    row; a tile of 0 or one at least the image's size keeps the whole image)."""
    h, w = cells.shape
    step_y, step_x = (h, w) if tile <= 0 else (tile, tile)
    items = []
    for y in range(0, h, step_y):
        for x in range(0, w, step_x):
            crop = image[:, y:y + step_y, x:x + step_x]
            rgb = np.ascontiguousarray(np.repeat(crop, 3 // crop.shape[0], axis=0).transpose(1, 2, 0))
            boxes = component_boxes(cells[y:y + step_y, x:x + step_x], min_area)
            items.append(Synthetic(rgb, boxes, np.zeros(len(boxes), np.int64)))
    return items


def cells_set(out: Path, masks: str | Path = MASKS, cache_dir: Path | None = None, tile: int = TILE,
              min_area: int = MIN_AREA, test_images=TEST_IMAGES) -> dict[str, tuple[int, int]]:
    """Write the set (module docstring) into `out`, reading `masks` through data/masks.py (decoded
    into `cache_dir`). Returns {split: (images, boxes)}."""
    ds = load_masks(masks, None, None, Path(cache_dir) if cache_dir else cache_root())
    if CELL_VALUE not in ds.classes:
        raise DataError(f"{masks}: no mask value {CELL_VALUE} (the non-membrane class); classes {ds.classes}")
    cell = ds.classes.index(CELL_VALUE)
    split_of = {}
    for i, name in enumerate(ds.train.names):
        stem = PurePosixPath(name).stem
        split_of[i] = "test" if stem.isdigit() and int(stem) in test_images else "train"
    out = Path(out)
    counts = {}
    for split in ("train", "test"):
        items = [item for i in sorted(split_of, key=lambda i: _number(ds.train.names[i])) if split_of[i] == split
                 for item in tiles(ds.train.x[i], ds.train.y[i] == cell, tile, min_area)]
        write_split(out, split, items, ["cell"])
        counts[split] = (len(items), sum(len(item.labels) for item in items))
    spec = {"path": ".", "train": "images/train", "val": "images/test", "test": "images/test", "names": {0: "cell"}}
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return counts


def _number(name: str) -> tuple[int, str]:
    stem = PurePosixPath(name).stem
    return (int(stem) if stem.isdigit() else 1 << 30, stem)
