"""Data: named datasets and folders → checked, split uint8 arrays ready to move to a device."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cvrecipe.config import DataConfig
from cvrecipe.data.cache import cache_root
from cvrecipe.data.dataset import (IGNORE, DataError, ImageDataset, Split, holdout_split, kfold_split,
                                   stratified_subset)
from cvrecipe.data.folder import load_folder
from cvrecipe.data.sources import REGISTRY, load_named

__all__ = ["IGNORE", "DataError", "ImageDataset", "Split", "load_dataset", "load_source", "REGISTRY"]


def load_source(name: str, cfg: DataConfig | None = None) -> ImageDataset:
    """The dataset as its source provides it (no val carving, no subsetting)."""
    cfg = cfg or DataConfig(name=name)
    cache = cache_root(cfg.cache_dir)
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):], cfg.image_size, cfg.channels, cache, cfg.max_pixels)
    if name.startswith("masks:"):
        from cvrecipe.data.masks import load_masks

        return load_masks(name[len("masks:"):], cfg.image_size, cfg.channels, cache, cfg.mask_classes,
                          cfg.max_pixels)
    return load_named(name, cache)


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset:
    """Load, convert to the configured size/channels, carve val from train if needed, subset."""
    ds = load_source(cfg.name, cfg)
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
    ds.check()
    return ds


def _conform(ds: ImageDataset, size: int | None, channels: int | None) -> ImageDataset:
    """Resize / change channel count of every split (a no-op when they already match)."""
    def fix(split: Split | None) -> Split | None:
        if split is None:
            return None
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
        return Split(np.ascontiguousarray(x.numpy()), np.ascontiguousarray(y), split.names)

    return dataclasses.replace(ds, train=fix(ds.train), val=fix(ds.val), test=fix(ds.test))
