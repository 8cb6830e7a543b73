"""The user's own images: a directory or a .tar/.tar.gz/.zip archive of split/class/image files.

Layout: `train/<class>/*` plus optionally `test/<class>/*` and/or `val/<class>/*` (also under one
wrapping top-level folder). Files are listed, then read once and decoded in chunks straight into
the cache's shard files (so a dataset larger than memory decodes too), cached by the archive's
content (for a directory, by its file list, sizes and modification times).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from cvrecipe.data.cache import EntryWriter, load_arrays
from cvrecipe.data.dataset import DataError, DataWarning, ImageDataset, Split
from cvrecipe.data.images import MAX_PIXELS, SMALL_FACTOR, decode_images, guess_channels

SPLITS = ("train", "val", "test")
CACHE_VERSION = 3  # bump when decoding or the entry layout changes, so no version reads another's
#                   (2: one grayscale rule; 3: sharded)
MAX_BAD_FRACTION = 0.5  # more unreadable files than this and the dataset is refused
DECODE_CHUNK = 1024  # images decoded at a time: ~0.5 GB at ImageNet's native sizes, wherever the data ends
SKIPPED_LIST = "skipped_files.txt"  # in the cache entry: every unreadable file and why (RUN/ has a copy)
SMALL_LIST = "small_images.txt"  # in the cache entry: every image upscaled more than SMALL_FACTOR times

# Warnings already given in this process: a command loads its dataset several times (train, then
# evaluate, then the report), and Python's own once-per-location filter is reset by every
# `warnings.catch_warnings()` block, so each load would repeat them.
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, DataWarning, stacklevel=2)


def listed(entry: Path, name: str, rows: list[tuple[str, str]]) -> Path:
    """entry/name with one `file<TAB>why` line per row (written once: the cache entry does not change)."""
    path = Path(entry) / name
    if not path.is_file():
        path.write_text("".join(f"{file}\t{why}\n" for file, why in rows))
    return path


def _is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def _iter_entries(path: Path):
    """Yield (relative path, read) for every file and (relative path, None) for every folder;
    read() returns the file's bytes, and only while the iteration stands at that entry (a tar
    archive is read as a stream), so a listing pass reads no image data."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in dirs:
                yield (Path(root) / name).relative_to(path).as_posix(), None
            for name in sorted(files):
                full = Path(root) / name
                yield full.relative_to(path).as_posix(), full.read_bytes
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                yield info.filename, None if info.is_dir() else (lambda info=info: zf.read(info))
    else:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isdir():
                    yield member.name, None
                elif member.isfile():
                    yield member.name, lambda member=member: tf.extractfile(member).read()


def _fingerprint(path: Path) -> str:
    """A content key: the archive's bytes, or a directory's (path, size, mtime) listing."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = (Path(root) / name).stat()
                rel = (Path(root) / name).relative_to(path).as_posix()
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:24]


def _group(path: Path) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """{split: {class: [(name, bytes)]}} following the split/class/file layout, every file read
    (for the data audit, which looks at each file's header)."""
    names = _list_files(path)
    wanted = {rel for by_class in names.values() for rels in by_class.values() for rel in rels}
    data = {rel: read() for rel, read in _iter_entries(path) if read is not None and rel in wanted}
    return {split: {cls: [(rel, data[rel]) for rel in rels] for cls, rels in by_class.items()}
            for split, by_class in names.items()}


def _list_files(path: Path) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [file name]}} following the split/class/file layout (names only: no image
    is read here)."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    stray, split_dirs = [], set()
    for rel, read in _iter_entries(path):
        parts = rel.strip("/").split("/")
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # hidden files and macOS archive debris are not images
        if len(parts) >= 2 and parts[0] not in SPLITS and parts[1] in SPLITS:
            parts = parts[1:]  # one wrapping top-level folder
        if parts[0] in SPLITS:
            split_dirs.add(parts[0])
        if read is None:
            continue
        if len(parts) == 3 and parts[0] in SPLITS:
            groups[parts[0]][parts[1]].append(rel)
        else:
            stray.append(rel)
    empty = sorted(split_dirs - set(groups))
    if empty:
        raise DataError(f"{path}: split folder(s) {empty} contain no class/image files")
    if "train" not in groups:
        raise DataError(
            f"{path}: no train/<class>/<image> files found; expected a layout like "
            f"train/cat/1.jpg, test/cat/2.jpg (found {len(stray)} files elsewhere, e.g. {stray[:3]})"
        )
    if stray:
        warn_once(f"{path}: ignored {len(stray)} files outside split/class/, e.g. {stray[:3]}")
    return groups


def load_folder(path: Path, image_size: int | None, channels: int | None, cache_dir: Path,
                lazy: bool = False, max_pixels: int = MAX_PIXELS) -> ImageDataset:
    """The dataset in `path`, decoded into the cache on first use. `lazy`: images stay on disk
    as ShardedArray views (see cache.load_arrays)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder or archive not found: {path}"
                        + ("" if path.is_absolute() else " (where a relative path is looked for: `cvrecipe config --explain paths`)"))
    if not path.is_dir() and not _is_archive(path):
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz/.zip archive")
    key = f"folder-{_fingerprint(path)}-s{image_size}-c{channels}-p{max_pixels}"
    entry = cache_dir / key
    if not (entry / "meta.json").is_file():
        _decode_folder(path, image_size, channels, entry, max_pixels)
    arrays, meta = load_arrays(entry, lazy)
    splits = {s: Split(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS if f"{s}_x" in arrays}
    skipped = [tuple(s) for s in meta["skipped"]]
    if skipped:
        warn_once(f"{path}: skipped {len(skipped)} unreadable file(s) (e.g. {skipped[0][0]}: {skipped[0][1]}); "
                  f"all listed in {listed(entry, SKIPPED_LIST, skipped)}")
    small = meta.get("small", [])
    if small:
        h, w = splits["train"].x.shape[-2:]
        rows = [(name, f"{size[1]}x{size[0]}") for name, size in small]
        warn_once(f"{path}: {len(small)} image(s) far smaller than the {h}x{w} the images are resized to (upscaled "
                  f"more than {SMALL_FACTOR}x); all listed in {listed(entry, SMALL_LIST, rows)}")
    return ImageDataset(name=f"folder:{path}", classes=meta["classes"], skipped=skipped, **splits)


def _decode_folder(path: Path, image_size: int | None, channels: int | None, entry: Path,
                   max_pixels: int = MAX_PIXELS) -> None:
    """Decode every image into the cache entry `entry`, DECODE_CHUNK images at a time, each
    written straight to its row on disk: memory holds one chunk, whatever the dataset's size.
    Images are resized here, once, to `image_size` (when None, to the most common size among the
    first chunk's images)."""
    groups = _list_files(path)
    classes = sorted(groups["train"])
    for split, by_class in groups.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{path}: split '{split}' has classes not in train: {unknown}")
    splits = [s for s in SPLITS if s in groups]
    place, labels = {}, {}  # file → (split, row); split → labels by row (class order, then file order)
    for split in splits:
        names = [(rel, label) for label, cls in enumerate(classes) for rel in groups[split].get(cls, [])]
        place.update({rel: (split, row) for row, (rel, _) in enumerate(names)})
        labels[split] = np.asarray([label for _, label in names], np.int64)
    if channels is None:
        names_all = [rel for by_class in groups.values() for rels in by_class.values() for rel in rels]
        channels = guess_channels(_read_files(path, set(names_all[:: max(1, len(names_all) // 64)])))
    with EntryWriter(entry) as out:
        decoder = _ChunkDecoder(out, splits, labels, channels, image_size, max_pixels)
        for rel, read in _iter_entries(path):
            if read is not None and rel in place:
                decoder.add(place[rel], rel, read())
        decoder.flush()
        skipped, small = decoder.finish()
        total = len(place)
        if len(skipped) > MAX_BAD_FRACTION * total:
            raise DataError(
                f"{path}: {len(skipped)} of {total} files could not be read as images "
                f"(e.g. {skipped[0][0]}: {skipped[0][1]}); refusing a mostly unreadable dataset"
            )
        out.commit({"source": str(path), "classes": classes, "skipped": skipped, "channels": channels,
                    "small": small})


def _read_files(path: Path, wanted: set[str]) -> list[bytes]:
    return [read() for rel, read in _iter_entries(path) if read is not None and rel in wanted]


class _ChunkDecoder:
    """Collects (place, name, bytes) and decodes them DECODE_CHUNK at a time into per-split shard
    writers, remembering which rows decoded, which files did not and which were upscaled a lot."""

    def __init__(self, out: EntryWriter, splits: list[str], labels: dict[str, np.ndarray], channels: int,
                 size: int | None, max_pixels: int = MAX_PIXELS):
        self.out, self.splits, self.labels, self.channels, self.size = out, splits, labels, channels, size
        self.max_pixels = max_pixels
        self.pending: list[tuple[tuple[str, int], str, bytes]] = []
        self.writers: dict = {}
        self.good: dict[str, list[np.ndarray]] = {s: [] for s in splits}
        self.bad: list[tuple[tuple[str, int], str, str]] = []  # (place, name, reason)
        self.small: list[tuple[tuple[str, int], str, tuple[int, int]]] = []  # (place, name, (h, w))

    def add(self, place: tuple[str, int], name: str, data: bytes) -> None:
        self.pending.append((place, name, data))
        if len(self.pending) >= DECODE_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        small: list[tuple[str, tuple[int, int]]] = []
        x, good, bad = decode_images([(name, data) for _, name, data in self.pending], self.channels, self.size,
                                     max_pixels=self.max_pixels, small=small)
        bad_names, small_names = dict(bad), dict(small)
        self.bad += [(place, name, bad_names[name]) for place, name, _ in self.pending if name in bad_names]
        self.small += [(place, name, small_names[name]) for place, name, _ in self.pending if name in small_names]
        if len(good):
            self.size = self.size or tuple(x.shape[-2:])  # the first chunk's size holds for the rest
            self._open_writers(x.shape[1:])
            places = [self.pending[i][0] for i in good]
            for split in self.splits:
                mine = [j for j, (s, _) in enumerate(places) if s == split]
                if mine:
                    rows = np.asarray([places[j][1] for j in mine], np.int64)
                    self.writers[split].write(rows, x[mine])
                    self.good[split].append(rows)
        self.pending = []

    def _open_writers(self, row_shape: tuple[int, ...]) -> None:
        for split in self.splits:
            if split not in self.writers:
                self.writers[split] = self.out.sharded(f"{split}_x", len(self.labels[split]), row_shape, np.uint8)

    def finish(self) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[int, int]]]]:
        """Close the writers (with the rows that decoded) and store the labels of those rows.
        Returns (file, reason) of every file that did not decode and (file, (h, w)) of every image
        upscaled more than SMALL_FACTOR times, each in split, class and file order."""
        for split in self.splits:
            rows = np.sort(np.concatenate(self.good[split])) if self.good[split] else np.zeros(0, np.int64)
            if split in self.writers:
                whole = len(rows) == len(self.labels[split])
                self.writers[split].close(None if whole else rows)
            else:  # no image decoded at all: an empty split (the caller refuses the dataset)
                self.out.add(f"{split}_x", np.zeros((0, self.channels, 1, 1), np.uint8))
            self.out.add(f"{split}_y", self.labels[split][rows])
        order = {s: i for i, s in enumerate(SPLITS)}

        def in_order(found: list) -> list:
            return [(name, what) for _, name, what in sorted(found, key=lambda f: (order[f[0][0]], f[0][1]))]

        return in_order(self.bad), in_order(self.small)
