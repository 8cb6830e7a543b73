"""What the data audit hands to the rest of the loop.

- `data.exclude=FILE`: a list of image ids (one per line, `#` starts a comment), as the audit
  writes into exclude.txt: file names for folder data (train/cat/0001.jpg), else SPLIT:INDEX
  (train:123). Those images are dropped from the training split (and from a source's own val
  split) before anything else happens; the test split is never touched, so scores stay comparable.
- The leak record: `data inspect --embed` stores, per dataset in the cache, which test images have
  a near copy in train. `eval` then also scores the test split without them, and the sanity
  checks warn when they are more than LEAK_WARN of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from cvrecipe.data.dataset import DataError, ImageDataset

LEAK_WARN = 0.01  # share of the test split with a near copy in train above which the sanity checks warn


def read_ids(path: str | Path) -> list[str]:
    """Ids listed in an exclude file; one clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.exclude: no file {path}")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [i for i in ids if i]


def folder_names(path: Path, ds: ImageDataset) -> dict[str, list[str]] | None:
    """The file of every decoded image of a folder dataset, per split, in the decoder's order
    (split, class, file; skipped files left out); None when they do not line up with the arrays."""
    from cvrecipe.data.folder import _list_files

    groups, skipped = _list_files(path), {name for name, _ in ds.skipped}
    out = {}
    for split in ("train", "val", "test"):
        part = getattr(ds, split)
        if part is None:
            continue
        names = [rel for cls in ds.classes for rel in groups.get(split, {}).get(cls, []) if rel not in skipped]
        if len(names) != len(part):
            return None
        out[split] = names
    return out


def apply_exclude(ds: ImageDataset, exclude: str | Path) -> ImageDataset:
    """`ds` without the train (and val) images listed in `exclude`. Ids of other splits are ignored;
    ids that match no image are an error (a stale list, or one written for another dataset)."""
    ids = set(read_ids(exclude))
    names = (folder_names(Path(ds.name[len("folder:"):]), ds) if ds.name.startswith("folder:") else None) or {}
    found, out = set(), {}
    for split in ("train", "val"):
        part = getattr(ds, split)
        if part is None:
            continue
        files = names.get(split) or part.names or []
        drop = [i for i in range(len(part)) if f"{split}:{i}" in ids or (files and files[i] in ids)]
        found |= {f"{split}:{i}" for i in drop} | {files[i] for i in drop if files}
        out[split] = part.take(np.setdiff1d(np.arange(len(part)), drop)) if drop else part
    others = {i for i in ids if i.split(":", 1)[0] == "test" or i.startswith("test/")}
    unknown = sorted(ids - found - others)
    if unknown:
        raise DataError(f"data.exclude={exclude}: {len(unknown)} id(s) match no train/val image of {ds.name}, "
                        f"e.g. {unknown[0]!r}; expected file names (folder data) or SPLIT:INDEX")
    return dataclasses.replace(ds, **out)


# ---- the leak record ------------------------------------------------------------------------------

def record_path(cache: Path, dataset: str) -> Path:
    """Where the leak record of `dataset` lives (folder paths made absolute, so `folder:data` and
    `folder:./data` are one dataset)."""
    kind, sep, path = dataset.partition(":")
    if sep and kind in ("folder", "masks"):
        dataset = f"{kind}:{Path(path).expanduser().resolve()}"
    key = hashlib.sha1(dataset.encode()).hexdigest()[:16]
    return Path(cache) / "audits" / f"{key}.json"


def write_record(cache: Path, dataset: str, test_size: int, leaks: list[int], report: Path) -> Path:
    """Store which test images (indices in the source's test split) have a near copy in train."""
    path = record_path(cache, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset, "test_size": test_size, "leaks": sorted(leaks),
                                "report": str(report), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return path


def read_record(cache: Path, dataset: str, test_size: int) -> dict | None:
    """The stored leak record for `dataset`, or None when there is none or it was written for a test
    split of another size (the data changed since)."""
    path = record_path(cache, dataset)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("test_size") == test_size else None
