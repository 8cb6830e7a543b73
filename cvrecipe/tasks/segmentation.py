"""Semantic segmentation: a class per pixel. Outputs are logits (B, K, H, W); targets uint8
class-index masks (B, H, W), where IGNORE (255) marks pixels without a label: they count in no loss
and no metric.

Metrics are accumulated over the whole split as one pixel confusion matrix (never averaged per
batch): pixel accuracy = labelled pixels right / labelled pixels; per class c, IoU = TP / (TP + FP
+ FN) and Dice = 2 TP / (2 TP + FP + FN); mIoU and (mean) Dice average the classes that occur in
the targets or the predictions (a class absent from both has no defined score and is left out).
Losses (segment.loss): pixel cross-entropy, soft Dice (1 - the mean over classes of the batch's
soft Dice, on softmax probabilities, over labelled pixels) or their sum.

Export parity: |logit diff| ≤ 1e-3 in fp32 (a U-Net sums many more terms per output than a
classifier's head) and ≥ 99.9 % of pixels with the same class; in fp16, 1 % of the largest logit
and ≥ 99 % of pixels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from cvrecipe.config import AugmentConfig, SegmentConfig
from cvrecipe.data.augment_pairs import augment_pairs
from cvrecipe.data.dataset import IGNORE
from cvrecipe.tasks.base import Meter, ParityReport, Task

FP32_ATOL, FP32_MIN_AGREEMENT = 1e-3, 0.999
FP16_RELATIVE_ATOL, FP16_MIN_AGREEMENT = 1e-2, 0.99
DICE_EPS = 1e-6  # keeps the soft Dice of a class absent from a batch finite (it then counts ~1, not 0)


def pixel_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) pixel counts, row = true class, column = predicted; IGNORE pixels left out."""
    keep = target != IGNORE
    flat = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(cm: torch.Tensor) -> dict:
    """Pixel accuracy, per-class IoU/Dice/precision/recall, and their means over the classes that
    occur (in targets or predictions) from a (K, K) pixel confusion matrix."""
    cm = cm.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    fp, fn = predicted - tp, support - tp
    present = (support + predicted) > 0
    iou = torch.where(present, tp / (tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    total = cm.sum().clamp_min(1)
    return {"pixel_accuracy": (tp.sum() / total).item(), "iou": iou, "dice": dice,
            "precision": torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp)),
            "recall": torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp)),
            "support": support, "predicted": predicted,
            "miou": iou[present].mean().item() if present.any() else float("nan"),
            "dice_mean": dice[present].mean().item() if present.any() else float("nan")}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of 2 Σ p·g / (Σ p + Σ g), sums over the batch's labelled pixels."""
    k = logits.shape[1]
    probs = logits.float().softmax(1)
    keep = (target != IGNORE)[:, None]  # (B, 1, H, W)
    onehot = F.one_hot(torch.where(keep[:, 0], target.long(), 0), k).permute(0, 3, 1, 2).float()
    probs, onehot = probs * keep, onehot * keep
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + DICE_EPS) / (probs.sum(dims) + onehot.sum(dims) + DICE_EPS)
    return 1 - dice.mean()


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)


class ConfusionMeter(Meter):
    """A pixel confusion matrix summed on the device; compute() gives pixel_acc, miou and dice."""

    def __init__(self, num_classes: int, device: torch.device):
        self.k = num_classes
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.cm += pixel_confusion(outputs.argmax(1), targets.to(outputs.device), self.k).to(self.cm.device)

    def compute(self) -> dict[str, float]:
        s = scores_from_confusion(self.cm.cpu())
        return {"pixel_acc": s["pixel_accuracy"], "miou": s["miou"], "dice": s["dice_mean"]}


def segmentation_metrics(logits: torch.Tensor, masks: torch.Tensor, class_names: list[str],
                         loss: str = "ce") -> dict:
    """Everything `cvrecipe eval` reports for a split, as plain JSON-able values; per image as well,
    for the report's worst images."""
    k = len(class_names)
    total = torch.zeros(k, k, dtype=torch.long)
    per_image = []
    loss_sum, labelled = 0.0, 0
    for i in range(len(masks)):  # one image at a time: (K, H, W) logits of a large image are big
        pred = logits[i:i + 1].argmax(1)
        cm = pixel_confusion(pred, masks[i:i + 1], k)
        total += cm
        s = scores_from_confusion(cm)
        n = int(cm.sum())
        per_image.append({"index": i, "pixels": n, "pixel_accuracy": s["pixel_accuracy"], "miou": s["miou"],
                          "dice": s["dice_mean"]})
        if n:
            loss_sum += segmentation_loss(logits[i:i + 1], masks[i:i + 1], loss).item() * n
            labelled += n
    s = scores_from_confusion(total)
    return {
        "num_images": int(len(masks)), "pixels": int(total.sum()),
        "pixel_accuracy": s["pixel_accuracy"], "pixel_error": 1 - s["pixel_accuracy"],
        "miou": s["miou"], "mean_dice": s["dice_mean"], "loss": loss_sum / max(labelled, 1), "loss_kind": loss,
        "per_class": [{"class": name, "iou": _num(iou), "dice": _num(dice), "precision": p, "recall": r,
                       "pixels": int(n), "predicted_pixels": int(m)}
                      for name, iou, dice, p, r, n, m in zip(class_names, s["iou"].tolist(), s["dice"].tolist(),
                                                             s["precision"].tolist(), s["recall"].tolist(),
                                                             s["support"].tolist(), s["predicted"].tolist())],
        "confusion_matrix": total.tolist(),
        "per_image": per_image,
    }


def _num(value: float) -> float | None:
    return None if value != value else value  # NaN (a class in neither targets nor predictions) → null in JSON


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    if kind == "ce":
        return pixel_cross_entropy(logits, masks)
    if kind == "dice":
        return soft_dice_loss(logits, masks)
    if kind == "ce+dice":
        return pixel_cross_entropy(logits, masks) + soft_dice_loss(logits, masks)
    raise ValueError(f"segment.loss must be ce, dice or ce+dice, got '{kind}'")


class Segmentation(Task):
    name = "segmentation"
    section = "segment"
    PARITY_IMAGES = 16  # whole images, each many tiles
    SANITY = {"init_batch": 8, "overfit_batch": 4, "train_batch": 8, "held_out": 32, "crop": 64}

    def __init__(self, settings: SegmentConfig | None = None):
        self.settings = settings or SegmentConfig()  # cfg.segment

    def input_size(self, config, image_size: tuple[int, int]) -> tuple[int, int]:
        size = config.augment.crop_size
        return (size, size) if size else image_size

    def model_meta(self, config, input_size: tuple[int, int]) -> dict:
        """Images of any size are segmented in overlapping tiles of the input size (artifact/tiling.py)."""
        return {"tile": {"size": list(input_size), "overlap": self.settings.tile_overlap,
                         "batch": self.settings.tile_batch}}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return segmentation_loss(outputs, targets, self.settings.loss)

    def augment(self, x: torch.Tensor, y: torch.Tensor, policy: AugmentConfig, hflip_ok: bool, gen: torch.Generator,
                base_flip: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_pairs(x, y, policy, hflip_ok, gen)

    def meter(self, num_classes: int, device: torch.device) -> Meter:
        return ConfusionMeter(num_classes, device)

    def item_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: the share of its labelled pixels that are right, and its mean pixel cross-entropy."""
        outputs = outputs.float()
        keep = (targets != IGNORE).float()
        count = keep.sum((1, 2)).clamp_min(1)
        right = ((outputs.argmax(1) == targets.long()).float() * keep).sum((1, 2)) / count
        loss = pixel_cross_entropy(outputs, targets, reduction="none").sum((1, 2)) / count
        return right, loss

    def chance(self, targets: torch.Tensor) -> float:
        """The pixel accuracy of always answering the commonest class."""
        values = targets.flatten().long()
        counts = torch.bincount(values[values != IGNORE])
        return float(counts.max() / counts.sum()) if counts.sum() > 0 else 0.0

    def score_sigma(self, scores: torch.Tensor, p: float) -> float:
        """Pixels of one image are not independent trials: the standard error of the mean per-image
        score, from the scores' own spread (floored at 0.001)."""
        return max(float(scores.float().std() / len(scores) ** 0.5), 1e-3) if len(scores) > 1 else 1e-3

    def sanity_items(self, x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator):
        """n random crops of SANITY['crop'] pixels (images cycled), so the checks take seconds."""
        from cvrecipe.data.augment_pairs import crop_pairs

        side = self.SANITY["crop"]
        idx = torch.arange(n) % len(y)
        return crop_pairs(x[idx], y[idx], (side, side), gen)

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict:
        return segmentation_metrics(outputs, targets, class_names, self.settings.loss)

    def headline(self, result: dict) -> str:
        return (f"pixel accuracy {result['pixel_accuracy']:.4f} (error {result['pixel_error']:.4f}), "
                f"mIoU {result['miou']:.4f}, Dice {result['mean_dice']:.4f}")

    def table(self, result: dict) -> Table:
        table = Table(title=f"{result['dataset']} [{result['split']}]: {self.headline(result)} "
                            f"({result['num_images']} images, {result['pixels']:,} labelled pixels)")
        for col in ("class", "IoU", "Dice", "precision", "recall", "pixels"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in result["per_class"]:
            table.add_row(row["class"], _fmt(row["iou"]), _fmt(row["dice"]), f"{row['precision']:.4f}",
                          f"{row['recall']:.4f}", f"{row['pixels']:,}")
        table.add_row("mean", _fmt(result["miou"]), _fmt(result["mean_dice"]), "", "", f"{result['pixels']:,}",
                      style="bold")
        return table

    def merge_views(self, outputs, size):
        """The weighted mean of the views' score maps, each mirrored and moved back onto the image."""
        return sum(view.weight * view.undo_dense(out) for view, out in outputs)

    def parity(self, reference: np.ndarray, exported: np.ndarray, batch_sizes: list[int], half: bool,
               atol: float | None = None, min_agreement: float | None = None) -> ParityReport:
        if reference.shape != exported.shape:
            raise ValueError(f"exported model gives logits of shape {exported.shape}, eager model {reference.shape}")
        if half:
            scale = float(np.abs(reference).max()) if reference.size else 1.0
            default_atol, default_agreement = max(0.01, FP16_RELATIVE_ATOL * scale), FP16_MIN_AGREEMENT
        else:
            default_atol, default_agreement = FP32_ATOL, FP32_MIN_AGREEMENT
        n = len(reference)
        diff = float(np.abs(reference - exported).max()) if n else 0.0
        agree = float((reference.argmax(1) == exported.argmax(1)).mean()) if n else 1.0
        return ParityReport(n, batch_sizes, diff, agree, default_atol if atol is None else atol,
                            default_agreement if min_agreement is None else min_agreement,
                            measure="pixel agreement")

    def save_answer(self, answer: dict, image: np.ndarray, out_dir, stem: str, meta: dict,
                    overlay: bool = False) -> dict:
        """Writes OUT/<stem>.mask.png (palette PNG: values = class indices) and, with `overlay`,
        OUT/<stem>.overlay.png (the classes' colours over the image)."""
        from pathlib import Path

        from cvrecipe.data.mask_images import class_colours, mask_png, overlay_mask, rgb_png

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        colours = class_colours(len(meta["class_names"]), meta.get("class_colours"))
        answer = dict(answer)
        mask = answer.pop("mask")
        (out_dir / f"{stem}.mask.png").write_bytes(mask_png(mask, colours))
        answer["mask_file"] = str(out_dir / f"{stem}.mask.png")
        if overlay:
            (out_dir / f"{stem}.overlay.png").write_bytes(rgb_png(overlay_mask(image, mask, colours)))
            answer["overlay_file"] = str(out_dir / f"{stem}.overlay.png")
        return answer

    def output_spec(self, num_classes: int) -> dict:
        return {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, "height", "width"],
                "probabilities": "softmax over dimension 1, per pixel", "mask": "argmax over dimension 1",
                "tiles": "images larger than input_size are run in overlapping tiles of it, blended with "
                         "Gaussian weights (see 'tile')"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
