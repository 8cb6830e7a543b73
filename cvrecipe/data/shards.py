"""Arrays larger than memory: consecutive rows stored in .npy shards, read on demand.

A sharded array is a folder:

    index.json   {"shape": [N, C, H, W], "dtype": "|u1", "shards": [{"file": "00000.npy", "rows": n0}, ...]}
    00000.npy    rows 0 .. n0-1 as an ordinary .npy file (so np.load(..., mmap_mode="r") opens it too)
    00001.npy    ...
    rows.npy     (only when some stored rows are unused, e.g. files that failed to decode) the rows kept

`ShardedArray` is a read-only view of such a folder (or of one plain .npy file) that looks enough
like a numpy array for the data code: `len`, `shape`, `dtype`, `x[i]`, `x[a:b]`, `x[index_array]`
(each returns an ordinary array in memory), and `take(index)`, which returns another view without
reading anything. Rows are read with `os.preadv` straight into the destination buffer rather than
through a memory map: mapped file pages count as the process's resident memory until the kernel
needs them back, so a streamed epoch over a memory-mapped 6 GB dataset shows 6 GB resident, while
reads leave the page cache to the kernel and the process holds only the batches it asked for.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SHARD_BYTES = 256 * 2**20  # shard size: large enough that a 1.28 M-image dataset is a few hundred files
INDEX = "index.json"
ROWS = "rows.npy"


class ShardedArray:
    """A read-only (N, ...) array in .npy shards, rows read on demand. See the module docstring."""

    def __init__(self, files: list[Path], counts: list[int], row_shape: tuple[int, ...], dtype: np.dtype,
                 rows: np.ndarray | None = None, offsets: list[int] | None = None):
        self.files, self.counts = [Path(f) for f in files], list(counts)
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # first stored row per shard
        self.rows = None if rows is None else np.asarray(rows, np.int64)  # stored rows of this view; None: all
        self._offsets = offsets  # byte offset of the data in each shard file (after the .npy header)
        self._fds: dict[int, int] = {}

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> "ShardedArray":
        """A sharded folder (with index.json) or a single .npy file (one shard)."""
        path = Path(path)
        if path.is_dir():
            index = json.loads((path / INDEX).read_text())
            shards = index["shards"]
            rows = np.load(path / ROWS) if (path / ROWS).is_file() else None
            return cls([path / s["file"] for s in shards], [s["rows"] for s in shards], index["shape"][1:],
                       np.dtype(index["dtype"]), rows)
        shape, dtype, offset = _npy_header(path)
        return cls([path], [shape[0]], shape[1:], dtype, None, [offset])

    # -- what numpy code asks of an array --------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def __getitem__(self, key) -> np.ndarray:
        """Rows as an array in memory: an int gives one row, a slice or an index array several."""
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        return self.read(np.asarray(key))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return np.asarray(self).astype(dtype)

    def take(self, index) -> "ShardedArray":
        """A view of the rows `index` (positions in this view); nothing is read."""
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        rows = index if self.rows is None else self.rows[index]
        return ShardedArray(self.files, self.counts, self.row_shape, self.dtype, rows, self._offsets)

    # -- reading ---------------------------------------------------------------------------------
    def read(self, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `index` (positions in this view; bools select) into `out` (a C-contiguous
        (len(index), ...) array of this dtype, e.g. a pinned buffer's numpy view) or a new array.
        Rows are read in storage order, and runs of neighbouring rows in one call."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for a sharded array of {n} rows")
        stored = np.where(index < 0, index + n, index).astype(np.int64)
        if self.rows is not None:
            stored = self.rows[stored]
        if out is None:
            out = np.empty((len(stored), *self.row_shape), self.dtype)
        if not len(stored) or not self.row_bytes:
            return out
        flat = out.reshape(len(stored), -1).view(np.uint8)
        for shard, first_pos, dest, count in self._runs(stored):
            self._pread(shard, first_pos, flat[dest:dest + count])
        return out

    def _runs(self, stored: np.ndarray):
        """(shard, row in shard, first output position, rows) for runs of consecutive stored rows
        that also sit next to each other in the output."""
        if not len(stored):
            return
        order = np.argsort(stored, kind="stable")
        rows = stored[order]
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        # a run breaks where the stored row, the output position or the shard does not continue
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(order) != 1) | (np.diff(shard) != 0)) + 1
        firsts = np.concatenate([[0], breaks])
        lengths = np.diff(np.concatenate([firsts, [len(rows)]]))
        for first, length in zip(firsts.tolist(), lengths.tolist()):
            s = int(shard[first])
            yield s, int(rows[first] - self.starts[s]), int(order[first]), length

    def _pread(self, shard: int, row: int, dest: np.ndarray) -> None:
        fd = self._fd(shard)
        offset = self._offset(shard) + row * self.row_bytes
        view, done = memoryview(dest).cast("B"), 0
        while done < len(view):  # a regular file reads whole, but a short read is allowed by POSIX
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.files[shard]}: unexpected end of file at byte {offset + done}")
            done += got

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:  # threads may race here; a second descriptor is harmless and closed with the view
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return fd

    def _offset(self, shard: int) -> int:
        if self._offsets is None:
            self._offsets = [_checked_offset(f, c, self.row_shape, self.dtype) for f, c in zip(self.files, self.counts)]
        return self._offsets[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # descriptors do not travel to another process

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.files)})"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays cannot be read by rows")
        return tuple(shape), dtype, f.tell()


def _checked_offset(path: Path, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    shape, file_dtype, offset = _npy_header(path)
    if shape != (rows, *row_shape) or file_dtype != dtype:
        raise ValueError(f"{path}: holds {file_dtype} {shape}, its index says {dtype} {(rows, *row_shape)}; "
                         f"the shard folder is damaged (delete it to rebuild the cache)")
    return offset


class ShardWriter:
    """Writes an (N, ...) array into a shard folder; rows may arrive in any order and in pieces
    (decoding a tar file visits images in archive order, not in their final order).

    The shard files are created at full size up front and filled with positioned writes, so the
    writer holds no rows itself. `close(keep)` writes the index; `keep` lists the rows that were
    filled, when some never were (files that did not decode)."""

    def __init__(self, folder: Path, rows: int, row_shape: tuple[int, ...], dtype, shard_bytes: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows, self.row_shape, self.dtype = rows, tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        per_shard = max(1, (shard_bytes or SHARD_BYTES) // max(1, self.row_bytes))
        self.counts = [min(per_shard, rows - start) for start in range(0, rows, per_shard)] or [0]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.names = [f"{i:05d}.npy" for i in range(len(self.counts))]
        self.offsets, self.fds = [], []
        for name, count in zip(self.names, self.counts):
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (count, *self.row_shape)}
            with open(self.folder / name, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                self.offsets.append(f.tell())
                f.truncate(f.tell() + count * self.row_bytes)  # sparse until written
            self.fds.append(os.open(self.folder / name, os.O_WRONLY))

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """values[i] → stored row rows[i]."""
        if not len(rows):
            return
        values = np.ascontiguousarray(values, self.dtype).reshape(len(rows), -1).view(np.uint8)
        rows = np.asarray(rows, np.int64)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for i in range(len(rows)):  # one write per row: rows arrive in batches of a few thousand
            s = int(shard[i])
            offset = self.offsets[s] + int(rows[i] - self.starts[s]) * self.row_bytes
            os.pwrite(self.fds[s], values[i].data, offset)

    def write_block(self, first: int, values: np.ndarray) -> None:
        """Consecutive rows starting at `first`, a few writes per shard crossed."""
        values = np.ascontiguousarray(values, self.dtype)
        done = 0
        while done < len(values):
            row = first + done
            s = int(np.searchsorted(self.starts, row, side="right") - 1)
            n = min(len(values) - done, int(self.starts[s + 1] - row))
            data = memoryview(values[done:done + n].reshape(-1).view(np.uint8))
            offset, written = self.offsets[s] + int(row - self.starts[s]) * self.row_bytes, 0
            while written < len(data):
                written += os.pwrite(self.fds[s], data[written:], offset + written)
            done += n

    def close(self, keep: np.ndarray | None = None) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if keep is not None:
            np.save(self.folder / ROWS, np.asarray(keep, np.int64))
        index = {"shape": [self.rows, *self.row_shape], "dtype": self.dtype.str,
                 "shards": [{"file": name, "rows": count} for name, count in zip(self.names, self.counts)]}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))


def write_sharded(folder: Path, array: np.ndarray, shard_bytes: int | None = None) -> None:
    """An in-memory array as a shard folder."""
    writer = ShardWriter(folder, len(array), array.shape[1:], array.dtype, shard_bytes)
    writer.write_block(0, array)
    writer.close()


def take_rows(array, index: np.ndarray):
    """array[index]: a copy for a numpy array, a view (nothing read) for a ShardedArray."""
    return array.take(index) if isinstance(array, ShardedArray) else array[index]


def slice_rows(array, start: int, stop: int):
    """array[start:stop]: a view either way (a numpy slice, or a ShardedArray view that reads nothing)."""
    return array.take(np.arange(start, stop)) if isinstance(array, ShardedArray) else array[start:stop]


def in_memory(array) -> np.ndarray:
    """The array itself when it is in memory; a ShardedArray read whole."""
    return np.asarray(array) if isinstance(array, ShardedArray) else array
