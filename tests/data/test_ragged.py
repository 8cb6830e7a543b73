"""Ragged boxes: flat (M, 6) rows plus offsets, per-batch selection, collate, and the uint8 cache."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from cvrecipe.data.boxes import BoxImage
from cvrecipe.data.ragged import boxes_from_cache, boxes_to_cache, collate, flatten, take, to_targets, unflatten


def sample(rng, counts):
    boxes = [np.sort(rng.uniform(0, 50, (n, 4)).astype(np.float32).reshape(n, 2, 2), axis=1).transpose(0, 2, 1)
             .reshape(n, 4) for n in counts]
    return boxes, [rng.integers(0, 5, n) for n in counts]


def test_flatten_round_trips_and_take_reindexes_a_batch():
    rng = np.random.default_rng(0)
    boxes, labels = sample(rng, [3, 0, 2, 5])
    flat, offsets = flatten(boxes, labels)
    assert flat.shape == (10, 6) and offsets.tolist() == [0, 3, 3, 5, 10]
    back_boxes, back_labels = unflatten(flat, offsets)
    for a, b, la, lb in zip(boxes, back_boxes, labels, back_labels):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    part, part_offsets = take(flat, offsets, np.array([3, 1, 0]))
    assert part_offsets.tolist() == [0, 5, 5, 8]
    np.testing.assert_array_equal(part[:5, :4], boxes[3])
    np.testing.assert_array_equal(part[:, 5], [0] * 5 + [2] * 3)


def test_collate_splits_a_shuffled_batch_back_per_image():
    rng = np.random.default_rng(1)
    boxes, labels = sample(rng, [2, 0, 4])
    flat = torch.from_numpy(flatten(boxes, labels)[0])
    shuffled = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))]
    out_boxes, out_labels = collate(shuffled, batch_size=3)
    assert [len(b) for b in out_boxes] == [2, 0, 4]
    for mine, theirs in zip(out_boxes, boxes):  # order within an image may change: compare as sets of rows
        assert sorted(map(tuple, mine.tolist())) == sorted(map(tuple, torch.from_numpy(theirs).tolist()))
    targets = to_targets(flat, 3)
    assert targets[2]["labels"].dtype == torch.int64 and targets[2]["labels"].tolist() == labels[2].tolist()


def test_the_cache_stores_images_resized_with_their_boxes_rescaled(tmp_path):
    def png(w, h):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    files = {"a.png": png(100, 50), "b.png": png(20, 40), "bad.png": b"not an image"}
    items = [BoxImage("a.png", 100, 50, np.array([[10, 10, 50, 40]], np.float32), np.array([1])),
             BoxImage("b.png", 20, 40, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
             BoxImage("bad.png", 10, 10, np.array([[1, 1, 2, 2]], np.float32), np.array([0]))]
    skipped = boxes_to_cache(tmp_path / "entry", lambda names: {n: files[n] for n in names}, {"train": items},
                             ["x", "y"], (32, 64))
    assert [name for name, _ in skipped["train"]] == ["bad.png"]
    splits, meta = boxes_from_cache(tmp_path / "entry")
    x, flat, offsets = splits["train"]
    assert x.shape == (2, 3, 32, 64) and x.dtype == np.uint8 and offsets.tolist() == [0, 1, 1]
    np.testing.assert_allclose(flat[0], [6.4, 6.4, 32, 25.6, 1, 0], rtol=1e-6)  # (64/100, 32/50) scaling
    assert meta["classes"] == ["x", "y"]
