"""Tiling a large annotated image: boxes clipped to tiles, slivers dropped, padding, the seeded split."""
import json

import numpy as np
from PIL import Image

from cvrecipe.data.boxes import BoxImage, read_boxes
from cvrecipe.data.tiles import tile_image, tile_set


def test_boxes_are_clipped_to_their_tiles_and_slivers_dropped():
    image = np.full((6, 10, 3), 7, np.uint8)
    boxes = np.array([[1, 1, 3, 3],  # inside tile (0, 0)
                      [3, 0, 6, 2],  # 1/3 in tile (0, 0), 2/3 in tile (0, 1): kept only there
                      [7, 4, 9, 6]], np.float32)  # half in tile (1, 1), half in (1, 2): kept in both
    item = BoxImage("a.png", 10, 6, boxes, np.array([0, 1, 1]))
    parts = tile_image(image, item, 4, min_visible=0.5)
    assert len(parts) == 6  # 2 rows x 3 columns, the last row and column padded
    assert all(p.image.shape == (4, 4, 3) for p in parts)
    assert parts[0].boxes.tolist() == [[1, 1, 3, 3]] and parts[0].labels.tolist() == [0]
    assert parts[1].boxes.tolist() == [[0, 0, 2, 2]] and parts[1].labels.tolist() == [1]
    assert parts[4].boxes.tolist() == [[3, 0, 4, 2]] and parts[5].boxes.tolist() == [[0, 0, 1, 2]]
    assert parts[2].boxes.shape == (0, 4) and parts[3].boxes.shape == (0, 4)
    # tile (1, 2) holds image rows 4-5 and columns 8-9; the rest is black padding
    assert parts[5].image[:2, :2].min() == 7 and parts[5].image[2:].max() == 0 and parts[5].image[:, 2:].max() == 0
    assert tile_image(image, item, 4, one_class=True)[1].labels.tolist() == [0]


def test_a_voc_set_is_tiled_split_by_tile_and_reads_back(tmp_path):
    src = tmp_path / "voc"
    src.mkdir()
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(src / "big.png")
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{x}</xmin><ymin>1</ymin><xmax>{x + 2}</xmax>"
                      f"<ymax>3</ymax></bndbox></object>" for n, x in (("Alive", 1), ("Dead", 5), ("Tree", 9), ("Tree", 13)))
    (src / "big.xml").write_text(f"<annotation><filename>big.png</filename><size><width>16</width><height>8</height>"
                                 f"</size>{objects}</annotation>")
    counts = tile_set(src, tmp_path / "out", tile=4, test_fraction=0.25, seed=0, one_class="tree")
    assert counts == {"train": (6, 3), "test": (2, 1)}  # 8 tiles, one box in each top-row tile
    back = read_boxes(tmp_path / "out", fmt="yolo")
    assert back.classes == ["tree"] and back.counts() == counts
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_test.json").read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [[1, 1, 2, 2]]
