"""The synthetic detection set: objects alpha-composited onto backgrounds, seeded, written twice."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvrecipe.cli import main
from cvrecipe.data.boxes import read_boxes
from cvrecipe.data.synth_detect import compose
from cvrecipe.data.sources import digits

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def small_objects():
    ds = digits(Path("."))
    return ds.train.x[:200], ds.train.y[:200]


def test_objects_sit_inside_their_boxes_on_a_black_background():
    x, y = small_objects()
    black = np.zeros((2, 3, 8, 8), np.uint8)
    items = compose(x, y, black, 12, (48, 80), seed=3)
    for item in items:
        h, w = item.image.shape[:2]
        assert 48 <= h <= 80 and 48 <= w <= 80
        assert 1 <= len(item.labels) <= 6 and set(item.labels.tolist()) <= set(range(10))
        assert (item.boxes[:, :2] >= 0).all() and (item.boxes[:, 2] <= w).all() and (item.boxes[:, 3] <= h).all()
        inside = np.zeros((h, w), bool)
        for x1, y1, x2, y2 in item.boxes.astype(int):
            inside[y1:y2, x1:x2] = True
            assert item.image[y1:y2, x1:x2].max() > 30  # something drawn in every box
        # outside every box only faint edges (alpha ≤ ALPHA_EDGE) may show: ≤ 0.1 · 255 · 0.415
        assert item.image[~inside].max() <= 11


def test_seeded_draws_repeat_and_differ_between_seeds():
    x, y = small_objects()
    bgs = np.random.default_rng(0).integers(0, 255, (4, 3, 8, 8), dtype=np.uint8)
    a, b, c = (compose(x, y, bgs, 3, (40, 60), seed=s) for s in (1, 1, 2))
    assert all((i.image == j.image).all() and (i.boxes == j.boxes).all() for i, j in zip(a, b))
    assert any(i.image.shape != j.image.shape or (i.image != j.image).any() for i, j in zip(a, c))


def noise_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split / "noise").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / "noise" / f"{i}.png")
    return root


def test_the_command_writes_yolo_and_coco_that_read_back_alike(tmp_path):
    out = tmp_path / "set"
    code = main(["data", "synth-detect", str(out), "--train", "6", "--test", "3", "--size", "40-64", "--seed", "5",
                 "--objects", "digits", "--backgrounds", f"folder:{noise_folder(tmp_path / 'bg')}"])
    assert code == 0
    yolo, coco = read_boxes(out, fmt="yolo"), read_boxes(out, fmt="coco")
    assert yolo.classes == coco.classes == [str(i) for i in range(10)]
    assert not yolo.problems and not coco.problems
    for split, count in (("train", 6), ("test", 3)):
        assert len(yolo.splits[split]) == len(coco.splits[split]) == count
        for a, b in zip(yolo.splits[split], coco.splits[split]):
            assert a.file == b.file
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3 * max(a.width, a.height))  # YOLO's 6 decimals
            np.testing.assert_array_equal(a.labels, b.labels)


def test_a_bad_size_range_is_one_error_line(tmp_path, capsys):
    code = main(["data", "synth-detect", str(tmp_path / "set"), "--size", "big", "--objects", "digits"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--size big" in err[0] and "MIN-MAX" in err[0]
    assert not (tmp_path / "set").exists()


@pytest.mark.slow
def test_the_default_set_from_fashion_mnist_and_cifar(tmp_path):
    if not SHARED.is_file():
        pytest.skip(f"the CIFAR-10 JPEG archive is not at {SHARED} (a clone without ../shared)")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    code = main(["data", "synth-detect", str(tmp_path / "set"), "--train", "4", "--test", "2",
                 "--backgrounds", f"folder:{SHARED}"])
    ds = read_boxes(tmp_path / "set", fmt="coco")
    assert code == 0 and ds.classes[0] == "T-shirt/top" and ds.counts()["test"][0] == 2
    assert os.path.getsize(tmp_path / "set" / "images" / "train" / "000000.jpg") > 1000
