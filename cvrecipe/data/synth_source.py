"""`synth-detect[:BACKGROUNDS]`: the synthetic detection set (data/synth_detect.py) as a data source
that needs no prior command. On first use the set is written into the cache directory with the
defaults of `cvrecipe data synth-detect` (5,000 train / 500 test images, 128-256 px, seed 0,
Fashion-MNIST objects; backgrounds `cifar10`, or BACKGROUNDS: any dataset name or folder:PATH), then
read like any `boxes:PATH` set. Later uses find it there: the entry is keyed by everything that
shapes it, and written under a temporary name then renamed, so a crash never leaves half a set.

The COCO annotations are read (train and test): the validation images are then held out of train
(data.val_fraction), never taken from the test split.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from cvrecipe.config import DataConfig
from cvrecipe.data.box_source import load_boxes
from cvrecipe.data.dataset import ImageDataset

NAME = "synth-detect"
VERSION = 1  # bump when synth_detect.py would write different files for the same settings
OBJECTS = "fashion-mnist"
BACKGROUNDS = "cifar10"
TRAIN, TEST, SIZE, SEED = 5000, 500, (128, 256), 0  # `cvrecipe data synth-detect`'s defaults


def write_set(out: Path, load_source: Callable[[str, DataConfig], ImageDataset], objects: str = OBJECTS,
              backgrounds: str = BACKGROUNDS, train: int = TRAIN, test: int = TEST, size: tuple[int, int] = SIZE,
              seed: int = SEED, cache_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """Load the object and background datasets with `load_source` (data.load_source; decoded into
    `cache_dir`, default the usual cache) and write the set into `out` (synth_detect.synth_detect).
    Returns {split: (images, boxes)}."""
    from cvrecipe.data.synth_detect import synth_detect

    cache = None if cache_dir is None else str(cache_dir)
    items = load_source(objects, DataConfig(name=objects, channels=1, cache_dir=cache))
    photos = load_source(backgrounds, DataConfig(name=backgrounds, channels=3, cache_dir=cache))
    test_photos = photos.test if photos.test is not None else photos.train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-object resizes: 18x faster on one thread than on two busy cores
    try:
        return synth_detect(out, (items.train.x, items.train.y), (items.test.x, items.test.y), photos.train.x,
                            test_photos.x, items.classes, train, test, size, seed)
    finally:
        torch.set_num_threads(threads)


def load_synth(name: str, image_size: int | None, channels: int | None, cache_dir: Path,
               load_source: Callable[[str, DataConfig], ImageDataset]) -> ImageDataset:
    """The set `name` names (module docstring), written into `cache_dir` on first use from the
    datasets `load_source` (data.load_source) gives."""
    backgrounds = name[len(NAME) + 1:] if name != NAME else BACKGROUNDS
    settings = f"v{VERSION} {OBJECTS} {backgrounds} {TRAIN} {TEST} {SIZE} {SEED}"
    out = Path(cache_dir) / f"synth-detect-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
    if not (out / "data.yaml").is_file():
        partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        write_set(partial, load_source, OBJECTS, backgrounds, TRAIN, TEST, SIZE, SEED, cache_dir)
        try:
            partial.rename(out)
        except OSError:  # another process finished first: its copy is the same set
            shutil.rmtree(partial, ignore_errors=True)
    ds = load_boxes(out, image_size, channels, cache_dir, fmt="coco")
    ds.name = name
    return ds
