"""Data: named datasets and folders → checked, split uint8 arrays ready to move to a device.

A dataset that fits the memory budget (data.memory_gb; by default half of the memory free now)
is read whole into numpy arrays, as it always was. A larger one keeps its images on disk, in the
cache's shards, as ShardedArray views that training and evaluation read a batch at a time."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from cvrecipe.config import DataConfig
from cvrecipe.data.cache import cache_root
from cvrecipe.data.dataset import (IGNORE, DataError, ImageDataset, Split, holdout_split, kfold_split,
                                   stratified_subset)
from cvrecipe.data.folder import load_folder
from cvrecipe.data.shards import ShardedArray, in_memory
from cvrecipe.data.sources import REGISTRY, load_named
from cvrecipe.device import memory_budget

__all__ = ["IGNORE", "DataError", "ImageDataset", "ShardedArray", "Split", "load_dataset", "load_source",
           "REGISTRY", "streamed"]


def load_source(name: str, cfg: DataConfig | None = None, lazy: bool = False) -> ImageDataset:
    """The dataset as its source provides it (no val carving, no subsetting). `lazy`: images stay
    on disk as ShardedArray views."""
    cfg = cfg or DataConfig(name=name)
    cache = cache_root(cfg.cache_dir)
    if name.startswith("folder:"):
        path = locate(name[len("folder:"):])
        return load_folder(path, cfg.image_size, cfg.channels, cache, lazy, cfg.max_pixels)
    if name.startswith("masks:"):
        from cvrecipe.data.masks import load_masks

        path = locate(name[len("masks:"):])
        return load_masks(path, cfg.image_size, cfg.channels, cache, cfg.mask_classes, cfg.max_pixels)
    if name == "synth-detect" or name.startswith("synth-detect:"):
        from cvrecipe.data.synth_source import load_synth

        return load_synth(name, cfg.image_size, cfg.channels, cache, load_source)
    if name.startswith("boxes:"):
        from cvrecipe.data.box_source import load_boxes

        return load_boxes(locate(name[len("boxes:"):]), cfg.image_size, cfg.channels, cache)
    return load_named(name, cache, lazy)


# the source checkout's root when cvrecipe runs from one (an installed wheel has no pyproject.toml beside it)
_CHECKOUT = Path(__file__).resolve().parents[2]


def locate(path: str) -> Path:
    """A dataset path from a recipe, found the same way from any directory: as written (absolute,
    ~, or relative to the current directory), else in each folder of $CVRECIPE_DATA (the path, then
    its file name), else relative to the source checkout. Not found: the path as written, whose
    loader names it in its error."""
    written = Path(path).expanduser()
    if written.is_absolute() or written.exists():
        return written
    candidates = []
    for folder in filter(None, os.environ.get("CVRECIPE_DATA", "").split(os.pathsep)):
        candidates += [Path(folder).expanduser() / written, Path(folder).expanduser() / written.name]
    if (_CHECKOUT / "pyproject.toml").is_file():
        candidates.append(_CHECKOUT / written)
    return next((c for c in candidates if c.exists()), written)


def load_dataset(cfg: DataConfig, seed: int = 0, device: torch.device | str | None = None) -> ImageDataset:
    """Load, convert to the configured size/channels, carve val from train if needed, subset; then
    read it into memory when it fits the budget (data.memory_gb, or half the memory free now on
    `device`, where training would keep it), else leave the images on disk to be streamed."""
    ds = load_source(cfg.name, cfg, lazy=True)
    if cfg.exclude:  # the listed train images never reach training, nor the val carved from train
        from cvrecipe.data.exclusions import apply_exclude

        ds = apply_exclude(ds, cfg.exclude)
    ds = _conform(ds, cfg.image_size, cfg.channels)
    if cfg.folds:  # cross-validation: fold `cfg.fold` is the val split
        if ds.val is not None:
            raise DataError(f"data.folds={cfg.folds}: {ds.name} brings its own val split; folds are cut from "
                            f"train when the source has none")
        keep, held = kfold_split(ds.train.y, cfg.folds, cfg.fold)
        ds = dataclasses.replace(ds, train=ds.train.take(keep), val=ds.train.take(held))
    elif ds.val is None and cfg.val_fraction <= 0:  # no validation: every training image trains
        ds = dataclasses.replace(ds, val=ds.train.take(np.arange(0)))
    elif ds.val is None:
        keep, held = holdout_split(ds.train.y, cfg.val_fraction, seed)
        ds = dataclasses.replace(ds, train=ds.train.take(keep), val=ds.train.take(held))
    if cfg.subset is not None:
        ds = dataclasses.replace(ds, train=ds.train.take(stratified_subset(ds.train.y, cfg.subset, seed)))
    if cfg.hflip_ok is not None:
        ds = dataclasses.replace(ds, hflip_ok=cfg.hflip_ok)
    if _nbytes(ds) <= memory_budget(cfg.memory_gb, device):
        ds = _read_whole(ds)
    ds.check()
    return ds


def streamed(ds: ImageDataset) -> bool:
    """Are the dataset's training images read from disk a batch at a time?"""
    return isinstance(ds.train.x, ShardedArray)


def _splits(ds: ImageDataset) -> list[Split]:
    return [s for s in (ds.train, ds.val, ds.test) if s is not None]


def _nbytes(ds: ImageDataset) -> int:
    return sum(split.x.nbytes + split.y.nbytes for split in _splits(ds))


def _read_whole(ds: ImageDataset) -> ImageDataset:
    def read(split: Split | None) -> Split | None:
        return None if split is None else Split(in_memory(split.x), in_memory(split.y), split.names)

    return dataclasses.replace(ds, train=read(ds.train), val=read(ds.val), test=read(ds.test))


def _conform(ds: ImageDataset, size: int | None, channels: int | None) -> ImageDataset:
    """Resize / change channel count of every split (a no-op when they already match). Images on
    disk are read into memory to be converted: folder sources are decoded at the configured size
    and channels already, so only the small registered datasets get here."""
    def fix(split: Split | None) -> Split | None:
        if split is None:
            return None
        if isinstance(split.x, ShardedArray):
            if (channels is None or split.x.shape[1] == channels) and (size is None or split.x.shape[-2:] == (size, size)):
                return split
            split = Split(in_memory(split.x), split.y, split.names)
        x = torch.from_numpy(split.x)
        if channels is not None and x.shape[1] != channels:
            if channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif channels == 1 and x.shape[1] == 3:
                from cvrecipe.data.images import rgb_to_luma  # the one grayscale rule of every decode path

                x = rgb_to_luma(x)
            else:
                raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
        y = split.y
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            from torchvision.transforms.v2.functional import InterpolationMode, resize

            x = resize(x, [size, size], antialias=True)
            if split.masks:  # class indices: nearest, never blended
                y = resize(torch.from_numpy(y)[:, None], [size, size], InterpolationMode.NEAREST_EXACT)[:, 0].numpy()
            elif split.boxes:  # pixel corners follow the images
                y = y.resized(split.x.shape[-2:], (size, size))
        return Split(np.ascontiguousarray(x.numpy()), y if split.boxes else np.ascontiguousarray(y), split.names)

    return dataclasses.replace(ds, train=fix(ds.train), val=fix(ds.val), test=fix(ds.test))
