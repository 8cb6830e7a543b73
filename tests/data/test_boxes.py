"""Box annotations: COCO, YOLO and Pascal VOC read into one form, bad annotations named, not fatal."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvrecipe.data.boxes import problem_lines, read_boxes, read_image_bytes
from cvrecipe.data.dataset import DataError


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def kinds(ds) -> dict[str, int]:
    found: dict[str, int] = {}
    for p in ds.problems:
        found[p.kind] = found.get(p.kind, 0) + 1
    return found


def by_file(ds, split="train"):
    return {item.file: item for item in ds.splits[split]}


# ---- COCO ------------------------------------------------------------------------------------------

def coco_doc(first_id: int) -> dict:
    """Two classes with ids first_id and first_id + 2 (a gap); bbox in x, y, w, h."""
    a, b = first_id, first_id + 2
    return {
        "categories": [{"id": b, "name": "dog"}, {"id": a, "name": "cat"}],
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "empty.png", "width": 50, "height": 50},
                   {"id": 3, "file_name": "gone.png", "width": 50, "height": 50},
                   {"id": 4, "file_name": "b.png", "width": 99, "height": 99}],  # declared size is wrong
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": a, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 1, "category_id": b, "bbox": [90, 70, 20, 20]},  # partly outside: clipped
            {"id": 3, "image_id": 1, "category_id": b, "bbox": [200, 10, 5, 5]},  # wholly outside
            {"id": 4, "image_id": 1, "category_id": a, "bbox": [5, 5, 0, 10]},  # zero width
            {"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},  # unknown class
            {"id": 6, "image_id": 3, "category_id": a, "bbox": [1, 1, 5, 5]},  # image file missing
            {"id": 7, "image_id": 4, "category_id": b, "bbox": [0, 0, 10, 10]},
            {"id": 8, "image_id": 1, "category_id": a},  # no bbox: malformed
        ],
    }


@pytest.mark.parametrize("first_id", [0, 1])
def test_coco_reads_xywh_and_names_each_bad_annotation(tmp_path, first_id):
    root = write(tmp_path, {"train/a.png": png(100, 80), "train/empty.png": png(50, 50), "train/b.png": png(40, 30),
                            "train/_annotations.coco.json": json.dumps(coco_doc(first_id))})
    ds = read_boxes(root)
    assert ds.format == "coco" and ds.classes == ["cat", "dog"]  # id order, 0- or 1-based alike
    items = by_file(ds)
    assert set(items) == {"train/a.png", "train/empty.png", "train/b.png"}
    np.testing.assert_array_equal(items["train/a.png"].boxes, [[10, 20, 40, 60], [90, 70, 100, 80]])
    np.testing.assert_array_equal(items["train/a.png"].labels, [0, 1])
    assert items["train/empty.png"].boxes.shape == (0, 4)  # an image without boxes is kept, empty
    assert (items["train/b.png"].width, items["train/b.png"].height) == (40, 30)  # the image's own size wins
    assert kinds(ds) == {"clipped": 1, "outside": 1, "zero_area": 1, "unknown_class": 1, "image_missing": 1,
                         "size_mismatch": 1, "malformed": 1}
    lines = problem_lines(ds.problems)
    assert len(lines) == 7 and all("_annotations.coco.json" in line for line in lines)
    assert any(line.startswith("unknown_class: 1") and "category_id 99" in line for line in lines)


def test_coco_split_from_file_name_and_malformed_json_is_named(tmp_path):
    doc = coco_doc(1)
    write(tmp_path, {"images/a.png": png(100, 80), "images/empty.png": png(50, 50), "images/b.png": png(40, 30),
                     "annotations/instances_val2017.json": json.dumps(doc),
                     "annotations/instances_train2017.json": json.dumps(doc),
                     "annotations/broken.json": "{not json"})
    ds = read_boxes(tmp_path)
    assert set(ds.splits) == {"train", "val"}
    assert any(p.kind == "malformed" and p.file == "annotations/broken.json" for p in ds.problems)


# ---- YOLO ------------------------------------------------------------------------------------------

def yolo_files() -> dict[str, bytes | str]:
    return {
        "data.yaml": "train: images/train\nval: images/val\nnames: [cat, dog]\n",
        "images/train/a.png": png(100, 50),
        "labels/train/a.txt": "0 0.5 0.5 0.2 0.4\n1 0.95 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n0 0.5 0.5\n1 50 25 10 10\n",
        "images/train/nolabel.png": png(20, 20),  # no label file: kept, no boxes
        "images/train/test.png": png(20, 20),  # an image's own name says nothing about its split
        "labels/train/orphan.txt": "0 0.5 0.5 0.1 0.1\n",  # no image
        "images/val/c.png": png(64, 64),
        "labels/val/c.txt": "1 0.25 0.25 0.5 0.5\n",
    }


def test_yolo_reads_normalised_cxcywh_and_names_each_bad_line(tmp_path):
    ds = read_boxes(write(tmp_path, yolo_files()))
    assert ds.format == "yolo" and ds.classes == ["cat", "dog"] and set(ds.splits) == {"train", "val"}
    items = by_file(ds)
    np.testing.assert_allclose(items["images/train/a.png"].boxes, [[40, 15, 60, 35], [85, 20, 100, 30]])
    assert items["images/train/nolabel.png"].boxes.shape == (0, 4) and "images/train/test.png" in items
    np.testing.assert_allclose(by_file(ds, "val")["images/val/c.png"].boxes, [[0, 0, 32, 32]])
    assert kinds(ds) == {"clipped": 1, "unknown_class": 1, "malformed": 2, "label_without_image": 1}
    assert any("values above 1" in p.detail for p in ds.problems)  # pixel coordinates where fractions belong


@pytest.mark.parametrize("spec, split", [("train: images/a\nval: images/a\n", "train"),  # Ultralytics' coco128
                                         ("train: images/t\nval: images/a\ntest: images/a\n", "test")])
def test_a_yolo_folder_named_for_two_splits_is_train_before_test_before_val(tmp_path, spec, split):
    ds = read_boxes(write(tmp_path, {"data.yaml": spec + "names: [cat]\n", "images/a/x.png": png(20, 20),
                                     "labels/a/x.txt": "0 0.5 0.5 0.2 0.2\n", "images/t/y.png": png(20, 20)}))
    assert "images/a/x.png" in [item.file for item in ds.splits[split]] and not ds.splits.get("val")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_yolo_from_an_archive_under_a_wrapping_folder_reads_the_same(tmp_path, kind):
    folder = write(tmp_path / "set", yolo_files())
    archive = tmp_path / f"set.{kind}"
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in files:
                zf.write(path, "wrap/" + path.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for path in files:
                tf.add(path, "wrap/" + path.relative_to(folder).as_posix())
    plain, zipped = read_boxes(folder), read_boxes(archive)
    assert [i.file for i in zipped.splits["train"]] == ["wrap/" + i.file for i in plain.splits["train"]]
    for a, b in zip(plain.splits["train"], zipped.splits["train"]):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert kinds(plain) == kinds(zipped)
    data = read_image_bytes(archive, ["wrap/images/val/c.png"])
    assert Image.open(io.BytesIO(data["wrap/images/val/c.png"])).size == (64, 64)


# ---- Pascal VOC ------------------------------------------------------------------------------------

def voc_xml(filename: str, objects: list[tuple[str, tuple]], size=(100, 80)) -> str:
    body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
                  "<annotation><filename>&lol2;</filename></annotation>")


def test_voc_reads_corners_splits_and_refuses_entity_expansion(tmp_path):
    write(tmp_path, {
        "JPEGImages/1.png": png(100, 80), "JPEGImages/2.png": png(100, 80),
        "Annotations/1.xml": voc_xml("1.png", [("tree", (10, 10, 50, 40)), ("tree", (60, 50, 120, 90)),
                                               ("bush", (0, 0, 5, 5))]),
        "Annotations/2.xml": voc_xml("2.png", [("tree", (30, 30, 30, 40)), ("tree", ("x", 1, 2, 3))]),
        "Annotations/3.xml": voc_xml("3.png", [("tree", (1, 1, 5, 5))]),  # image missing
        "Annotations/bomb.xml": BILLION_LAUGHS,
        "Annotations/cut.xml": "<annotation><filename>1.png",
        "ImageSets/Main/train.txt": "1\n", "ImageSets/Main/val.txt": "2\n",
    })
    ds = read_boxes(tmp_path, classes=["tree"])
    assert ds.format == "voc" and ds.classes == ["tree"]
    assert [i.file for i in ds.splits["train"]] == ["JPEGImages/1.png"]
    assert [i.file for i in ds.splits["val"]] == ["JPEGImages/2.png"]
    np.testing.assert_array_equal(ds.splits["train"][0].boxes, [[10, 10, 50, 40], [60, 50, 100, 80]])
    assert ds.splits["val"][0].boxes.shape == (0, 4)
    assert kinds(ds) == {"clipped": 1, "unknown_class": 1, "zero_area": 1, "malformed": 3, "image_missing": 1}
    assert {p.file for p in ds.problems if p.kind == "malformed"} == {"Annotations/2.xml", "Annotations/bomb.xml",
                                                                      "Annotations/cut.xml"}
    assert read_boxes(tmp_path).classes == ["bush", "tree"]  # without a list: the names found, sorted


def test_a_folder_without_annotations_is_one_clear_error(tmp_path):
    write(tmp_path, {"a.png": png(10, 10)})
    with pytest.raises(DataError, match="no COCO JSON, YOLO data.yaml or Pascal VOC XML"):
        read_boxes(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_boxes(tmp_path / "absent")




def test_deepforest_voc_files_read_without_problems(tmp_path):
    """PyPI's deepforest wheel ships real aerial images with Pascal VOC XML: a real-world check."""
    try:
        import deepforest
    except ImportError:
        pytest.skip("deepforest is not installed (pip install deepforest) — its VOC files are the real check")
    data = Path(deepforest.__file__).parent / "data"
    xmls = sorted(data.glob("*.xml"))
    if not xmls:
        pytest.skip(f"no VOC XML files under {data}")
    for xml in xmls:
        shutil.copy(xml, tmp_path / xml.name)
        for image in data.glob(xml.stem + ".*"):
            if image.suffix.lower() in (".png", ".jpg", ".tif", ".tiff"):
                shutil.copy(image, tmp_path / image.name)
    ds = read_boxes(tmp_path, fmt="voc")
    boxes = sum(len(i.labels) for items in ds.splits.values() for i in items)
    assert boxes > 100 and "Tree" in ds.classes and not ds.problems  # deepforest 2.1.0: 951 boxes, 4 images
