"""The decoded-image cache: uint8 arrays stored once per content key, reloaded in milliseconds.

An entry is a folder: meta.json, then per array either NAME.npy or, for arrays larger than one
shard (shards.SHARD_BYTES), a shard folder NAME/ (index.json + .npy shards; see shards.py).
Loaded eagerly, every array is an ordinary numpy array; loaded lazily, arrays of images (more
than one dimension) stay on disk as ShardedArray views and are read a batch at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cvrecipe.data import shards
from cvrecipe.data.shards import ShardedArray, ShardWriter, write_sharded

CACHE_ENV = "CVRECIPE_CACHE"


def cache_root(override: str | None = None) -> Path:
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cvrecipe"
    return Path(root)


def load_arrays(folder: Path, lazy: bool = False) -> tuple[dict, dict] | None:
    """Arrays and metadata saved by `save_arrays` or an EntryWriter, or None when the entry is
    absent or incomplete. `lazy`: arrays with more than one dimension come back as ShardedArray
    views (nothing read yet); 1-D arrays (labels) are always read."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {}
    for name in meta["arrays"]:
        path = folder / name if (folder / name).is_dir() else folder / f"{name}.npy"
        array = ShardedArray.open(path)
        if not lazy or array.ndim == 1:
            array = np.load(path) if path.suffix == ".npy" else np.asarray(array)
        arrays[name] = array
    return arrays, meta


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write all arrays and meta.json into a temp folder, then rename it into place atomically."""
    with EntryWriter(folder) as entry:
        for name, array in arrays.items():
            entry.add(name, array)
        entry.commit(meta)


class EntryWriter:
    """Builds a cache entry in a temp folder beside it and renames it into place on commit(), so a
    reader never sees half an entry; on an exception the temp folder is removed.

    Arrays are added whole (`add`) or, when they do not fit in memory, written row by row through
    a ShardWriter (`sharded`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=self.folder.name + ".tmp"))
        self.names: list[str] = []

    def add(self, name: str, array: np.ndarray) -> None:
        if array.nbytes > shards.SHARD_BYTES:
            write_sharded(self.tmp / name, array)
        else:
            np.save(self.tmp / f"{name}.npy", np.ascontiguousarray(array))
        self.names.append(name)

    def sharded(self, name: str, rows: int, row_shape: tuple[int, ...], dtype) -> ShardWriter:
        self.names.append(name)
        return ShardWriter(self.tmp / name, rows, row_shape, dtype)

    def commit(self, meta: dict) -> None:
        (self.tmp / "meta.json").write_text(json.dumps({**meta, "arrays": sorted(self.names)}, indent=1))
        if self.folder.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(self.tmp)
            return
        try:
            os.replace(self.tmp, self.folder)
        except OSError:  # ENOTEMPTY/EEXIST: another process renamed its entry in between the check and here
            if not self.folder.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():  # not committed: an exception, or a commit that found the entry taken
            shutil.rmtree(self.tmp, ignore_errors=True)
