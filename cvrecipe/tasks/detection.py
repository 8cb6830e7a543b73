"""Object detection: boxes per image. Targets are ragged (data/box_targets.py on the host,
data/ragged.py DeviceBoxes on the training device: flat (M, 6) rows [x1, y1, x2, y2, class, image]
in the model's input pixels); outputs are the detectors' fixed-shape rows (B, 100, 6)
[x1, y1, x2, y2, score, class] in eval mode (models/detectors.py), and their dict of losses in
train mode.

- loss: the sum of the detector's own losses (torchvision's: classification + box regression
  (+ centerness for FCOS)), each a mean over its batch. A detector has no loss in eval mode, so
  the validation loss is not measured (NaN); checkpoints are picked on val_map50.
- meter: mAP@0.5 on the device (tasks/box_metrics.py APMeter, COCO's rules). In train mode a
  detector returns losses, not boxes, so train_map50 is not measured (NaN).
- evaluate: pycocotools' COCO metrics (mAP@[.5:.95], mAP@.5, mAP@.75, AP by object size, AR@100,
  per-class AP), the precision-recall curves at IoU 0.5, each image's true positives, false
  positives and misses at IoU 0.5, and the confusion matrix at IoU 0.5 with background; the last
  two count the detections an answer keeps (score ≥ answers.detection.SCORE_THRESHOLD).
- answers: tasks/answers/detection.py (boxes in the input image's pixels, class names).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from rich.table import Table

from cvrecipe.config import AugmentConfig
from cvrecipe.data.augment_boxes import random_flip
from cvrecipe.data.ragged import DeviceBoxes
from cvrecipe.tasks.answers.detection import SCORE_THRESHOLD
from cvrecipe.tasks.base import Meter, Task, given
from cvrecipe.tasks.box_metrics import (APMeter, BoxParityReport, coco_metrics, confusion_at_iou, match_detections,
                                       pad_truth)
from cvrecipe.tasks.registry import answers_of

ROWS = 100  # detections per image in the eval output (models/detectors.py MAX_DETECTIONS)
# Export parity limits on the eager detections matched (tasks/box_metrics.py match_detections). fp32:
# the same kernels up to summation order (measured on 64 px FCOS and RetinaNet in ONNX Runtime: every
# detection matched, corners within 6e-5 px, scores within 1e-6); 1 % may go unmatched where a score
# sits at the 0.05 cut or ties at the 100-row cut. fp16 keeps ~3 significant digits (measured, 64 px
# FCOS: corners within 0.09 px, scores within 1e-3), and near-tied candidates may swap in Fast NMS.
PARITY_FP32 = {"matched": 0.99, "box_px": 0.05, "score": 1e-3}
PARITY_FP16 = {"matched": 0.95, "box_px": 1.0, "score": 0.02}


class BoxAPMeter(Meter):
    """mAP@0.5 over the eval-mode batches it sees; train-mode outputs (a dict of losses) carry no boxes."""

    def __init__(self, num_classes: int, device: torch.device):
        self.ap = APMeter(num_classes)
        self.batches = 0

    def update(self, outputs, targets: DeviceBoxes) -> None:
        if isinstance(outputs, dict):  # train mode: losses only
            return
        boxes, labels = targets.to(outputs.device).per_image()
        truth, truth_labels = pad_truth(boxes, labels)
        self.ap.update(outputs.float(), truth.to(outputs.device), truth_labels.to(outputs.device))
        self.batches += 1

    def compute(self) -> dict[str, float]:
        return {"map50": self.ap.compute()["map50"] if self.batches else math.nan}


class Detection(Task):
    name = "detection"
    PARITY_IMAGES = 64

    def model_kwargs(self, config) -> dict:
        return {}  # the detectors take no dropout (spec: model.dropout is refused)

    # -- targets -------------------------------------------------------------------------------
    def device_targets(self, y, device: torch.device) -> DeviceBoxes:
        return DeviceBoxes.from_arrays(y.flat, y.offsets, device)

    def batch_targets(self, y, start: int, stop: int) -> DeviceBoxes:
        part = y[start:stop]
        return DeviceBoxes.from_arrays(part.flat, part.offsets)

    def shuffle_targets(self, targets: DeviceBoxes, gen: torch.Generator) -> DeviceBoxes:
        return targets[torch.randperm(len(targets), generator=gen)]

    # -- outputs -------------------------------------------------------------------------------
    def merge_batches(self, outputs: list[torch.Tensor], meta: dict) -> torch.Tensor:
        return torch.cat(outputs) if outputs else torch.zeros(0, ROWS, 6)

    def merge_views(self, weighted):
        if len(weighted) == 1:  # no test-time augmentation: the one plain view
            return weighted[0][1]
        raise ValueError("eval.tta: test-time augmentation is not supported for detection (boxes of flipped views "
                         "would need merging, not averaging)")

    def export_outputs(self) -> list[str]:
        return ["detections"]

    # -- training ------------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, x: torch.Tensor, targets: DeviceBoxes):
        """A detector in train mode takes the targets and returns its losses."""
        return model(x, targets.targets())

    def loss(self, outputs, targets: DeviceBoxes, label_smoothing: float = 0.0) -> torch.Tensor:
        if not isinstance(outputs, dict):  # eval-mode rows: a detector has no loss there
            return torch.tensor(math.nan)
        return sum(outputs.values())

    def augment(self, x: torch.Tensor, y: DeviceBoxes, policy: AugmentConfig, hflip_ok: bool, gen: torch.Generator,
                base_flip: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, DeviceBoxes]:
        if not (policy.hflip and hflip_ok):
            return x, y
        x, rows = random_flip(x, y.flat, gen)
        return x, y.with_rows(rows)

    def meter(self, num_classes: int, device: torch.device) -> Meter:
        return BoxAPMeter(num_classes, device)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, outputs: torch.Tensor, targets: DeviceBoxes, class_names: list[str]) -> dict:
        boxes, labels = targets.per_image()
        boxes, labels = [b.numpy() for b in boxes], [lab.numpy() for lab in labels]
        detections = list(outputs.float().numpy())
        result = coco_metrics(boxes, labels, detections, class_names, SCORE_THRESHOLD)
        confusion = confusion_at_iou(boxes, labels, detections, len(class_names), SCORE_THRESHOLD)
        return {"num_images": len(targets), "num_boxes": int(sum(len(lab) for lab in labels)), **result,
                "confusion_at_iou50": np.asarray(confusion).tolist(),
                "loss": None}

    def headline(self, result: dict) -> str:
        return (f"mAP@[.5:.95] {_f(result['map'])}, mAP@.5 {_f(result['map50'])}, AR@100 {_f(result['ar100'])}")

    def table(self, result: dict) -> Table:
        table = Table(title=f"{result['dataset']} [{result['split']}]: {self.headline(result)} "
                            f"({result['num_images']} images, {result['num_boxes']} boxes)")
        for col in ("class", "AP", "AP@.5", "boxes"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for name, row in result["per_class"].items():
            table.add_row(name, _f(row["ap"]), _f(row["ap50"]), str(row["boxes"]))
        table.add_row("mean", _f(result["map"]), _f(result["map50"]), str(result["num_boxes"]), style="bold")
        return table

    def item_scores(self, outputs, targets):
        raise NotImplementedError("the sanity checks are not written for task=detection yet (train.sanity=false)")

    def parity(self, reference: np.ndarray, exported: np.ndarray, batch_sizes: list[int], half: bool,
               atol: float | None = None, min_agreement: float | None = None) -> BoxParityReport:
        """The eager model's detections (N, 100, 6) scoring >= 0.05 found among the export's (same class,
        IoU >= 0.9, greedy by score); on matched pairs the largest box and score differences. `atol`
        overrides the box limit (px), `min_agreement` the share matched."""
        if reference.shape[0] != exported.shape[0] or reference.shape[2:] != exported.shape[2:]:
            raise ValueError(f"exported model gives detections of shape {exported.shape}, eager model "
                             f"{reference.shape}")
        found = match_detections(reference, exported)
        limits = PARITY_FP16 if half else PARITY_FP32
        return BoxParityReport(len(reference), batch_sizes, found.max_box_diff, found.share,
                               limits["box_px"] if atol is None else atol,
                               limits["matched"] if min_agreement is None else min_agreement,
                               measure="matched detections", outputs="box px",
                               max_score_diff=found.max_score_diff, score_atol=limits["score"],
                               detections=found.reference)

    def answers(self, outputs: torch.Tensor, meta: dict, k: int | None = None,
                image_sizes: list[tuple[int, int]] | None = None) -> list[dict]:
        """Boxes in each image's own pixels when `image_sizes` is given (the model saw it resized); at
        most `k` per image (default: the answer layer's MAX_DETECTIONS)."""
        return answers_of(self.name).answers(outputs.float().numpy(), meta, image_sizes=image_sizes, **given(k=k))

    DRAWS_ANSWERS = True

    def draw_answer(self, answer: dict, image: np.ndarray, meta: dict) -> np.ndarray:
        return answers_of(self.name).annotate(image, answer["boxes"], meta["class_names"])

    def output_spec(self, num_classes: int) -> dict:
        return {"name": "detections", "dtype": "float32", "shape": ["batch", ROWS, 6],
                "rows": "[x1, y1, x2, y2, score, class] in input pixels, best first; padding has score 0, class -1"}


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
