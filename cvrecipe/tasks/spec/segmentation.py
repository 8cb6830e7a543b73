"""Segmentation's torch-free facts: a class per pixel, whole images run in tiles of the input size."""
from __future__ import annotations

from cvrecipe.config import ConfigError, _show as show

METRICS = ("loss", "pixel_acc", "miou", "dice")  # over labelled pixels; miou/dice: means over classes


def whole_images(meta: dict) -> bool:
    """A model whose meta has "tile" takes each image at its own size, in overlapping tiles of its input
    size (artifact/tiling.py); one without is run on images resized to its input size."""
    return bool(meta.get("tile"))
MONITOR = "pixels"  # the monitor follows the pixel class mix and mean pixel confidence (monitor/drift.py)


def check_config(cfg) -> None:
    """Switches only a classifier understands, and the paired augmentation's own rules."""
    aug = cfg.augment
    bad = {"augment.crop_padding": aug.crop_padding, "augment.cutout": aug.cutout,
           "model.init_bias_prior": cfg.model.init_bias_prior, "train.label_smoothing": cfg.train.label_smoothing,
           "finetune.feature_cache": cfg.finetune.feature_cache}
    used = [f"{k}={show(v)}" for k, v in bad.items() if v]
    if used:
        raise ConfigError(f"{', '.join(used)}: classification only; task=segmentation (use augment.crop_size, "
                          f"augment.scale, augment.elastic_sigma)")
    if aug.flip_mode != "random":
        raise ConfigError(f"augment.flip_mode={aug.flip_mode}: task=segmentation flips with random coins only")
    if aug.scale[0] > aug.scale[1]:
        raise ConfigError(f"augment.scale={show(aug.scale)}: expected [low, high] with low <= high")


def outputs_fit(shape: tuple[int, ...], batch: int, num_classes: int) -> bool:
    """Is `shape` what this task's model returns for `batch` images? ((B, K, H, W))"""
    return len(shape) == 4 and tuple(shape[:2]) == (batch, num_classes)
