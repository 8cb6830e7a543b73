"""Named datasets, resolved offline first: decoded cache → local files → checksummed download."""
from __future__ import annotations

import gzip
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from cvrecipe.data.cache import load_arrays, save_arrays
from cvrecipe.data.dataset import DataError, ImageDataset, Split
from cvrecipe.data.download import fetch

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# (base URL, md5 of each IDX_FILES entry) for the original distributions
FASHION_REMOTE = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                  ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                   "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12e480ee83cd310"))
MNIST_REMOTE = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
CIFAR10_REMOTE = ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")
CIFAR100_REMOTE = ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8")


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX file declares shape {tuple(dims)} but holds {body.size} bytes")
    return body.reshape(tuple(int(d) for d in dims))


def _idx_dataset(name: str, classes: list[str], files: list[Path], hflip_ok: bool) -> ImageDataset:
    arrays = []
    for path in files:
        try:
            arrays.append(read_idx(gzip.decompress(path.read_bytes())))
        except (OSError, EOFError, DataError) as err:
            raise DataError(f"{name}: cannot read {path}: {err}") from err
    train_x, train_y, test_x, test_y = arrays
    return ImageDataset(name, classes, train=Split(train_x[:, None], train_y), test=Split(test_x[:, None], test_y),
                        hflip_ok=hflip_ok)


def _idx_files(cache: Path, remote: tuple, local_dirs: list[Path]) -> list[Path]:
    for folder in local_dirs:
        if all((folder / f).is_file() for f in IDX_FILES):
            return [folder / f for f in IDX_FILES]
    base, md5s = remote
    return [fetch(base + f, cache / f, md5) for f, md5 in zip(IDX_FILES, md5s)]


def fashion_mnist(cache: Path) -> ImageDataset:
    raw = cache / "raw" / "fashion-mnist"
    files = _idx_files(raw, FASHION_REMOTE, [raw, DEBIAN_FASHION_DIR])
    return _idx_dataset("fashion-mnist", FASHION_CLASSES, files, hflip_ok=True)


def mnist(cache: Path) -> ImageDataset:
    raw = cache / "raw" / "mnist"
    files = _idx_files(raw, MNIST_REMOTE, [raw])
    return _idx_dataset("mnist", [str(i) for i in range(10)], files, hflip_ok=False)


def _cifar_binary(archive: Path, label_bytes: int, label_offset: int, train_names, test_names):
    """CIFAR binary records: label byte(s) then 3072 bytes of R, G, B planes (32×32 each)."""
    record = label_bytes + 3072
    splits = {}
    with tarfile.open(archive) as tf:
        members = {Path(m.name).name: m for m in tf if m.isfile()}
        for split, names in (("train", train_names), ("test", test_names)):
            raw = b"".join(tf.extractfile(members[n]).read() for n in names)
            rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
            splits[split] = Split(rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy(),
                                  rows[:, label_offset].astype(np.int64))
        meta_names = [n for n in members if n.endswith("meta.txt") and "coarse" not in n]
        labels = tf.extractfile(members[meta_names[0]]).read().decode().split()
    return splits, labels


def cifar10(cache: Path) -> ImageDataset:
    url, md5 = CIFAR10_REMOTE
    archive = fetch(url, cache / "raw" / url.rsplit("/", 1)[-1], md5)
    splits, labels = _cifar_binary(archive, 1, 0, [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"])
    return ImageDataset("cifar10", labels, hflip_ok=True, **splits)


def cifar100(cache: Path) -> ImageDataset:
    url, md5 = CIFAR100_REMOTE
    archive = fetch(url, cache / "raw" / url.rsplit("/", 1)[-1], md5)
    splits, labels = _cifar_binary(archive, 2, 1, ["train.bin"], ["test.bin"])  # (coarse, fine) labels
    return ImageDataset("cifar100", labels, hflip_ok=True, **splits)


def digits(cache: Path) -> ImageDataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, values 0..16); a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    from cvrecipe.data.dataset import stratified_split

    bunch = load_digits()
    x = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, 0.2, seed=0)
    return ImageDataset("digits", [str(i) for i in range(10)], train=Split(x[train_idx], y[train_idx]),
                        test=Split(x[test_idx], y[test_idx]), hflip_ok=False)


REGISTRY: dict[str, Callable[[Path], ImageDataset]] = {
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "digits": digits,
}


def load_named(name: str, cache: Path, lazy: bool = False) -> ImageDataset:
    """A registered dataset, from the decoded cache when present (milliseconds), else from source
    (then cached). `lazy`: images stay on disk as ShardedArray views (see cache.load_arrays)."""
    if name not in REGISTRY:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(REGISTRY)} or folder:PATH")
    entry = cache / f"named-{name}-v2"  # v2: the sharded entry layout (cache.py)
    if not (entry / "meta.json").is_file():
        ds = REGISTRY[name](cache)
        arrays = {}
        for split in ("train", "val", "test"):
            part = getattr(ds, split)
            if part is not None:
                arrays[f"{split}_x"], arrays[f"{split}_y"] = part.x, part.y
        save_arrays(entry, arrays, {"classes": ds.classes, "hflip_ok": ds.hflip_ok})
        if not lazy:
            return ds
    arrays, meta = load_arrays(entry, lazy)
    splits = {s: Split(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in ("train", "val", "test") if f"{s}_x" in arrays}
    return ImageDataset(name, meta["classes"], hflip_ok=meta["hflip_ok"], **splits)
