"""Segmentation losses and metrics against MONAI's and a NumPy confusion matrix, the ignore index
included; metrics accumulate over the whole split (not a mean of batch scores); export parity."""
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric, MeanIoU

from cvrecipe.data import IGNORE
from cvrecipe.tasks import get_task
from cvrecipe.tasks.segmentation import (DICE_EPS, ConfusionMeter, pixel_cross_entropy, segmentation_metrics,
                                         soft_dice_loss)


def predictions(n=5, k=3, size=24, seed=0, ignore=0.1):
    """Logits mostly right (so the scores are not trivial), masks with `ignore` of pixels IGNORE."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, (n, size, size))
    logits = rng.normal(size=(n, k, size, size))
    logits += 2.0 * np.eye(k)[y].transpose(0, 3, 1, 2) * (rng.random((n, 1, size, size)) < 0.7)
    y = np.where(rng.random(y.shape) < ignore, IGNORE, y).astype(np.uint8)
    return torch.tensor(logits, dtype=torch.float32), torch.from_numpy(y)


def numpy_scores(logits: np.ndarray, y: np.ndarray, k: int) -> dict:
    pred = logits.argmax(1)
    keep = y != IGNORE
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y[keep].astype(int), pred[keep]), 1)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    return {"cm": cm, "acc": tp.sum() / cm.sum(), "iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn)}


@pytest.mark.parametrize("seed, k", [(0, 3), (1, 2), (2, 5)])
def test_metrics_match_a_numpy_confusion_matrix_with_ignored_pixels(seed, k):
    logits, y = predictions(k=k, seed=seed)
    result = segmentation_metrics(logits, y, [f"c{i}" for i in range(k)])
    ref = numpy_scores(logits.numpy(), y.numpy(), k)
    assert result["confusion_matrix"] == ref["cm"].tolist()
    assert result["pixels"] == int((y != IGNORE).sum())
    assert result["pixel_accuracy"] == pytest.approx(ref["acc"])
    assert [c["iou"] for c in result["per_class"]] == pytest.approx(ref["iou"].tolist())
    assert [c["dice"] for c in result["per_class"]] == pytest.approx(ref["dice"].tolist())
    assert result["miou"] == pytest.approx(ref["iou"].mean())
    assert result["mean_dice"] == pytest.approx(ref["dice"].mean())


def test_per_image_metrics_match_monai():
    """Without ignored pixels, one image at a time: MONAI's DiceMetric and MeanIoU on one-hot masks."""
    logits, y = predictions(k=3, ignore=0.0, seed=3)
    result = segmentation_metrics(logits, y, ["a", "b", "c"])
    onehot = lambda t: torch.nn.functional.one_hot(t.long(), 3).permute(0, 3, 1, 2).float()  # noqa: E731
    pred, truth = onehot(logits.argmax(1)), onehot(y)
    dice = DiceMetric(include_background=True, reduction="none")(pred, truth)  # (N, K)
    iou = MeanIoU(include_background=True, reduction="none")(pred, truth)
    for i, row in enumerate(result["per_image"]):
        assert row["dice"] == pytest.approx(dice[i].mean().item(), abs=1e-6)
        assert row["miou"] == pytest.approx(iou[i].mean().item(), abs=1e-6)


def test_metrics_are_accumulated_over_the_split_not_averaged_per_batch():
    logits, y = predictions(n=6, seed=4)
    whole = segmentation_metrics(logits, y, ["a", "b", "c"])
    meter = ConfusionMeter(3, torch.device("cpu"))
    batch_scores = []
    for start, stop in ((0, 1), (1, 6)):  # uneven batches: a mean of batch scores would differ
        meter.update(logits[start:stop], y[start:stop])
        batch_scores.append(segmentation_metrics(logits[start:stop], y[start:stop], ["a", "b", "c"])["miou"])
    got = meter.compute()
    assert got["pixel_acc"] == pytest.approx(whole["pixel_accuracy"])
    assert got["miou"] == pytest.approx(whole["miou"]) and got["dice"] == pytest.approx(whole["mean_dice"])
    assert abs(np.mean(batch_scores) - whole["miou"]) > 1e-4


def test_losses_match_monai_dice_ce():
    logits, y = predictions(n=4, k=3, ignore=0.0, seed=5)
    logits.requires_grad_(True)
    ours = get_task("segmentation").__class__()
    ours.settings.loss = "ce+dice"
    monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, smooth_nr=DICE_EPS, smooth_dr=DICE_EPS)
    assert ours.loss(logits, y).item() == pytest.approx(monai(logits, y[:, None].long()).item(), rel=1e-5)
    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True, smooth_nr=DICE_EPS, smooth_dr=DICE_EPS)
    assert soft_dice_loss(logits, y).item() == pytest.approx(dice(logits, y[:, None].long()).item(), rel=1e-5)


def test_ignored_pixels_count_in_no_loss():
    """Loss with IGNORE pixels = loss computed on the labelled pixels alone (as a flat 'image')."""
    logits, y = predictions(n=3, k=3, ignore=0.3, seed=6)
    keep = y != IGNORE
    flat_logits = logits.permute(1, 0, 2, 3)[:, keep][None, :, :, None]  # (1, K, P, 1)
    flat_y = y[keep][None, :, None]
    assert pixel_cross_entropy(logits, y).item() == pytest.approx(pixel_cross_entropy(flat_logits, flat_y).item())
    assert soft_dice_loss(logits, y).item() == pytest.approx(soft_dice_loss(flat_logits, flat_y).item(), rel=1e-5)
    scrambled = torch.where(keep[:, None], logits, torch.randn_like(logits) * 10)  # only under ignored pixels
    assert pixel_cross_entropy(scrambled, y).item() == pytest.approx(pixel_cross_entropy(logits, y).item())
    assert soft_dice_loss(scrambled, y).item() == pytest.approx(soft_dice_loss(logits, y).item(), rel=1e-5)


def test_item_scores_and_chance_per_pixel():
    task = get_task("segmentation")
    logits, y = predictions(n=4, seed=7)
    right, loss = task.item_scores(logits, y)
    for i in range(4):
        keep = y[i] != IGNORE
        assert right[i].item() == pytest.approx((logits[i].argmax(0) == y[i].long())[keep].float().mean().item())
    assert loss.shape == (4,)
    counts = np.bincount(y.numpy()[y.numpy() != IGNORE])
    assert task.chance(y) == pytest.approx(counts.max() / counts.sum())


def test_parity_measures_pixels():
    task = get_task("segmentation")
    ref = np.random.default_rng(0).normal(size=(2, 2, 40, 50)).astype(np.float32)
    assert task.parity(ref, ref + 1e-5, [4], half=False).passed
    flipped = ref.copy()
    flipped[0, :, :10, :10] = flipped[0, ::-1, :10, :10]  # 100 of 4,000 pixels change class
    report = task.parity(ref, flipped, [4], half=False)
    assert not report.passed and report.agreement < 0.999 and "pixel agreement" in report.summary()
