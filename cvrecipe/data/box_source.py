"""`boxes:PATH`: a detection dataset (COCO JSON, YOLO txt or Pascal VOC XML; a folder or an archive)
as an ImageDataset whose targets are boxes (BoxTargets, box_targets.py).

Images are decoded once to (C, S, S) uint8 at data.image_size = S (boxes rescaled to that frame)
and cached beside their boxes (ragged.py), keyed by the source's content: a second load reads the
cache in milliseconds. Bad annotations are skipped by the readers (boxes.py) and summarised as one
warning line per kind; undecodable images are left out with their boxes, named in a warning too.
"""
from __future__ import annotations

from pathlib import Path

from cvrecipe.data.box_targets import BoxTargets
from cvrecipe.data.boxes import problem_lines, read_boxes, read_image_bytes
from cvrecipe.data.dataset import DataError, ImageDataset, Split
from cvrecipe.data.folder import _fingerprint, warn_once
from cvrecipe.data.ragged import boxes_from_cache, boxes_to_cache

CACHE_VERSION = 1  # bump when the entry's layout changes


def load_boxes(path: Path, image_size: int | None, channels: int | None, cache_dir: Path,
               fmt: str | None = None) -> ImageDataset:
    """The box dataset at `path`, decoded into the cache on first use; `fmt` (coco | yolo | voc) picks
    the annotations where the folder holds several (default: boxes.read_boxes's choice)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"box dataset not found: {path}"
                        + ("" if path.is_absolute() else " (where a relative path is looked for: `cvrecipe config --explain paths`)"))
    if image_size is None:
        raise DataError(f"boxes:{path}: set data.image_size (images of a detection set differ in size; they are "
                        f"decoded to one square size, boxes rescaled with them)")
    channels = channels or 3
    entry = cache_dir / f"boxes-v{CACHE_VERSION}-{_fingerprint(path)}-s{image_size}-c{channels}{'-' + fmt if fmt else ''}"
    if (entry / "meta.json").is_file():
        splits, meta = boxes_from_cache(entry)
        classes = meta["classes"]
    else:
        ds = read_boxes(path, fmt=fmt)
        for line in problem_lines(ds.problems):
            warn_once(f"{path}: {line}")
        if not ds.splits.get("train"):
            raise DataError(f"boxes:{path}: no training images with annotations (splits found: "
                            f"{', '.join(f'{s} {n}' for s, (n, _) in ds.counts().items()) or 'none'})")
        wanted = {split: items for split, items in ds.splits.items() if split in ("train", "val", "test")}
        skipped = boxes_to_cache(entry, lambda files: read_image_bytes(path, files), wanted, ds.classes,
                                 (image_size, image_size), channels)
        bad = [row for rows in skipped.values() for row in rows]
        if bad:
            warn_once(f"{path}: left out {len(bad)} image(s) that do not decode (e.g. {bad[0][0]}: {bad[0][1]})")
        splits, meta = boxes_from_cache(entry)
        classes = ds.classes
    parts = {split: Split(x, BoxTargets(flat, offsets)) for split, (x, flat, offsets) in splits.items()}
    return ImageDataset(name=f"boxes:{path}", classes=list(classes), **parts)
