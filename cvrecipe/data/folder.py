"""The user's own images: a directory or a .tar/.tar.gz/.zip archive of split/class/image files.

Layout: `train/<class>/*` plus optionally `test/<class>/*` and/or `val/<class>/*` (also under one
wrapping top-level folder). Files are read once, decoded in batches, and the result is cached by
the archive's content (for a directory, by its file list, sizes and modification times).
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

from cvrecipe.data.cache import load_arrays, save_arrays
from cvrecipe.data.dataset import DataError, ImageDataset, Split
from cvrecipe.data.images import MAX_PIXELS, SMALL_FACTOR, decode_images, guess_channels

SPLITS = ("train", "val", "test")
CACHE_VERSION = 2  # bump when decoding changes, so old cache entries are not reused (2: one grayscale rule)
MAX_BAD_FRACTION = 0.5  # more unreadable files than this and the dataset is refused
NAMED_IN_WARNINGS = 5  # files named in a warning; the full list is in meta.json / RUN/skipped_files.txt

# Warnings already given in this process: a command loads its dataset several times (train, then
# evaluate, then the report), and Python's own once-per-location filter is reset by every
# `warnings.catch_warnings()` block, so each load would repeat them.
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def _some(entries: list, show) -> str:
    named = "; ".join(show(e) for e in entries[:NAMED_IN_WARNINGS])
    return named + (f"; and {len(entries) - NAMED_IN_WARNINGS} more" if len(entries) > NAMED_IN_WARNINGS else "")


def _is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def _iter_entries(path: Path):
    """Yield (relative path, bytes) for every file and (relative path, None) for every folder."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in dirs:
                yield (Path(root) / name).relative_to(path).as_posix(), None
            for name in sorted(files):
                full = Path(root) / name
                yield full.relative_to(path).as_posix(), full.read_bytes()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                yield info.filename, None if info.is_dir() else zf.read(info)
    else:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isdir():
                    yield member.name, None
                elif member.isfile():
                    yield member.name, tf.extractfile(member).read()


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
    """{split: {class: [(name, bytes)]}} following the split/class/file layout."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    stray, split_dirs = [], set()
    for rel, data in _iter_entries(path):
        parts = rel.strip("/").split("/")
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # hidden files and macOS archive debris are not images
        if len(parts) >= 2 and parts[0] not in SPLITS and parts[1] in SPLITS:
            parts = parts[1:]  # one wrapping top-level folder
        if parts[0] in SPLITS:
            split_dirs.add(parts[0])
        if data is None:
            continue
        if len(parts) == 3 and parts[0] in SPLITS:
            groups[parts[0]][parts[1]].append((rel, data))
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
                max_pixels: int = MAX_PIXELS) -> ImageDataset:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder or archive not found: {path}")
    if not path.is_dir() and not _is_archive(path):
        raise DataError(f"{path} is neither a directory nor a .tar/.tar.gz/.zip archive")
    key = f"folder-{_fingerprint(path)}-s{image_size}-c{channels}-p{max_pixels}"
    entry = cache_dir / key
    cached = load_arrays(entry)
    if cached is None:
        arrays, meta = _decode_folder(path, image_size, channels, max_pixels)
        save_arrays(entry, arrays, meta)
    else:
        arrays, meta = cached
    splits = {s: Split(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS if f"{s}_x" in arrays}
    skipped = [tuple(s) for s in meta["skipped"]]
    if skipped:
        warn_once(f"{path}: skipped {len(skipped)} unreadable file(s): "
                  f"{_some(skipped, lambda s: f'{s[0]} ({s[1]})')}")
    small = meta.get("small", [])
    if small:
        h, w = splits["train"].x.shape[-2:]
        warn_once(f"{path}: {len(small)} image(s) far smaller than the {h}x{w} the images are resized to (upscaled "
                  f"more than {SMALL_FACTOR}x): {_some(small, lambda s: f'{s[0]} ({s[1][1]}x{s[1][0]})')}")
    return ImageDataset(name=f"folder:{path}", classes=meta["classes"], skipped=skipped, **splits)


def _decode_folder(path: Path, image_size: int | None, channels: int | None,
                   max_pixels: int = MAX_PIXELS) -> tuple[dict, dict]:
    groups = _group(path)
    classes = sorted(groups["train"])
    for split, by_class in groups.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{path}: split '{split}' has classes not in train: {unknown}")
    items_all = [item for by_class in groups.values() for items in by_class.values() for item in items]
    if channels is None:
        channels = guess_channels([data for _, data in items_all[:: max(1, len(items_all) // 64)]])
    arrays, skipped, small, size = {}, [], [], image_size
    for split in [s for s in SPLITS if s in groups]:
        items, labels = [], []
        for label, cls in enumerate(classes):
            for item in groups[split].get(cls, []):
                items.append(item)
                labels.append(label)
        x, good, bad = decode_images(items, channels, size, max_pixels=max_pixels, small=small)
        size = size or (tuple(x.shape[-2:]) if len(x) else None)  # later splits follow train's size
        skipped += bad
        arrays[f"{split}_x"] = x
        arrays[f"{split}_y"] = np.asarray(labels, np.int64)[good]
    total = len(items_all)
    if len(skipped) > MAX_BAD_FRACTION * total:
        raise DataError(
            f"{path}: {len(skipped)} of {total} files could not be read as images "
            f"(e.g. {skipped[0][0]}: {skipped[0][1]}); refusing a mostly unreadable dataset"
        )
    meta = {"source": str(path), "classes": classes, "skipped": skipped, "channels": channels, "small": small}
    return arrays, meta
