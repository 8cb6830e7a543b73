import gzip
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvrecipe.config import DataConfig
from cvrecipe.data import DataError, load_dataset, load_source
from cvrecipe.data.dataset import stratified_split
from cvrecipe.data.sources import read_idx

from conftest import SHARED_DATA, encode, make_image_folder, pattern_image


def test_idx_roundtrip_and_bad_magic():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array(arr.shape, ">i4").tobytes() + arr.tobytes()
    assert np.array_equal(read_idx(raw), arr)
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x00\x00\x09\x01" + raw[4:])
    with pytest.raises(DataError, match="declares shape"):
        read_idx(raw[:-1])


def test_digits_offline_with_stratified_val():
    ds = load_dataset(DataConfig(name="digits", val_fraction=0.2), seed=0)
    assert ds.image_shape == (1, 8, 8) and len(ds.classes) == 10
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    counts = np.bincount(ds.val.y, minlength=10)
    assert counts.min() >= 0.15 * len(ds.val) / 10  # every class represented in val


def test_stratified_split_is_seeded_and_disjoint():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep, held = stratified_split(y, 0.25, seed=3)
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == 100
    assert np.bincount(y[held]).tolist() == [2, 5, 8, 10]  # round(n * 0.25) per class
    assert np.array_equal(held, stratified_split(y, 0.25, seed=3)[1])


@pytest.mark.skipif(not (shutil.which("dpkg") and __import__("pathlib").Path(
    "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()),
    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    ds = load_source("fashion-mnist")
    assert ds.image_shape == (1, 28, 28) and len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.classes[0] == "T-shirt/top" and np.bincount(ds.train.y).tolist() == [6000] * 10


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_folder_dir_and_archives_agree(tmp_path, kind):
    src = make_image_folder(tmp_path / "imgs")
    if kind == "dir":
        path = src
    elif kind == "tar.gz":
        path = tmp_path / "imgs.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(src, arcname="wrapped")  # one wrapping top-level folder is allowed
    else:
        path = tmp_path / "imgs.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(src.rglob("*.jpg")):
                zf.write(f, f.relative_to(src).as_posix())
    ds = load_source(f"folder:{path}")
    reference = load_source(f"folder:{src}")
    assert ds.classes == ["cat", "dog", "fox"] and ds.image_shape == (3, 16, 16)
    assert np.array_equal(ds.train.x, reference.train.x) and np.array_equal(ds.test.y, reference.test.y)


def test_only_train_gets_a_stratified_val_split(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 20})
    ds = load_dataset(DataConfig(name=f"folder:{tmp_path}", val_fraction=0.25), seed=1)
    assert ds.test is None and np.bincount(ds.val.y).tolist() == [5, 5, 5]
    assert ds.eval_split[0] == "val"


def _png(arr, mode):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_are_skipped_named_and_modes_converted(tmp_path):
    rng = np.random.default_rng(0)
    make_image_folder(tmp_path, per_class={"train": 12, "test": 4}, size=16)
    good = encode(pattern_image(0, 16, rng))
    cat = tmp_path / "train" / "cat"
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "notes.txt": b"this is not an image",
        "fake.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,
    }
    for name, data in bad.items():
        (cat / name).write_bytes(data)
    img = pattern_image(1, 16, rng)
    converted = {
        "gray.png": _png(img[..., 0], "L"),
        "rgba.png": _png(img, "RGBA"),
        "palette.png": _png(img, "P"),
        "cmyk.jpg": encode(img, "JPEG", mode="CMYK"),
        "big.jpg": encode(np.repeat(np.repeat(img, 3, 0), 3, 1)),  # 48x48: resized to 16x16
    }
    wide = np.zeros((16, 16), np.uint16) + 40000
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")  # 16-bit grayscale
    converted["sixteen.png"] = buf.getvalue()
    for name, data in converted.items():
        (cat / name).write_bytes(data)

    with pytest.warns(UserWarning, match=r"skipped 4 unreadable file\(s\) .*; all listed in ") as warned:
        ds = load_source(f"folder:{tmp_path}")
    listing = Path(str(warned[-1].message).rsplit("all listed in ", 1)[1]).read_text()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in listing.splitlines()) == sorted(bad)
    skipped = {name.rsplit("/", 1)[-1]: reason for name, reason in ds.skipped}
    assert set(skipped) == set(bad)
    assert "empty" in skipped["empty.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert len(ds.train) == 3 * 12 + len(converted) and ds.image_shape == (3, 16, 16)
    sixteen = ds.train.x[[i for i, y in enumerate(ds.train.y) if y == 0]]
    assert (np.abs(sixteen.astype(int) - round(40000 / 65535 * 255)) <= 1).all(axis=(1, 2, 3)).any()


def test_mostly_unreadable_one_class_and_empty_split_stop_with_names(tmp_path):
    junk = tmp_path / "junk"
    for cls in ("a", "b"):
        (junk / "train" / cls).mkdir(parents=True)
        for i in range(5):
            (junk / "train" / cls / f"{i}.jpg").write_bytes(b"garbage")
    (junk / "train" / "a" / "ok.jpg").write_bytes(encode(pattern_image(0, 8, np.random.default_rng(0))))
    with pytest.raises(DataError, match="10 of 11 files could not be read"):
        load_source(f"folder:{junk}")

    one = make_image_folder(tmp_path / "one", classes=("only",), per_class={"train": 5})
    with pytest.raises(DataError, match="1 class"):
        load_dataset(DataConfig(name=f"folder:{one}"))

    empty = make_image_folder(tmp_path / "empty", per_class={"train": 5})
    (empty / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"\['test'\] contain no"):
        load_source(f"folder:{empty}")

    with pytest.raises(DataError, match="not found"):
        load_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_source("imagenet")


def test_decoded_cache_is_reused_and_keyed_by_content(tmp_path, isolated_cache):
    src = make_image_folder(tmp_path / "imgs", per_class={"train": 5, "test": 2})
    first = load_source(f"folder:{src}")
    entries = list(isolated_cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    second = load_source(f"folder:{src}")
    assert np.array_equal(first.train.x, second.train.x) and len(list(isolated_cache.iterdir())) == 1
    # changing a file's content makes a new cache entry
    f = src / "train" / "cat" / "0.jpg"
    f.write_bytes(encode(pattern_image(2, 16, np.random.default_rng(9))))
    load_source(f"folder:{src}")
    assert len(list(isolated_cache.iterdir())) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").exists(), reason="../shared/data not present")
def test_cifar10_jpeg_archive_real():
    ds = load_source(f"folder:{SHARED_DATA / 'cifar10-jpeg.tar.gz'}")
    assert len(ds.train) == 50000 and len(ds.test) == 10000 and ds.image_shape == (3, 32, 32)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and not ds.skipped


def test_pixel_mean_std_by_chunks_matches_torch_on_the_whole_set():
    from cvrecipe.data.dataset import pixel_mean_std

    x = np.random.default_rng(0).integers(0, 256, (500, 3, 6, 7), dtype=np.uint8)
    mean, std = pixel_mean_std(x, chunk=64)  # several chunks, the last one ragged
    pixels = torch.from_numpy(x).double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(mean, pixels.mean(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(1).numpy(), rtol=1e-9)  # unbiased, as torch.std
