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
from cvrecipe.data.augment_boxes import crop_boxes, crop_images, random_flip, zoom_windows
from cvrecipe.data.ragged import DeviceBoxes
from cvrecipe.models.detectors import fast_nms
from cvrecipe.tasks.answers.detection import SCORE_THRESHOLD
from cvrecipe.tasks.base import Meter, Task, given
from cvrecipe.tasks.box_metrics import (APMeter, BoxParityReport, box_iou, coco_metrics, confusion_at_iou,
                                       interpolated_ap, match_detections, match_greedy, pad_truth)
from cvrecipe.tasks.registry import answers_of

ROWS = 100  # detections per image in the eval output (models/detectors.py MAX_DETECTIONS)
# Export parity limits on the eager detections matched (tasks/box_metrics.py match_detections). fp32:
# the same kernels up to summation order (measured on 64 px FCOS and RetinaNet in ONNX Runtime: every
# detection matched, corners within 6e-5 px, scores within 1e-6); 1 % may go unmatched where a score
# sits at the 0.05 cut or ties at the 100-row cut. fp16 keeps ~3 significant digits (measured, 64 px
# FCOS: corners within 0.09 px, scores within 1e-3), and near-tied candidates may swap in Fast NMS.
PARITY_FP32 = {"matched": 0.99, "box_px": 0.05, "score": 1e-3}
PARITY_FP16 = {"matched": 0.95, "box_px": 1.0, "score": 0.02}
# torchvision's sigmoid heads (FCOS, RetinaNet) start every class logit's bias at log(p / (1 - p)) with
# this prior p, and score them with sigmoid_focal_loss(alpha, gamma) summed and divided by the
# number of foreground locations (torchvision.models.detection.fcos / retinanet)
FOCAL_PRIOR, FOCAL_ALPHA, FOCAL_GAMMA = 0.01, 0.25, 2.0
# box-aware scale/translate: a box is dropped when its shorter side inside the image is under
# MIN_BOX_SIDE pixels or less than MIN_BOX_VISIBLE of its area stays inside (a sliver of an object
# at the border teaches a box the image no longer shows)
MIN_BOX_SIDE, MIN_BOX_VISIBLE = 2.0, 0.25


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


def focal_loss_at_prior(p: float = FOCAL_PRIOR, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
                        negatives_per_foreground: float = 0.0) -> float:
    """The classification loss of a sigmoid focal-loss head whose every logit sits at the prior p, per
    foreground location (the loss's own normaliser): the true class's term α(1 − p)^γ · (−ln p), plus
    (1 − α) p^γ · (−ln(1 − p)) for each (location, class) pair of background. At p = 0.01 these are
    1.128 and 7.5e-7: a detector with fewer than ~15,000 background pairs per foreground location
    (FCOS at 128 px: 341 locations × K classes) starts within 1 % of 1.128. The heads' conv weights
    (normal, std 0.01) spread the logits a little around the prior; −ln σ is nearly linear there, so
    the mean loss moves by a few per cent at most."""
    positive = alpha * (1 - p) ** gamma * -math.log(p)
    negative = (1 - alpha) * p ** gamma * -math.log(1 - p)
    return positive + negative * negatives_per_foreground


def _is_focal(model: torch.nn.Module) -> bool:
    """Does `model` hold one of torchvision's sigmoid focal-loss detectors (models/detectors.py)?"""
    from torchvision.models.detection import FCOS, RetinaNet

    return any(isinstance(m, (FCOS, RetinaNet)) for m in model.modules())


def image_scores(rows: torch.Tensor, targets: DeviceBoxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of eval rows (B, D, 6) against its boxes: (AP@0.5 of that image alone, COCO's
    matching, averaged over the classes it holds; 1 − a missed-object score), both (B,). The second,
    smooth in the scores: 1 − the mean over its objects of the best score of a detection of the same
    class at IoU ≥ 0.5. An image without objects: (1 − its best score, its best score)."""
    rows = rows.float().cpu()
    rows = rows.gather(1, rows[..., 4].argsort(dim=1, descending=True, stable=True)[..., None].expand(-1, -1, 6))
    truth, labels = pad_truth(*targets.to("cpu").per_image())
    hits = match_greedy(rows, truth, labels)  # (B, D)
    valid = (rows[..., 4] > 0) & (rows[..., 5] >= 0)
    same = (rows[..., 5, None].long() == labels[:, None, :]) & valid[..., None] & (labels[:, None, :] >= 0)
    found = torch.where(same & (box_iou(rows[..., :4], truth) >= 0.5), rows[..., 4, None], 0.0).amax(1)  # (B, G)
    right, missed = [], []
    for i in range(len(rows)):
        real = labels[i] >= 0
        if not real.any():
            best = float(rows[i, :, 4].max()) if rows.shape[1] else 0.0
            right.append(1.0 - best)
            missed.append(best)
            continue
        classes = labels[i][real].unique()
        right.append(float(np.mean([interpolated_ap(hits[i][valid[i] & (rows[i, :, 5] == k)],
                                                    int((labels[i] == k).sum())) for k in classes.tolist()])))
        missed.append(1.0 - float(found[i][real].mean()))
    return torch.tensor(right), torch.tensor(missed)


def batch_map50(rows: torch.Tensor, targets: DeviceBoxes, num_classes: int) -> float:
    """mAP@0.5 (COCO's rules) of eval rows (B, D, 6) over the batch's boxes."""
    meter = APMeter(num_classes)
    truth, labels = pad_truth(*targets.to("cpu").per_image())
    meter.update(rows.float().cpu(), truth, labels)
    return meter.compute()["map50"]


def _num_classes(targets: DeviceBoxes, rows: torch.Tensor | None = None) -> int:
    most = int(targets.flat[:, 4].max()) + 1 if len(targets.flat) else 1
    return max(most, int(rows[..., 5].max()) + 1) if rows is not None and rows.numel() else most


class Detection(Task):
    name = "detection"
    PARITY_IMAGES = 64
    # sanity checks: whole images (a detector is built for its input size), few of them; a detector
    # trains with frozen BatchNorm statistics there, so the boxes it gives in eval mode are those of
    # the network that was trained (batch statistics of a few images would not carry over). 128
    # held-out images: after 25 steps of 8 images a healthy FCOS on the 128 px synthetic set is only
    # just ahead of the zero-input model (measured on 64: +2.4 std, t = 3.6); evaluating is cheap.
    SANITY = {"init_batch": 8, "overfit_batch": 4, "train_batch": 8, "held_out": 128}
    SANITY_SCORE = "mAP@.5"
    SANITY_FROZEN_NORM = True
    # a detector memorises its boxes to mAP@.5 ~0.93-1.0 in 25-150 steps; what stays missed is an object
    # thinner than the finest feature stride (8 px), e.g. a 5 px-wide digit "1" (measured, 64 px images).
    # A broken setup scores near 0: a loss that ignores the boxes, a frozen network.
    SANITY_OVERFIT = (0.9, 0.5)

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

    def merge_views(self, outputs, size):
        """Each view's rows with their boxes mapped back to the image, pooled (B, V·100, 6) and
        suppressed again by the detectors' own class-aware Fast NMS into (B, 100, 6): a box found
        in several views is kept once, at its best score (no weighting: views vote by score)."""
        height, width = size
        rows = torch.cat([torch.cat([view.undo_boxes(out[..., :4], height, width), out[..., 4:]], dim=-1)
                          for view, out in outputs], dim=1)
        order = rows[..., 4].argsort(dim=1, descending=True)  # Fast NMS takes candidates best first
        rows = rows.gather(1, order[..., None].expand(-1, -1, rows.shape[-1]))
        return fast_nms(rows[..., :4], rows[..., 4], rows[..., 5].long(), max_detections=ROWS)

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
        """Flips (augment.hflip), then one zoom and shift per image (augment.scale: zoom factor range;
        augment.crop_padding: shift in pixels each way), boxes moved, clipped and dropped with their
        images (MIN_BOX_SIDE, MIN_BOX_VISIBLE). The border a zoom-out or shift uncovers is black,
        whatever augment.pad_mode says: reflected padding would show objects without their boxes."""
        rows = y.flat
        if policy.hflip and hflip_ok:
            x, rows = random_flip(x, rows, gen)
        if tuple(policy.scale) != (1.0, 1.0) or policy.crop_padding:
            size = tuple(x.shape[-2:])
            windows = zoom_windows(x.shape[0], *size, gen, tuple(policy.scale), policy.crop_padding)
            x, rows = crop_images(x, windows, size), crop_boxes(rows, windows, size, MIN_BOX_SIDE, MIN_BOX_VISIBLE)
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

    # -- sanity checks (train/sanity.py) ------------------------------------------------------
    def item_scores(self, outputs: torch.Tensor, targets: DeviceBoxes) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image of eval rows: (AP@0.5, 1 − the found objects' best scores) (`image_scores`)."""
        return image_scores(outputs, targets)

    def initial_loss(self, targets, num_classes: int, prior=None) -> float:
        """The focal-loss classification term at torchvision's prior (`focal_loss_at_prior`); the
        class balance does not enter: every class starts at the same prior."""
        return focal_loss_at_prior()

    def initial_loss_part(self, model: torch.nn.Module):
        """A sigmoid focal-loss detector (FCOS, RetinaNet): its classification loss against the prior's.
        Other detectors (softmax heads with sampled or hard-mined negatives): nothing derived (NaN)."""
        if _is_focal(model):
            return (lambda outputs, targets: outputs["classification"]), self.initial_loss(None, 0)
        return (lambda outputs, targets: self.loss(outputs, targets)), math.nan

    def fit_score(self, model: torch.nn.Module, x: torch.Tensor, targets: DeviceBoxes, outputs) -> float:
        """mAP@0.5 on the batch: train-mode outputs are losses, so the batch runs again in eval mode."""
        was = model.training
        with torch.no_grad():
            rows = model.eval()(x)
        model.train(was)
        return batch_map50(rows, targets, _num_classes(targets, rows))

    def chance(self, targets: DeviceBoxes) -> float:
        """The mean per-image AP@0.5 of an input-free guess that knows the set's boxes: each image is
        answered with the boxes of the images after it (cyclically, up to ROWS rows), the nearer
        image's scored higher. So the guess has the boxes' positions, sizes and classes, and many
        of them as a detector gives, but nothing of the image itself."""
        if len(targets) < 2:
            return 0.0
        boxes, labels = targets.to("cpu").per_image()
        n = len(boxes)
        guesses = []
        for i in range(n):
            rows = [torch.cat([boxes[j], torch.full((len(boxes[j]), 1), 1.0 / (1 + step)),
                               labels[j][:, None].float()], dim=1)
                    for step, j in enumerate((i + k) % n for k in range(1, n))]
            guesses.append(torch.cat(rows)[:ROWS])
        padded = torch.zeros(n, ROWS, 6)
        padded[..., 5] = -1
        for i, g in enumerate(guesses):
            padded[i, :len(g)] = g
        return float(image_scores(padded, targets.to("cpu"))[0].mean())

    def score_sigma(self, scores: torch.Tensor, p: float) -> float:
        """Per-image APs are not right-or-wrong trials: the standard error of their mean, from their
        own spread (floored at 0.001)."""
        return max(float(scores.float().std() / len(scores) ** 0.5), 1e-3) if len(scores) > 1 else 1e-3

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
