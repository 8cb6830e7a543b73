"""Sanity checks on a detector: each passes on a tiny healthy FCOS (pretrained Lite0, 64 px digits on
noise) and fails on the breakage it exists to catch."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.data.ragged import DeviceBoxes
from cvrecipe.data.sources import digits
from cvrecipe.data.synth_detect import compose, write_split
from cvrecipe.tasks import get_task
from cvrecipe.tasks.detection import FOCAL_ALPHA, FOCAL_GAMMA, FOCAL_PRIOR, Detection, focal_loss_at_prior
from cvrecipe.train import sanity
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
CLASSES = 3  # digits 0, 1, 2 as objects


def digit_boxes(out: Path, splits: dict[str, tuple[int, int]]) -> Path:
    """Digits 0-2 pasted on dark noise at 64 px, 1-2 per image, COCO JSON + YOLO; {split: (images, seed)}."""
    ds = digits(Path("."))
    keep = ds.train.y < CLASSES
    bg = np.random.default_rng(0).integers(0, 60, (4, 3, 16, 16)).astype(np.uint8)
    for split, (n, seed) in splits.items():
        items = compose(ds.train.x[keep], ds.train.y[keep], bg, n, (64, 64), seed=seed, max_objects=2)
        write_split(out, split, items, [str(i) for i in range(CLASSES)])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, dataset, initial model, task, (train x, y), (held-out x, y), generator)."""
    tmp = tmp_path_factory.mktemp("det-sanity")
    path = digit_boxes(tmp / "set", {"train": (200, 1), "val": (64, 2)})
    cfg = load_config("detect-synth", [f"data.name=boxes:{path}", "data.image_size=64", f"data.cache_dir={tmp}",
                                       "model.kwargs={fpn_channels: 32}", "train.num_threads=1", "train.sanity=true"])
    ds = load_dataset(cfg.data, seed=0)
    task = get_task("detection", cfg)
    gen = torch.Generator().manual_seed(cfg.train.seed + sanity.SEED_OFFSET)
    train = sanity._draw(ds.train.x, ds.train.y, 200, gen, task)
    held = sanity._draw(ds.val.x, ds.val.y, 64, gen, task)
    return cfg, ds, sanity.initial_model(cfg, ds), task, train, held, gen


def test_the_expected_initial_loss_is_torchvisions_focal_loss_at_the_prior():
    logit = torch.tensor([math.log(FOCAL_PRIOR / (1 - FOCAL_PRIOR))])
    positive = sigmoid_focal_loss(logit, torch.ones(1), FOCAL_ALPHA, FOCAL_GAMMA).item()
    negative = sigmoid_focal_loss(logit, torch.zeros(1), FOCAL_ALPHA, FOCAL_GAMMA).item()
    assert focal_loss_at_prior() == pytest.approx(positive, rel=1e-6) == pytest.approx(1.1284, abs=1e-4)
    assert focal_loss_at_prior(negatives_per_foreground=3410) == pytest.approx(positive + 3410 * negative, rel=1e-6)


def test_init_loss_passes_at_the_prior_and_fails_when_the_class_bias_starts_at_zero(setup):
    cfg, ds, model, task, (x, y), _, _ = setup
    part, expected = task.initial_loss_part(model)
    healthy = sanity.check_init_loss(model, x[:8], y[:8], part, expected, CPU, task)
    assert healthy.status == "pass" and healthy.values["deviation"] < 0.05, healthy.message
    broken = [m for m in model.modules() if hasattr(m, "cls_logits")][0]
    with torch.no_grad():
        saved = broken.cls_logits.bias.clone()
        broken.cls_logits.bias.zero_()  # prior 0.5: every background location weighs in
    try:
        result = sanity.check_init_loss(model, x[:8], y[:8], part, expected, CPU, task)
    finally:
        with torch.no_grad():
            broken.cls_logits.bias.copy_(saved)
    assert result.status == "fail" and result.values["loss"] > 3 * expected, result.message


def test_init_loss_is_skipped_for_a_detector_without_a_derived_value(setup):
    cfg, ds, _, task, (x, y), _, _ = setup
    from cvrecipe.models import create_model

    torch.manual_seed(0)
    model = create_model("fasterrcnn-mobilenet320", CLASSES, 3, (64, 64), outputs="boxes")
    part, expected = task.initial_loss_part(model)
    result = sanity.check_init_loss(model, x[:2], y[:2], part, expected, CPU, task)
    assert math.isnan(expected) and result.status == "skip" and "no expected value" in result.message


class IgnoresBoxes(Detection):
    """A broken training step: the detector is always given the same box, whatever the image holds."""

    def forward(self, model, x, targets):
        fixed = DeviceBoxes(torch.tensor([[8.0, 8.0, 40.0, 40.0, 0.0, 0.0]]), torch.tensor([0, 1]))
        return super().forward(model, x, fixed[torch.zeros(len(x), dtype=torch.long)])


def test_overfit_reaches_map_near_one_and_fails_on_a_loss_that_ignores_the_boxes(setup, monkeypatch):
    cfg, ds, model, task, (x, y), _, _ = setup
    loss = sanity.training_loss(cfg)
    healthy = sanity.check_overfit_batch(model, x[:4], y[:4], loss, CPU, task=task)
    assert healthy.status == "pass" and healthy.values["accuracy"] >= 0.9, healthy.message
    monkeypatch.setattr(sanity, "OVERFIT_STEPS", 15)  # the healthy detector needed ~15; a broken one never gets there
    broken = sanity.check_overfit_batch(model, x[:4], y[:4], loss, CPU, task=IgnoresBoxes())
    assert broken.status == "fail" and broken.values["accuracy"] < 0.3, broken.message
    frozen = sanity.check_overfit_batch(model.requires_grad_(False), x[:4], y[:4], loss, CPU, task=task)
    model.requires_grad_(True)
    assert frozen.status == "fail" and "no trainable parameters" in frozen.message


def _identity(images, boxes, gen):
    return images, boxes


@pytest.mark.slow
def test_zero_input_passes_and_fails_when_the_boxes_are_shuffled_across_images(setup):
    cfg, ds, model, task, (x, y), (hx, hy), gen = setup
    loss = sanity.training_loss(cfg)
    args = (loss, _identity, gen, CPU, task.item_scores, task, 8)
    healthy = sanity.check_zero_input(model, (x, y), (hx, hy), *args)
    assert healthy.status == "pass", healthy.message
    shuffle = torch.Generator().manual_seed(5)
    y_bad, hy_bad = task.shuffle_targets(y, shuffle), task.shuffle_targets(hy, shuffle)
    broken = sanity.check_zero_input(model, (x, y_bad), (hx, hy_bad), *args)
    assert broken.status == "fail", broken.message


def _leaky(images, boxes: DeviceBoxes, gen):
    """A pipeline bug: every box is painted into its image, class by class, in the first channel."""
    images = images.clone()
    for x1, y1, x2, y2, cls, i in boxes.flat.round().long().tolist():
        images[i, 0, y1:y2, x1:x2] = 80 + 80 * cls
    return images, boxes


@pytest.mark.slow
def test_label_leak_passes_and_fails_when_the_pipeline_paints_the_boxes_into_the_image(setup):
    cfg, ds, model, task, (x, y), (hx, hy), gen = setup
    loss = sanity.training_loss(cfg)
    healthy = sanity.check_label_leak(model, (x, y), (hx, hy), loss, _identity, gen, CPU, task.item_scores, task, 8)
    assert healthy.status == "pass", healthy.message
    broken = sanity.check_label_leak(model, (x, y), (hx, hy), loss, _leaky, gen, CPU, task.item_scores, task, 8)
    assert broken.status == "fail" and broken.values["sigmas"] > sanity.LEAK_SIGMAS_FAIL, broken.message


def test_item_scores_and_chance_on_hand_made_boxes():
    task = get_task("detection")
    flat = np.array([[0, 0, 10, 10, 0, 0], [20, 20, 30, 30, 1, 0], [5, 5, 15, 15, 1, 1]], np.float32)
    y = DeviceBoxes.from_arrays(flat, np.array([0, 2, 3]))
    rows = torch.zeros(2, 100, 6)
    rows[..., 5] = -1
    rows[0, 0] = torch.tensor([0, 0, 10, 10, 0.9, 0])  # image 0: one object found, the other missed
    rows[0, 1] = torch.tensor([50, 50, 60, 60, 0.8, 1])  # a false positive
    rows[1, 0] = torch.tensor([5, 5, 15, 16, 0.6, 1])  # image 1: found at IoU 0.91
    right, missed = task.item_scores(rows, y)
    np.testing.assert_allclose(right.numpy(), [0.5, 1.0])  # AP of class 0 is 1, of class 1 is 0
    np.testing.assert_allclose(missed.numpy(), [1 - 0.45, 1 - 0.6], rtol=1e-6)
    # the input-free guess: image 0 answered with image 1's box and image 1 with image 0's
    assert task.chance(y) == pytest.approx(0.0)
    same = DeviceBoxes.from_arrays(np.array([[0, 0, 10, 10, 0, 0], [0, 0, 10, 10, 0, 1]], np.float32),
                                   np.array([0, 1, 2]))
    assert task.chance(same) == pytest.approx(1.0)  # every image alike: the guess is right


@pytest.mark.slow
def test_all_checks_pass_on_a_healthy_detector(setup):
    cfg, ds, *_ = setup
    results = sanity.run_checks(cfg, ds)
    assert [(r.name, r.status) for r in results] == [
        ("init-loss", "pass"), ("overfit", "pass"), ("zero-input", "pass"), ("label-leak", "pass")], \
        [r.message for r in results]
