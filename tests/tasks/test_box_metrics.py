"""Detection metrics: pycocotools on hand-made cases, the on-device mAP@0.5 against pycocotools,
the confusion matrix at IoU 0.5 with background, and the detection match rate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cvrecipe.tasks.box_metrics import APMeter, coco_metrics, confusion_at_iou, match_rate, pad_truth

CLASSES = ["a", "b"]
TRUTH_BOXES = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([[0, 0, 100, 100]], float)]
TRUTH_LABELS = [np.array([0, 1]), np.array([1])]


def rows(*dets):
    return np.array(dets, float).reshape(-1, 6)


def test_perfect_predictions_score_one_everywhere():
    perfect = [rows([0, 0, 10, 10, .9, 0], [20, 20, 40, 40, .8, 1]), rows([0, 0, 100, 100, .7, 1])]
    found = coco_metrics(TRUTH_BOXES, TRUTH_LABELS, perfect, CLASSES)
    for key in ("map", "map50", "map75", "map_small", "map_large", "ar100"):
        assert found[key] == pytest.approx(1.0)
    assert found["map_medium"] is None  # no object between 32² and 96² pixels: COCO's -1
    assert found["per_class"]["b"] == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "boxes": 2}


def test_a_false_positive_above_the_true_one_halves_that_class_ap():
    """Class a: a false positive at score .95, then the true positive at .9. Precision is 0 then 1/2
    at recall 1; interpolated (made monotone from the right) it is 1/2 at every recall point: AP 0.5.
    Class b is perfect: mAP = (0.5 + 1) / 2."""
    dets = [rows([0, 0, 10, 10, .9, 0], [20, 20, 40, 40, .8, 1], [50, 50, 60, 60, .95, 0]),
            rows([0, 0, 100, 100, .7, 1])]
    found = coco_metrics(TRUTH_BOXES, TRUTH_LABELS, dets, CLASSES)
    assert found["per_class"]["a"]["ap"] == pytest.approx(0.5)
    assert found["map"] == pytest.approx(0.75) and found["ar100"] == pytest.approx(1.0)
    meter = APMeter(2)
    meter.update(torch.tensor(np.stack([np.pad(d, ((0, 3 - len(d)), (0, 0))) for d in dets])).float(),
                 *pad_truth([torch.tensor(b) for b in TRUTH_BOXES], [torch.tensor(lab) for lab in TRUTH_LABELS]))
    assert meter.compute() == {"map50": pytest.approx(0.75), "ap50": [pytest.approx(0.5), pytest.approx(1.0)]}


def test_a_box_shifted_to_iou_one_half_counts_at_map50_only_partly_over_thresholds():
    """IoU of [0, 0, 10, 10] and [0, 0, 10, 15] is 100/150 = 0.667: a hit at thresholds 0.50–0.65
    (4 of 10), a miss above, so AP over [.5:.95] is 0.4 and AP@.5 is 1."""
    found = coco_metrics([np.array([[0, 0, 10, 10]], float)], [np.array([0])], [rows([0, 0, 10, 15, .9, 0])], ["a"])
    assert found["map50"] == pytest.approx(1.0) and found["map"] == pytest.approx(0.4)
    assert found["map75"] == pytest.approx(0.0)


def random_case(seed: int, images: int = 12, classes: int = 3):
    """Objects, and detections that are noisy copies of them plus clutter, with distinct scores."""
    rng = np.random.default_rng(seed)
    truth_boxes, truth_labels, dets = [], [], []
    for _ in range(images):
        n = rng.integers(0, 6)
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(8, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, classes, n)
        noisy = boxes + rng.normal(0, 3, boxes.shape)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)  # detectors' boxes are never inverted
        flip = rng.random(n) < 0.2
        det_labels = np.where(flip, rng.integers(0, classes, n), labels)
        clutter_xy = rng.uniform(0, 80, (rng.integers(0, 8), 2))
        clutter = np.concatenate([clutter_xy, clutter_xy + rng.uniform(5, 30, clutter_xy.shape)], 1)
        all_boxes = np.concatenate([noisy, clutter])
        all_labels = np.concatenate([det_labels, rng.integers(0, classes, len(clutter))])
        scores = rng.uniform(0.05, 1, len(all_boxes))
        d = np.zeros((100, 6))
        d[:, 5] = -1
        d[:len(all_boxes)] = np.column_stack([all_boxes, scores, all_labels])
        truth_boxes.append(boxes)
        truth_labels.append(labels)
        dets.append(d)
    return truth_boxes, truth_labels, dets


@pytest.mark.parametrize("seed", range(5))
def test_the_device_map50_agrees_with_pycocotools(seed):
    """Same matching and interpolation as COCO at IoU 0.5; scores are continuous (no ties to order
    differently), so the two agree to float rounding: 1e-6 allows for IoUs computed in float32
    here and float64 there landing on either side of 0.5 only when one is within ~1e-7 of it."""
    truth_boxes, truth_labels, dets = random_case(seed)
    reference = coco_metrics(truth_boxes, truth_labels, dets, ["a", "b", "c"])
    meter = APMeter(3)
    for start in range(0, len(dets), 5):  # in batches, as validation runs
        part = slice(start, start + 5)
        meter.update(torch.tensor(np.stack(dets[part])).float(),
                     *pad_truth([torch.tensor(b) for b in truth_boxes[part]],
                                [torch.tensor(lab) for lab in truth_labels[part]]))
    mine = meter.compute()
    assert mine["map50"] == pytest.approx(reference["map50"], abs=1e-6)
    for k, name in enumerate(["a", "b", "c"]):
        want = reference["per_class"][name]["ap50"]
        assert (mine["ap50"][k] is None and want is None) or mine["ap50"][k] == pytest.approx(want, abs=1e-6)
    assert 0.2 < reference["map50"] < 0.95  # a case with both hits and misses


def test_confusion_matrix_counts_hits_confusions_misses_and_false_positives():
    dets = [rows([0, 0, 10, 10, .9, 1],  # right place, wrong class: [a, b]
                 [20, 20, 40, 40, .8, 1],  # hit: [b, b]
                 [60, 60, 70, 70, .9, 0],  # nothing there: [background, a]
                 [20, 20, 40, 40, .1, 0]),  # under the score threshold: ignored
            rows()]  # the second image's object is missed: [b, background]
    matrix = confusion_at_iou(TRUTH_BOXES, TRUTH_LABELS, dets, 2)
    np.testing.assert_array_equal(matrix, [[0, 1, 0], [0, 1, 1], [1, 0, 0]])


def test_match_rate_finds_the_same_detections_in_another_order():
    _, _, dets = random_case(7, images=3)
    shuffled = np.stack([d[np.random.default_rng(0).permutation(len(d))] for d in dets])
    matched, total = match_rate(np.stack(dets), shuffled)
    assert matched == total > 0
    moved = shuffled.copy()
    moved[..., :4] += 2.0  # IoU well under 0.99 for these sizes
    assert match_rate(np.stack(dets), moved)[0] == 0


# ---- precision-recall curves and per-image outcomes at IoU 0.5 ---------------------------------------

PAD = [0, 0, 0, 0, 0, -1]
OUTCOME_TRUTH = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float),  # a, b
                 np.array([[0, 0, 100, 100], [60, 60, 90, 90]], float),  # b, a
                 np.zeros((0, 4)),  # nothing
                 np.array([[10, 10, 20, 20]], float)]  # a
OUTCOME_LABELS = [np.array([0, 1]), np.array([1, 0]), np.array([], int), np.array([0])]
OUTCOME_DETS = [rows([0, 0, 10, 10, .9, 0],  # row 0: a found
                     [50, 50, 60, 60, .95, 0],  # row 1: a where nothing is: false
                     [20, 20, 40, 40, .3, 1],  # row 2: b found
                     [20, 20, 40, 40, .8, 0],  # row 3: right place, wrong class: false (b is found by row 2)
                     [0, 0, 10, 10, .1, 1],  # row 4: below the 0.25 threshold: not counted
                     PAD),
                rows([2, 2, 100, 100, .6, 1],  # row 0: a duplicate of row 1's find: false
                     [0, 0, 100, 100, .7, 1],  # row 1: b found
                     [60, 60, 90, 90, .2, 0],  # row 2: would find a, but scores below the threshold: a missed
                     PAD),
                rows([5, 5, 15, 15, .5, 0], PAD),  # row 0: false, on an image without objects
                rows(PAD)]  # a missed


def test_each_image_counts_true_positives_false_positives_and_misses_at_the_threshold():
    found = coco_metrics(OUTCOME_TRUTH, OUTCOME_LABELS, OUTCOME_DETS, CLASSES, score_threshold=0.25)["per_image"]
    expected = [{"index": 0, "tp": 2, "fp": 2, "missed": 0, "f1": pytest.approx(4 / 6), "false_rows": [1, 3],
                 "missed_boxes": []},
                {"index": 1, "tp": 1, "fp": 1, "missed": 1, "f1": pytest.approx(2 / 4), "false_rows": [0],
                 "missed_boxes": [1]},
                {"index": 2, "tp": 0, "fp": 1, "missed": 0, "f1": 0.0, "false_rows": [0], "missed_boxes": []},
                {"index": 3, "tp": 0, "fp": 0, "missed": 1, "f1": 0.0, "false_rows": [], "missed_boxes": [0]}]
    assert found == expected
    lower = coco_metrics(OUTCOME_TRUTH, OUTCOME_LABELS, OUTCOME_DETS, CLASSES, score_threshold=0.15)["per_image"]
    assert (lower[1]["tp"], lower[1]["missed"]) == (2, 0)  # row 2 now counts, and finds a


def pycocotools_ap50_of_one_class(k: int) -> float:
    """pycocotools' own AP@.5 (summarize's stats[1]) with the evaluation restricted to class k."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(OUTCOME_TRUTH))],
                      "categories": [{"id": c + 1} for c in range(len(CLASSES))],
                      "annotations": [{"id": len(OUTCOME_TRUTH) * 10 + i * 10 + j, "image_id": i + 1,
                                       "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                       "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                                      for i, (boxes, labels) in enumerate(zip(OUTCOME_TRUTH, OUTCOME_LABELS))
                                      for j, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, labels))]}
        gt.createIndex()
        dets = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                for i, d in enumerate(OUTCOME_DETS) for x1, y1, x2, y2, s, c in d if c >= 0]
        evaluation = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluation.params.catIds = [k + 1]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])


def test_the_precision_recall_curves_area_is_pycocotools_ap50_per_class():
    """Class a, 3 objects; its detections best first: false, hit, false, false, hit: precision
    made monotone from the right is 1/2 up to recall 1/3 (34 of COCO's 101 recall points), 2/5 up
    to 2/3 (33 points), 0 beyond: AP@.5 = (34·0.5 + 33·0.4) / 101. Class b, 2 objects: hit,
    false, hit, false: 1 up to recall 1/2 (51 points), 2/3 up to 1 (50 points)."""
    found = coco_metrics(OUTCOME_TRUTH, OUTCOME_LABELS, OUTCOME_DETS, CLASSES)
    curves = {c["class"]: np.array(c["precision"]) for c in found["pr_at_iou50"]}
    assert list(curves) == ["a", "b", "all classes"] and all(len(c) == 101 for c in curves.values())
    np.testing.assert_allclose(curves["a"], [0.5] * 34 + [0.4] * 33 + [0.0] * 34)
    np.testing.assert_allclose(curves["b"], [1.0] * 51 + [2 / 3] * 50)
    hand = {"a": (34 * 0.5 + 33 * 0.4) / 101, "b": (51 + 50 * 2 / 3) / 101}
    for k, name in enumerate(CLASSES):
        assert curves[name].mean() == pytest.approx(hand[name])
        assert curves[name].mean() == pytest.approx(pycocotools_ap50_of_one_class(k))
        assert curves[name].mean() == pytest.approx(found["per_class"][name]["ap50"])
    assert curves["all classes"].mean() == pytest.approx(found["map50"])


def test_a_class_without_objects_has_no_curve_and_empty_results_still_count_misses():
    found = coco_metrics([np.array([[0, 0, 10, 10]], float)], [np.array([0])], [rows([0, 0, 10, 10, .9, 0])],
                         ["a", "b"])
    assert found["pr_at_iou50"][1] == {"class": "b", "precision": None}
    nothing = coco_metrics(OUTCOME_TRUTH, OUTCOME_LABELS, [rows(PAD)] * 4, CLASSES)
    assert [(r["tp"], r["fp"], r["missed"]) for r in nothing["per_image"]] == [(0, 0, 2), (0, 0, 2), (0, 0, 0),
                                                                              (0, 0, 1)]
    assert nothing["pr_at_iou50"][-1]["precision"] == [0.0] * 101
