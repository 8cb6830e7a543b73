"""Classification's torch-free facts: one label per image, images resized to the model's input."""
from __future__ import annotations

from cvrecipe.config import AugmentConfig, ConfigError, _show as show

METRICS = ("loss", "acc")  # per split, loss first (metrics.csv has train_<m> and val_<m>)


def whole_images(meta: dict) -> bool:
    """Images are resized to the model's input size and run in batches."""
    return False
MONITOR = "images"  # the monitor follows per-image class mix, confidence and input drift (monitor/drift.py)
PAIRED_AUGMENT = ("vflip", "rot90", "crop_size", "scale", "elastic_sigma")  # move image and target together


def check_config(cfg) -> None:
    """Switches a classification run does not understand (a ConfigError naming them)."""
    aug, defaults = cfg.augment, AugmentConfig()
    used = [f"augment.{k}={show(getattr(aug, k))}" for k in PAIRED_AUGMENT if getattr(aug, k) != getattr(defaults, k)]
    if used:
        raise ConfigError(f"{', '.join(used)}: segmentation augmentation (moves image and mask together); this "
                          f"is a {cfg.task} run (task={cfg.task})")
    if cfg.data.name.startswith("masks:"):
        raise ConfigError(f"data.name={cfg.data.name}: a masks: dataset needs task=segmentation")


def outputs_fit(shape: tuple[int, ...], batch: int, num_classes: int) -> bool:
    """Is `shape` what this task's model returns for `batch` images? ((B, K))"""
    return len(shape) == 2 and tuple(shape[:2]) == (batch, num_classes)
