"""Classification metrics from predictions: accuracy, top-k, per-class P/R/F1, confusion matrix.

Conventions follow scikit-learn (zero_division=0): a class never predicted has precision 0, a
class absent from the labels has recall 0; macro averages weight every class equally.
"""
from __future__ import annotations

import torch


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
        "loss": torch.nn.functional.cross_entropy(logits.float(), y_true.long()).item(),
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
