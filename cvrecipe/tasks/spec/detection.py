"""Detection's torch-free facts: boxes per image, images resized to the model's input size."""
from __future__ import annotations

from cvrecipe.config import AugmentConfig, ConfigError, _show as show

METRICS = ("loss", "map50")  # per split, loss first; map50: mAP at IoU 0.5 (COCO's rules, on the device)
MONITOR = "boxes"  # what the monitor would follow (class mix of detections, boxes per image, scores)
# box-aware (data/augment_boxes.py): flips, a zoom factor range, a shift in pixels; pad_mode has no
# effect (the uncovered border is black: reflection would show objects without their boxes)
SUPPORTED_AUGMENT = ("hflip", "scale", "crop_padding", "pad_mode")


def whole_images(meta: dict) -> bool:
    """Images are resized to the model's input size and run in batches."""
    return False


def check_config(cfg) -> None:
    """Switches a detection run does not understand, each named."""
    name = cfg.data.name
    if not (name.startswith("boxes:") or name == "synth-detect" or name.startswith("synth-detect:")):
        raise ConfigError(f"data.name={name}: task=detection needs a boxes:PATH dataset (COCO, YOLO or VOC) or "
                          f"synth-detect[:BACKGROUNDS] (the synthetic set, written into the cache on first use)")
    if cfg.data.image_size is None:
        raise ConfigError("data.image_size is null: task=detection decodes every image to one square size "
                          "(set data.image_size, e.g. 128)")
    aug, defaults = cfg.augment, AugmentConfig()
    used = [f"augment.{k}={show(getattr(aug, k))}" for k in vars(defaults)
            if k not in SUPPORTED_AUGMENT and k != "flip_mode" and getattr(aug, k) != getattr(defaults, k)]
    if aug.flip_mode != "random":
        used.append(f"augment.flip_mode={aug.flip_mode}")
    bad = {"model.dropout": cfg.model.dropout, "model.init_bias_prior": cfg.model.init_bias_prior,
           "train.label_smoothing": cfg.train.label_smoothing, "finetune.feature_cache": cfg.finetune.feature_cache}
    used += [f"{k}={show(v)}" for k, v in bad.items() if v]
    if used:
        raise ConfigError(f"{', '.join(used)}: not supported by task=detection (its augmentation: "
                          f"{', '.join('augment.' + a for a in SUPPORTED_AUGMENT)})")
    if cfg.checkpoint.monitor != "val_map50":
        raise ConfigError(f"checkpoint.monitor={cfg.checkpoint.monitor}: a detector gives losses in train mode and "
                          f"boxes in eval mode, so only val_map50 is measured (val_loss and train_map50 are NaN); "
                          f"monitor val_map50")


def outputs_fit(shape: tuple[int, ...], batch: int, num_classes: int) -> bool:
    """Is `shape` what this task's model returns for `batch` images? ((B, D, 6) detection rows)"""
    return len(shape) == 3 and shape[0] == batch and shape[2] == 6
