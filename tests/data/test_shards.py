"""The sharded cache: arrays in .npy shards read by row, folders decoded in chunks straight into
shards (checked against decoding every image at once, the reference), and load_dataset keeping a
dataset over the memory budget on disk."""
import numpy as np
import pytest

from cvrecipe.config import DataConfig
from cvrecipe.data import ShardedArray, load_dataset, streamed
from cvrecipe.data import folder as folder_source
from cvrecipe.data import shards
from cvrecipe.data.folder import _iter_entries
from cvrecipe.data.images import decode_images
from cvrecipe.data.shards import ShardWriter, write_sharded
from conftest import make_image_folder


def test_sharded_array_reads_what_numpy_indexing_gives(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (103, 3, 4, 5), dtype=np.uint8)
    write_sharded(tmp_path / "s", a, shard_bytes=37 * a[0].nbytes)  # 3 shards, the last one short
    s = ShardedArray.open(tmp_path / "s")
    assert len(s.files) == 3 and s.shape == a.shape and s.dtype == a.dtype and s.nbytes == a.nbytes
    idx = rng.permutation(103)[:60]
    for key in (idx, slice(5, 90, 3), slice(None), [4, 4, 0], np.arange(103) % 2 == 0, -1, 36, 37):
        assert np.array_equal(s[key], a[key]), key
    view = s.take(idx).take(np.arange(10, 40))  # views of views read nothing until indexed
    assert np.array_equal(np.asarray(view), a[idx][10:40])
    out = np.empty((5, 3, 4, 5), np.uint8)
    s.read(np.array([102, 0, 36, 37, 1]), out)  # into a caller's buffer, across shard edges
    assert np.array_equal(out, a[[102, 0, 36, 37, 1]])
    with pytest.raises(IndexError):
        s[[103]]
    np.save(tmp_path / "one.npy", a)  # a plain .npy file is a one-shard array
    assert np.array_equal(ShardedArray.open(tmp_path / "one.npy")[idx], a[idx])


def test_shard_writer_takes_rows_in_any_order_and_keeps_the_listed_ones(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (50, 2, 3), dtype=np.uint8)
    writer = ShardWriter(tmp_path / "w", 50, (2, 3), np.uint8, shard_bytes=7 * 6)
    filled = rng.permutation(50)[:41]  # nine rows never arrive (files that did not decode)
    for part in np.array_split(filled, 4):
        writer.write(part, a[part])
    writer.close(np.sort(filled))
    assert np.array_equal(np.asarray(ShardedArray.open(tmp_path / "w")), a[np.sort(filled)])


def test_a_folder_decodes_in_chunks_into_shards_as_one_decode_of_every_image(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 30, "val": 5, "test": 7}, size=12)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    monkeypatch.setattr(folder_source, "DECODE_CHUNK", 16)  # many chunks, each written as it is decoded
    monkeypatch.setattr(shards, "SHARD_BYTES", 10 * 3 * 12 * 12)  # and many shards
    ds = folder_source.load_folder(data, None, None, tmp_path / "cache", lazy=True)
    assert isinstance(ds.train.x, ShardedArray) and len(ds.train.x.files) > 5
    assert [name for name, _ in ds.skipped] == ["train/cat/broken.jpg"]

    entries = {rel: read() for rel, read in _iter_entries(data) if read is not None}  # the reference: all at once
    for split in ("train", "val", "test"):
        names = [[rel for rel in sorted(entries) if rel.startswith(f"{split}/{c}/")] for c in ("cat", "dog", "fox")]
        x, good, _ = decode_images([(rel, entries[rel]) for group in names for rel in group], 3, None)
        labels = np.concatenate([np.full(len(group), label) for label, group in enumerate(names)])[good]
        part = getattr(ds, split)
        assert np.array_equal(np.asarray(part.x), x) and np.array_equal(part.y, labels)
    again = folder_source.load_folder(data, None, None, tmp_path / "cache")  # from the cache, read whole
    assert isinstance(again.train.x, np.ndarray) and np.array_equal(again.train.x, np.asarray(ds.train.x))


def test_load_dataset_streams_only_what_exceeds_the_memory_budget(tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 10}, size=16)
    name = f"folder:{data}"
    whole = load_dataset(DataConfig(name=name), seed=3)
    on_disk = load_dataset(DataConfig(name=name, memory_gb=10_000 / 2**30), seed=3)  # 10 kB: far too small
    assert not streamed(whole) and isinstance(whole.train.x, np.ndarray)
    assert streamed(on_disk) and isinstance(on_disk.val.x, ShardedArray)
    for split in ("train", "val", "test"):  # the same seeded val carving, the same images and labels
        assert np.array_equal(np.asarray(getattr(on_disk, split).x), getattr(whole, split).x)
        assert np.array_equal(getattr(on_disk, split).y, getattr(whole, split).y)
