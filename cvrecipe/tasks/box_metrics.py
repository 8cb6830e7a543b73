"""Detection metrics: COCO's through pycocotools, a cheap mAP@0.5 on the device, a confusion matrix.

Detections everywhere are the detectors' fixed-shape rows (B, D, 6) [x1, y1, x2, y2, score, class]
(padding: score 0, class -1), or per-image arrays of the same columns; ground truth is per image
(n, 4) x1y1x2y2 pixel boxes and (n,) int64 classes.

- `coco_metrics`: a thin adapter into pycocotools (the reference every detection paper reports):
  mAP@[.5:.95], mAP@.5, mAP@.75, AP by object size (COCO's small < 32², medium < 96², large, by box
  area), AR@100, per-class AP and AP@.5; from the same evaluation, the precision-recall curves at
  IoU 0.5 and each image's true positives, false positives and misses (its own matching, read at
  a score threshold).
- `APMeter`: mAP@0.5 accumulated batch by batch on the device for per-epoch validation. It follows
  COCO's rules at IoU 0.5 (per class; detections in score order each take the best-overlapping
  unmatched ground truth; 101-point interpolated precision), so it agrees with pycocotools' AP@.5
  up to how ties in score are ordered (tests/tasks/test_box_metrics.py measures the gap).
- `confusion_at_iou`: (K + 1, K + 1) counts at IoU 0.5 with a background row (false positives) and
  column (missed objects).
- `match_rate`: share of one set of detections found in another (class equal, IoU ≥ 0.99).
- `match_detections`: the export parity measure: the eager model's detections found in an exported
  model's (class equal, IoU ≥ 0.9, greedy by score), with the largest box and score differences of
  the matched pairs (padded arrays differ where tied low scores reorder, so they are not compared).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from cvrecipe.tasks.base import ParityReport

RECALL_POINTS = torch.from_numpy(np.linspace(0.0, 1.0, 101))  # COCO's recall thresholds, its exact float64 values
AREA_SMALL, AREA_LARGE = 32 ** 2, 96 ** 2  # COCO's object size limits, pixels²
MATCH_IOU = 0.9  # export parity: an exported detection is the eager one when of its class and overlapping this much


def _valid(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64).reshape(-1, 6)
    return rows[(rows[:, 5] >= 0) & (rows[:, 4] > 0)]


# ---- pycocotools -----------------------------------------------------------------------------------

def coco_metrics(truth_boxes: list, truth_labels: list, detections: list, class_names: list[str],
                 score_threshold: float = 0.25) -> dict:
    """COCO box metrics over a split. truth_*: per image (n, 4) and (n,); detections: per image
    (d, 6) rows (padding ignored). Returns {map, map50, map75, map_small, map_medium, map_large, ar100,
    per_class: {name: {ap, ap50, boxes}}, pr_at_iou50, per_image}; a size or class without any object
    gives None (COCO's -1). pr_at_iou50 and per_image come from the same pycocotools evaluation:
    - pr_at_iou50: [{"class", "precision": 101 values at RECALL_POINTS}] per class (None for a class
      without objects) and last {"class": "all classes"} (their mean): COCOeval's accumulated
      interpolated precision at IoU 0.5, all sizes, 100 detections; its mean is the AP@.5;
    - per_image: [{"index", "tp", "fp", "missed", "f1", "false_rows": detection row indices, "missed_boxes":
      object indices}] at IoU 0.5 for the detections scoring ≥ `score_threshold` (image_outcomes)."""
    gt, results, dt_rows = _coco_inputs(truth_boxes, truth_labels, detections, class_names)
    counts = np.bincount([a["category_id"] - 1 for a in gt["annotations"]], minlength=len(class_names))
    if not results or not gt["annotations"]:  # pycocotools cannot load an empty result list
        per_image = image_outcomes(None, truth_labels, detections, dt_rows, score_threshold)
        zeros = [0.0] * len(RECALL_POINTS)
        pr = [{"class": n, "precision": zeros if c else None} for n, c in zip(class_names, counts)]
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "map_small": None, "map_medium": None, "map_large": None,
                "ar100": 0.0, "per_class": {n: {"ap": 0.0 if c else None, "ap50": 0.0 if c else None, "boxes": int(c)}
                                            for n, c in zip(class_names, counts)},
                "pr_at_iou50": pr + [{"class": "all classes", "precision": zeros if counts.any() else None}],
                "per_image": per_image}
    evaluation = cocoeval(gt, results)
    stats = [None if s < 0 else float(s) for s in evaluation.stats]
    precision = evaluation.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max dets)
    per_class = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]  # all areas, 100 detections per image
        per_class[name] = {"ap": float(p[p > -1].mean()) if (p > -1).any() else None,
                           "ap50": float(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else None,
                           "boxes": int(counts[k])}
    return {"map": stats[0], "map50": stats[1], "map75": stats[2], "map_small": stats[3], "map_medium": stats[4],
            "map_large": stats[5], "ar100": stats[8], "per_class": per_class,
            "pr_at_iou50": pr_curves(evaluation, class_names),
            "per_image": image_outcomes(evaluation, truth_labels, detections, dt_rows, score_threshold)}


def cocoeval(truth: dict, results: list[dict]):
    """pycocotools' box evaluation (a COCOeval, evaluated, accumulated and summarised) of COCO
    `results` (a non-empty list: pycocotools cannot load an empty one) against the `truth` dataset dict."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        coco = COCO()
        coco.dataset = truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def pr_curves(evaluation, class_names: list[str]) -> list[dict]:
    """The precision-recall curves at IoU 0.5 that pycocotools accumulated: COCOeval.eval["precision"]
    at IoU index 0 (params.iouThrs[0] = 0.5), all sizes, 100 detections per image; -1 (a class
    without objects) becomes None. "all classes" averages the classes that have objects, point by
    point, so its mean is pycocotools' mAP@.5."""
    assert evaluation.params.iouThrs[0] == 0.5 and evaluation.params.areaRngLbl[0] == "all"
    at50 = evaluation.eval["precision"][0, :, :, 0, -1]  # (101 recall points, classes)
    curves = [{"class": name, "precision": at50[:, k].tolist() if (at50[:, k] > -1).all() else None}
              for k, name in enumerate(class_names)]
    present = (at50 > -1).all(0)
    overall = at50[:, present].mean(1).tolist() if present.any() else None
    return curves + [{"class": "all classes", "precision": overall}]


def image_outcomes(evaluation, truth_labels: list, detections: list, dt_rows: list[tuple[int, int]],
                   score_threshold: float) -> list[dict]:
    """Per image, at IoU 0.5, pycocotools' own matching (COCOeval.evalImgs: per class, detections
    best first each take the best unmatched object of their class) read at a score threshold:
    a detection scoring ≥ `score_threshold` is a true positive when matched, else a false positive
    (a right box of the wrong class is one, and its object a miss); an object is missed unless a
    detection above the threshold matched it. Greedy matching in score order means the detections
    above a threshold match as they would alone. `dt_rows`: (image, row) of each COCO result id − 1.
    f1 = 2·tp / (2·tp + fp + missed), 1 for an image with nothing to find and nothing found."""
    found = [set() for _ in detections]  # detection rows that matched, per image
    matched = [set() for _ in detections]  # COCO annotation ids of the objects they matched
    if evaluation is not None:
        for e in evaluation.evalImgs:
            if e is None or e["aRng"] != evaluation.params.areaRng[0]:  # the "all" size range only
                continue
            for dt_id, gt_id, score in zip(e["dtIds"], e["dtMatches"][0], e["dtScores"]):
                if gt_id > 0 and score >= score_threshold:
                    image, row = dt_rows[dt_id - 1]
                    found[image].add(row)
                    matched[image].add(int(gt_id))
    out, first_id = [], 1  # annotation ids run 1.. over the images in order (_coco_inputs)
    for i, (labels, rows) in enumerate(zip(truth_labels, detections)):
        n, scores = len(np.asarray(labels).reshape(-1)), np.asarray(rows, np.float64).reshape(-1, 6)[:, 4]
        above = [r for r in _valid_rows(rows) if scores[r] >= score_threshold]
        false = [r for r in above if r not in found[i]]
        missed = [t for t in range(n) if first_id + t not in matched[i]]
        tp, fp = len(above) - len(false), len(false)
        f1 = 2 * tp / (2 * tp + fp + len(missed)) if tp + fp + len(missed) else 1.0
        out.append({"index": i, "tp": tp, "fp": fp, "missed": len(missed), "f1": f1, "false_rows": false,
                    "missed_boxes": missed})
        first_id += n
    return out


def _coco_inputs(truth_boxes, truth_labels, detections, class_names) -> tuple[dict, list[dict], list[tuple[int, int]]]:
    """The ground truth as a COCO dataset dict, the detections as COCO results (bbox x, y, w, h;
    category ids 1..K; area = box area, which COCO's size ranges read), and the (image, row) of each
    result: loadRes numbers results 1.. in list order."""
    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]}
    results, dt_rows = [], []
    for i, (boxes, labels, rows) in enumerate(zip(truth_boxes, truth_labels, detections)):
        gt["images"].append({"id": i + 1})
        for (x1, y1, x2, y2), label in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels)):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                      "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        all_rows = np.asarray(rows, np.float64).reshape(-1, 6)
        for r in _valid_rows(rows):
            x1, y1, x2, y2, score, label = all_rows[r]
            results.append({"image_id": i + 1, "category_id": int(label) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
            dt_rows.append((i, int(r)))
    return gt, results, dt_rows


def _valid_rows(rows) -> list[int]:
    """Indices of the real detections among an image's (D, 6) rows (not padding)."""
    rows = np.asarray(rows, np.float64).reshape(-1, 6)
    return np.flatnonzero((rows[:, 5] >= 0) & (rows[:, 4] > 0)).tolist()


# ---- mAP@0.5 on the device -------------------------------------------------------------------------

def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D, 4), (B, G, 4) → (B, D, G) IoU."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    wh = (torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:]) - torch.maximum(a[:, :, None, :2], b[:, None, :, :2]))
    inter = wh.clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def match_greedy(detections: torch.Tensor, truth: torch.Tensor, truth_labels: torch.Tensor,
                 iou_threshold: float = 0.5) -> torch.Tensor:
    """COCO's matching for one batch: detections (B, D, 6) sorted by score; truth (B, G, 4) with
    labels (B, G), -1 for padding. Returns (B, D) bool: true positive. Each detection, best first,
    takes the unmatched object of its class it overlaps most, if that IoU ≥ the threshold."""
    batch, count = detections.shape[:2]
    iou = box_iou(detections[..., :4], truth)  # (B, D, G)
    same = detections[..., 5, None].long() == truth_labels[:, None, :]
    iou = torch.where(same & (truth_labels[:, None, :] >= 0), iou, torch.full_like(iou, -1.0))
    free = torch.ones_like(truth_labels, dtype=torch.bool)
    hits = torch.zeros(batch, count, dtype=torch.bool, device=detections.device)
    if truth_labels.shape[1] == 0:
        return hits
    rows = torch.arange(batch, device=detections.device)
    real = int((detections[..., 4] > 0).sum(1).max()) if count else 0  # sorted: padding comes last
    for d in range(real):  # greedy matching is sequential in score order: ≤ 100 small steps
        candidate = torch.where(free, iou[:, d], torch.full_like(iou[:, d], -1.0))  # (B, G)
        best, which = candidate.max(dim=1)
        hit = (best >= iou_threshold) & (detections[:, d, 4] > 0)
        hits[:, d] = hit
        free[rows, which] &= ~hit
    return hits


class APMeter:
    """mAP@0.5 over a split, batch by batch: `update` keeps each detection's (score, class, hit) on
    the device and counts objects per class; `compute` does the precision-recall sums once."""

    def __init__(self, num_classes: int, iou_threshold: float = 0.5):
        self.num_classes, self.iou_threshold = num_classes, iou_threshold
        self.scores, self.classes, self.hits = [], [], []
        self.objects = torch.zeros(num_classes, dtype=torch.long)

    def update(self, detections: torch.Tensor, truth: torch.Tensor, truth_labels: torch.Tensor) -> None:
        """detections (B, D, 6) from a detector; truth (B, G, 4) and truth_labels (B, G) padded with -1."""
        order = detections[..., 4].argsort(dim=1, descending=True, stable=True)
        detections = detections.gather(1, order[..., None].expand(-1, -1, 6))
        hits = match_greedy(detections, truth, truth_labels, self.iou_threshold)
        valid = (detections[..., 4] > 0) & (detections[..., 5] >= 0)
        self.scores.append(detections[..., 4][valid])
        self.classes.append(detections[..., 5][valid].long())
        self.hits.append(hits[valid])
        labels = truth_labels[truth_labels >= 0]
        self.objects = self.objects.to(labels.device) + torch.bincount(labels, minlength=self.num_classes)

    def compute(self) -> dict:
        """{"map50": mean AP@0.5 over classes with objects, "ap50": [per class, None where no object]}."""
        scores, classes, hits = torch.cat(self.scores), torch.cat(self.classes), torch.cat(self.hits)
        per_class = []
        for k in range(self.num_classes):
            count = int(self.objects[k])
            if count == 0:
                per_class.append(None)
                continue
            mine = classes == k
            order = scores[mine].argsort(descending=True, stable=True)
            per_class.append(interpolated_ap(hits[mine][order], count))
        present = [ap for ap in per_class if ap is not None]
        return {"map50": float(np.mean(present)) if present else 0.0, "ap50": per_class}


def interpolated_ap(hits: torch.Tensor, objects: int) -> float:
    """COCO's AP from hits in score order: precision made monotone from the right, read at the 101
    recall points (0 beyond the highest recall reached), averaged."""
    if len(hits) == 0:
        return 0.0
    tp = hits.double().cumsum(0)
    fp = (~hits).double().cumsum(0)
    recall = tp / objects
    precision = tp / (tp + fp).clamp(min=1)
    precision = precision.flip(0).cummax(0).values.flip(0)  # envelope
    at = torch.searchsorted(recall, RECALL_POINTS.to(recall), right=False)  # first rank reaching each recall
    reached = at < len(precision)
    sampled = torch.zeros(len(RECALL_POINTS), dtype=torch.double, device=recall.device)
    sampled[reached] = precision[at[reached]]
    return float(sampled.mean())


def pad_truth(boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (n_i, 4) boxes and (n_i,) labels → (B, G, 4) and (B, G) padded with label -1."""
    most = max([len(b) for b in boxes] + [1])
    out = torch.zeros(len(boxes), most, 4)
    out_labels = torch.full((len(boxes), most), -1, dtype=torch.long)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out[i, :len(b)], out_labels[i, :len(b)] = torch.as_tensor(b, dtype=torch.float32), torch.as_tensor(lab)
    return out, out_labels


# ---- confusion and parity --------------------------------------------------------------------------

def confusion_at_iou(truth_boxes: list, truth_labels: list, detections: list, num_classes: int,
                     score_threshold: float = 0.25, iou_threshold: float = 0.5) -> np.ndarray:
    """(K + 1, K + 1) counts, rows true class, columns predicted class, index K = background.
    Detections above `score_threshold` are paired one-to-one with objects, class-agnostic, highest
    IoU first (≥ `iou_threshold`); a pair counts at [true, predicted] (off the diagonal: right place,
    wrong class), an unpaired object at [true, K] (missed), an unpaired detection at [K, predicted]."""
    from torchvision.ops import box_iou as iou_one

    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for boxes, labels, rows in zip(truth_boxes, truth_labels, detections):
        rows = _valid(rows)
        rows = rows[rows[:, 4] >= score_threshold]
        labels = np.asarray(labels, np.int64)
        iou = iou_one(torch.as_tensor(np.asarray(boxes, np.float64).reshape(-1, 4)),
                      torch.as_tensor(rows[:, :4])).numpy()  # (objects, detections)
        pairs = np.argwhere(iou >= iou_threshold)
        pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
        used_t, used_d = set(), set()
        for t, d in pairs:
            if t not in used_t and d not in used_d:
                used_t.add(t), used_d.add(d)
                matrix[labels[t], int(rows[d, 5])] += 1
        for t in set(range(len(labels))) - used_t:
            matrix[labels[t], num_classes] += 1
        for d in set(range(len(rows))) - used_d:
            matrix[num_classes, int(rows[d, 5])] += 1
    return matrix


def match_rate(reference: np.ndarray, other: np.ndarray, iou_threshold: float = 0.99) -> tuple[int, int]:
    """(matched, total): how many of `reference`'s real detections (B, D, 6) have a detection in
    `other` of the same image and class with IoU ≥ `iou_threshold`, or the same corners to 1e-3 px
    (each used once)."""
    from torchvision.ops import box_iou as iou_one

    matched = total = 0
    for ref, oth in zip(reference, other):
        ref, oth = _valid(ref), _valid(oth)
        total += len(ref)
        if not len(ref) or not len(oth):
            continue
        iou = iou_one(torch.as_tensor(ref[:, :4]), torch.as_tensor(oth[:, :4])).numpy()
        same_place = np.abs(ref[:, None, :4] - oth[None, :, :4]).max(-1) <= 1e-3  # zero-area boxes too (IoU 0/0)
        iou = np.where(same_place, 1.0, np.nan_to_num(iou))
        iou[ref[:, 5][:, None] != oth[:, 5][None, :]] = 0
        used = set()
        for r in range(len(ref)):
            for o in np.argsort(-iou[r]):
                if iou[r, o] < iou_threshold:
                    break
                if o not in used:
                    used.add(o)
                    matched += 1
                    break
    return matched, total


# ---- export parity ---------------------------------------------------------------------------------

@dataclass
class MatchedDetections:
    """Detections of one model found in another's (see match_detections)."""
    reference: int  # the reference's detections that were looked for
    matched: int
    max_box_diff: float  # max |corner difference| over matched pairs, pixels
    max_score_diff: float  # max |score difference| over matched pairs

    @property
    def share(self) -> float:
        return self.matched / self.reference if self.reference else 1.0


def match_detections(reference: np.ndarray, other: np.ndarray, iou_threshold: float = MATCH_IOU,
                     min_score: float = 0.05) -> MatchedDetections:
    """Find each of `reference`'s detections (B, D, 6) scoring ≥ `min_score` in `other` (B, D', 6), per
    image: greedy by the reference's score, best first, each takes the unused detection of `other` of
    the same class with the highest IoU, if that IoU is ≥ `iou_threshold`. Padded arrays are not
    compared row by row: tied low scores may swap rows without changing any detection."""
    from torchvision.ops import box_iou as iou_one

    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} images of reference detections, {len(other)} of the other's")
    looked = matched = 0
    box_diff = score_diff = 0.0
    for ref, oth in zip(reference, other):
        ref, oth = _valid(ref), _valid(oth)
        ref = ref[np.argsort(-ref[:, 4], kind="stable")]
        ref = ref[ref[:, 4] >= min_score]
        looked += len(ref)
        if not len(ref) or not len(oth):
            continue
        iou = iou_one(torch.as_tensor(ref[:, :4]), torch.as_tensor(oth[:, :4])).numpy()
        iou = np.where(np.abs(ref[:, None, :4] - oth[None, :, :4]).max(-1) <= 1e-3, 1.0, np.nan_to_num(iou))
        iou[ref[:, 5][:, None] != oth[:, 5][None, :]] = -1  # another class never matches
        for r in range(len(ref)):
            o = int(np.argmax(iou[r]))
            if iou[r, o] < iou_threshold:
                continue
            iou[:, o] = -1  # used
            matched += 1
            box_diff = max(box_diff, float(np.abs(ref[r, :4] - oth[o, :4]).max()))
            score_diff = max(score_diff, float(abs(ref[r, 4] - oth[o, 4])))
    return MatchedDetections(looked, matched, box_diff, score_diff)


@dataclass
class BoxParityReport(ParityReport):
    """ParityReport of a detector's export: `agreement` is the share of the eager model's detections
    matched, `max_abs_diff` the largest |box corner diff| (px) of matched pairs; their score
    difference has its own limit."""
    max_score_diff: float = 0.0
    score_atol: float = 0.0
    detections: int = 0  # the eager model's detections looked for

    @property
    def passed(self) -> bool:
        return super().passed and self.max_score_diff <= self.score_atol

    def summary(self) -> str:
        return (f"{self.agreement:.2%} of {self.detections} eager detections matched (limit {self.min_agreement:.2%}; "
                f"same class, IoU >= {MATCH_IOU}), max |box diff| {self.max_abs_diff:.3g} px (limit {self.atol:.3g}), "
                f"max |score diff| {self.max_score_diff:.3g} (limit {self.score_atol:.3g}) on {self.images} images")
