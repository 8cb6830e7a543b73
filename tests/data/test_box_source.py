"""`boxes:PATH`: a detection set as an ImageDataset whose targets are ragged boxes, cached."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvrecipe.config import DataConfig
from cvrecipe.data import DataError, load_dataset
from cvrecipe.data.box_targets import BoxTargets
from cvrecipe.data.boxes import read_boxes
from cvrecipe.data.sources import digits
from cvrecipe.data.synth_detect import compose, write_split

CLASSES = 3


def synth_set(out: Path, splits=(("train", 12, 1), ("val", 4, 2)), size=(48, 72), max_objects=3) -> Path:
    """A tiny synthetic detection set: digits 0, 1 and 2 pasted on dark noise, in COCO JSON."""
    ds = digits(Path("."))
    keep = ds.train.y < CLASSES
    bg = np.random.default_rng(0).integers(0, 60, (4, 3, 16, 16)).astype(np.uint8)
    for split, n, seed in splits:
        items = compose(ds.train.x[keep], ds.train.y[keep], bg, n, size, seed=seed, max_objects=max_objects)
        write_split(out, split, items, [str(i) for i in range(CLASSES)])
    return out


def test_boxes_load_rescaled_into_the_cached_frame_and_reload_from_the_cache(tmp_path):
    path = synth_set(tmp_path / "set")
    cfg = DataConfig(name=f"boxes:{path}", image_size=64, cache_dir=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    truth = read_boxes(path)
    assert ds.train.boxes and ds.val.boxes and ds.test is None and not ds.masks
    assert ds.train.x.shape == (12, 3, 64, 64) and len(ds.val) == 4
    for i, item in enumerate(truth.splits["train"]):
        boxes, labels = ds.train.y.boxes_of(i)
        scale = np.asarray([64 / item.width, 64 / item.height] * 2, np.float32)
        np.testing.assert_allclose(boxes, item.boxes * scale, rtol=1e-5)
        np.testing.assert_array_equal(labels, item.labels)
    again = load_dataset(cfg)  # from the cache entry
    np.testing.assert_array_equal(again.train.y.flat, ds.train.y.flat)
    np.testing.assert_array_equal(again.train.x, ds.train.x)


def test_val_is_carved_from_train_by_image_with_its_boxes(tmp_path):
    path = synth_set(tmp_path / "set", splits=(("train", 10, 1), ("test", 3, 2)))
    ds = load_dataset(DataConfig(name=f"boxes:{path}", image_size=48, val_fraction=0.3,
                                 cache_dir=str(tmp_path / "cache")), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 3, 3)
    whole = load_dataset(DataConfig(name=f"boxes:{path}", image_size=48, val_fraction=0,
                                    cache_dir=str(tmp_path / "cache")))
    # every carved image keeps exactly the boxes it had: find each val image among the full train split
    for i in range(len(ds.val)):
        j = next(j for j in range(len(whole.train)) if (whole.train.x[j] == ds.val.x[i]).all())
        np.testing.assert_array_equal(ds.val.y.boxes_of(i)[0], whole.train.y.boxes_of(j)[0])


def test_taking_rows_renumbers_the_image_column():
    flat = np.asarray([[0, 0, 1, 1, 2, 0], [1, 1, 2, 2, 3, 1], [2, 2, 3, 3, 4, 1], [5, 5, 6, 6, 0, 3]], np.float32)
    targets = BoxTargets(flat, np.asarray([0, 1, 3, 3, 4]))
    part = targets[np.asarray([3, 1])]
    np.testing.assert_array_equal(part.offsets, [0, 1, 3])
    np.testing.assert_array_equal(part.flat[:, 5], [0, 1, 1])
    np.testing.assert_array_equal(part.labels, [0, 3, 4])
    assert len(targets[1:3]) == 2 and len(targets[1:3].flat) == 2
    with pytest.raises(ValueError, match="offsets"):
        BoxTargets(flat, np.asarray([0, 1, 5]))


def test_a_boxes_source_needs_an_image_size_and_an_existing_path(tmp_path):
    path = synth_set(tmp_path / "set", splits=(("train", 2, 1),))
    with pytest.raises(DataError, match="data.image_size"):
        load_dataset(DataConfig(name=f"boxes:{path}", cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match="box dataset not found"):
        load_dataset(DataConfig(name=f"boxes:{tmp_path / 'nope'}", image_size=32, cache_dir=str(tmp_path / "c")))
