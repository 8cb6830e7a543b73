"""The ISBI cells converter: connected components → boxes, on a planted mask and its written files."""
import json

import numpy as np
import pytest
from PIL import Image

from cvrecipe.data.boxes import read_boxes
from cvrecipe.data.cells import cells_set, component_boxes
from cvrecipe.data.dataset import DataError


def planted() -> np.ndarray:
    """An 8x10 cell mask (True = not membrane): a 2x3 block, an L of 4 pixels, two pixels meeting
    only at a corner (two cells under 4-connectivity) and a 1-pixel speck."""
    m = np.zeros((8, 10), bool)
    m[0:2, 0:3] = True  # box (0, 0, 3, 2), 6 px, touches the border
    m[4, 5:8] = True
    m[5, 5] = True  # the L: box (5, 4, 8, 6), 4 px
    m[7, 0] = True
    m[6, 1] = True  # diagonal neighbours: two 1-px components
    m[2, 9] = True  # a speck at the right border
    return m


def test_components_become_boxes_exactly():
    assert component_boxes(planted(), min_area=1).tolist() == [
        [0, 0, 3, 2], [9, 2, 10, 3], [5, 4, 8, 6], [1, 6, 2, 7], [0, 7, 1, 8]]
    assert component_boxes(planted(), min_area=4).tolist() == [[0, 0, 3, 2], [5, 4, 8, 6]]
    assert component_boxes(np.zeros((4, 4), bool)).shape == (0, 4)


def write_masks(folder, count: int) -> list[np.ndarray]:
    """`count` 16x16 image/mask pairs named 0..count-1; pair k plants a (k+2)x3 cell at (k, 1)."""
    (folder / "image").mkdir(parents=True)
    (folder / "label").mkdir()
    masks = []
    for k in range(count):
        mask = np.zeros((16, 16), np.uint8)
        mask[k:k + k + 2, 1:4] = 255
        mask[12:16, 12:16] = 255  # a 4x4 cell in the corner, cut by no tile of 8
        Image.fromarray(mask).save(folder / "label" / f"{k}.png")
        Image.fromarray(np.full((16, 16), 100 + k, np.uint8)).save(folder / "image" / f"{k}.png")
        masks.append(mask)
    return masks


def test_written_set_reads_back_with_the_split_by_image(tmp_path):
    write_masks(tmp_path / "isbi", 4)
    counts = cells_set(tmp_path / "out", tmp_path / "isbi", tmp_path / "cache", tile=0, min_area=4,
                       test_images=range(2, 4))
    assert counts == {"train": (2, 4), "test": (2, 4)}
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_test.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "cell"}]
    first = sorted(a["bbox"] for a in coco["annotations"] if a["image_id"] == 1)
    assert first == [[1, 2, 3, 4], [12, 12, 4, 4]]  # image 2: rows 2-5, columns 1-3 (COCO x, y, w, h)
    yolo = read_boxes(tmp_path / "out", fmt="yolo")  # the YOLO files say the same
    assert yolo.classes == ["cell"]
    assert sorted(yolo.splits["test"][0].boxes.tolist()) == [[1, 2, 4, 6], [12, 12, 16, 16]]


def test_tiles_clip_cells_at_tile_edges(tmp_path):
    write_masks(tmp_path / "isbi", 1)
    counts = cells_set(tmp_path / "out", tmp_path / "isbi", tmp_path / "cache", tile=8, min_area=1,
                       test_images=[])
    assert counts == {"train": (4, 2), "test": (0, 0)}  # the 2x3 cell in tile 0, the corner cell in tile 3
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert sorted((a["image_id"], a["bbox"]) for a in coco["annotations"]) == [(1, [1, 0, 3, 2]), (4, [4, 4, 4, 4])]


def test_a_dataset_without_the_cell_value_is_named(tmp_path):
    (tmp_path / "m" / "image").mkdir(parents=True)
    (tmp_path / "m" / "label").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m" / "image" / "0.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m" / "label" / "0.png")
    with pytest.raises(DataError, match="no mask value 255"):
        cells_set(tmp_path / "out", tmp_path / "m", tmp_path / "cache")


def test_a_one_class_detection_set_passes_the_data_check(tmp_path):
    from cvrecipe.data.box_source import load_boxes

    write_masks(tmp_path / "isbi", 4)
    cells_set(tmp_path / "out", tmp_path / "isbi", tmp_path / "cache", tile=0, min_area=4, test_images=range(3, 4))
    ds = load_boxes(tmp_path / "out", 16, 3, tmp_path / "cache", fmt="coco")
    assert ds.classes == ["cell"]
    ds.check()  # one class is enough for boxes (the background is implicit) ...
    ds.train.y = ds.train.y.labels[:len(ds.train)] * 0  # ... but not for class labels
    with pytest.raises(DataError, match="need at least 2"):
        ds.check()


def test_cells_at_the_border_read_back_without_clipping_notes(tmp_path):
    """A cell in rows 0-3 of a 256 px image is written as cy 0.007812, h 0.015625 (6 decimals): its top
    edge reads back at -0.000128 px, rounding that the YOLO reader clips without naming it."""
    (tmp_path / "isbi" / "image").mkdir(parents=True)
    (tmp_path / "isbi" / "label").mkdir()
    mask = np.zeros((256, 256), np.uint8)
    mask[0:4, 54:88] = 255
    mask[100:120, 100:120] = 255
    Image.fromarray(mask).save(tmp_path / "isbi" / "label" / "0.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "isbi" / "image" / "0.png")
    cells_set(tmp_path / "out", tmp_path / "isbi", tmp_path / "cache", tile=0, test_images=[])
    back = read_boxes(tmp_path / "out", fmt="yolo")
    assert back.problems == []
    assert sorted(back.splits["train"][0].boxes.round(3).tolist()) == [[54, 0, 88, 4], [100, 100, 120, 120]]
    (tmp_path / "out" / "labels" / "train" / "000000.txt").write_text("0 0.2 0.0 0.1 0.1\n")  # half outside
    assert [p.kind for p in read_boxes(tmp_path / "out", fmt="yolo").problems] == ["clipped"]
