"""Image classification: one label per image, logits (B, K) per batch.

Metric conventions follow scikit-learn (zero_division=0): a class never predicted has precision
0, a class absent from the labels has recall 0; macro averages weight every class equally.
Export parity (fp32: |logit diff| ≤ 1e-4 and the same top-1 class for every image, since
differences come only from kernel summation order, ~1e-6 here; fp16: ≤ 1% of the largest
reference logit, at least 0.01, and ≥ 99% agreement, since half precision keeps ~3 significant
digits and near-ties may flip).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from cvrecipe.config import AugmentConfig
from cvrecipe.data.augment import augment_batch
from cvrecipe.tasks.base import Meter, ParityReport, Task

FP32_ATOL, FP32_MIN_AGREEMENT = 1e-4, 1.0
FP16_RELATIVE_ATOL, FP16_MIN_AGREEMENT = 1e-2, 0.99  # atol: of max |reference logit|


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts; row = true class, column = predicted class."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, y_true: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == y_true[:, None]).any(dim=1)
    return hits.float().mean().item()


def classification_metrics(logits: torch.Tensor, y_true: torch.Tensor, class_names: list[str]) -> dict:
    """Everything `cvrecipe eval` reports, as plain JSON-able values."""
    num_classes = len(class_names)
    y_pred = logits.argmax(dim=1)
    cm = confusion_matrix(y_true, y_pred, num_classes).double()
    tp = cm.diag()
    predicted, support = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    result = {
        "num_images": int(len(y_true)),
        "accuracy": (tp.sum() / max(1, len(y_true))).item(),
        "loss": F.cross_entropy(logits.float(), y_true.long()).item(),
        "macro_precision": precision.mean().item(),
        "macro_recall": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        "per_class": [
            {"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())
        ],
        "confusion_matrix": cm.long().tolist(),
    }
    if num_classes > 5:
        result["top5_accuracy"] = topk_accuracy(logits, y_true, 5)
    return result


class AccuracyMeter(Meter):
    """Correct top-1 predictions, counted on the device."""

    def __init__(self, device: torch.device):
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += (outputs.argmax(1) == targets).sum()
        self.count += len(targets)

    def compute(self) -> dict[str, float]:
        return {"acc": self.correct.item() / max(1, self.count)}


class Classification(Task):
    name = "classification"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)

    def augment(self, x: torch.Tensor, y: torch.Tensor, policy: AugmentConfig, hflip_ok: bool, gen: torch.Generator,
                base_flip: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(x, policy, hflip_ok, gen, base_flip, epoch), y  # the label does not move

    def meter(self, num_classes: int, device: torch.device) -> Meter:
        return AccuracyMeter(device)

    def item_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = outputs.float()
        return (outputs.argmax(1) == targets).float(), F.cross_entropy(outputs, targets, reduction="none")

    def calibration_pairs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.float(), targets.long()

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict:
        return classification_metrics(outputs, targets, class_names)

    def headline(self, result: dict) -> str:
        top5 = f", top-5 {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else ""
        return f"accuracy {result['accuracy']:.4f}{top5}, macro F1 {result['macro_f1']:.4f}"

    def table(self, result: dict) -> Table:
        table = Table(title=f"{result['dataset']} [{result['split']}]: {self.headline(result)} "
                            f"({result['num_images']} images)")
        for col in ("class", "precision", "recall", "f1", "support"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in result["per_class"]:
            table.add_row(row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                          str(row["support"]))
        table.add_row("macro avg", f"{result['macro_precision']:.4f}", f"{result['macro_recall']:.4f}",
                      f"{result['macro_f1']:.4f}", str(result["num_images"]), style="bold")
        return table

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
                            default_agreement if min_agreement is None else min_agreement)
