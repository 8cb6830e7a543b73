"""The detection task's parts: answers, targets on the device, loss, meter, evaluation and config rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvrecipe.config import ConfigError, load_config
from cvrecipe.data.box_targets import BoxTargets
from cvrecipe.data.ragged import DeviceBoxes
from cvrecipe.models import create_model
from cvrecipe.tasks import answers_of, get_task
from cvrecipe.tasks.box_metrics import coco_metrics
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)


# torch on one thread: a 64 px FCOS step took 0.16 s on one thread and 0.4-13 s on two of a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


FLAT = np.asarray([[1, 2, 11, 12, 0, 0], [5, 5, 20, 25, 2, 1], [0, 0, 8, 8, 1, 1], [30, 30, 40, 44, 1, 3]], np.float32)
OFFSETS = np.asarray([0, 1, 3, 3, 4])  # image 2 has no box


def test_the_answer_layer_keeps_confident_rows_in_the_image_pixels():
    rows = np.asarray([[[10, 20, 30, 40, 0.9, 1], [0, 0, 4, 4, 0.2, 0], [8, 8, 16, 16, 0.6, 0], [0, 0, 0, 0, 0, -1]]],
                      np.float32)
    meta = {"class_names": ["cat", "dog"], "input_size": [64, 128]}
    out = answers_of("detection").answers(rows, meta, k=5, score_threshold=0.5, image_sizes=[(128, 256)])
    assert out == [{"boxes": [
        {"x1": 20.0, "y1": 40.0, "x2": 60.0, "y2": 80.0, "score": pytest.approx(0.9), "class": "dog"},
        {"x1": 16.0, "y1": 16.0, "x2": 32.0, "y2": 32.0, "score": pytest.approx(0.6), "class": "cat"}]}]
    assert len(answers_of("detection").answers(rows, meta, k=1, score_threshold=0.0)[0]["boxes"]) == 1
    assert answers_of("detection").text({"boxes": []}) == "no boxes"
    with pytest.raises(ValueError, match="score_threshold=1.5"):
        answers_of("detection").answers(rows, meta, score_threshold=1.5)


def test_annotate_draws_each_box_in_its_class_colour_on_a_copy():
    annotate = answers_of("detection").annotate
    image = np.full((80, 100), 128, np.uint8)  # grey, one channel
    found = [{"x1": 10.0, "y1": 30.0, "x2": 60.0, "y2": 70.0, "score": 0.9, "class": "b"}]
    drawn = annotate(image, found, ["a", "b"])
    colour = answers_of("detection").PALETTE[1]
    assert drawn.shape == (80, 100, 3) and drawn.dtype == np.uint8
    assert tuple(drawn[50, 10]) == colour and tuple(drawn[50, 60]) == colour  # left and right edges
    assert tuple(drawn[50, 35]) == (128, 128, 128)  # inside the box: untouched
    assert (image == 128).all()  # the input is not drawn on


def test_device_boxes_gather_and_slice_as_the_host_targets_do():
    host, device = BoxTargets(FLAT, OFFSETS), DeviceBoxes.from_arrays(FLAT, OFFSETS)
    for index in (np.asarray([3, 1]), np.asarray([2]), np.asarray([1, 0, 3, 2])):
        got = device[torch.from_numpy(index)]
        want = host[index]
        np.testing.assert_array_equal(got.flat.numpy(), want.flat)
        np.testing.assert_array_equal(got.offsets.numpy(), want.offsets)
    np.testing.assert_array_equal(device[1:3].flat.numpy(), host[1:3].flat)
    targets = device[torch.tensor([1, 2])].targets()
    assert [len(t["boxes"]) for t in targets] == [2, 0] and targets[0]["labels"].tolist() == [2, 1]


def test_the_batch_order_survives_augmentation_that_reorders_rows():
    device = DeviceBoxes.from_arrays(FLAT, OFFSETS)
    shuffled = device.with_rows(device.flat[torch.tensor([3, 1, 0, 2])])
    np.testing.assert_array_equal(shuffled.offsets.numpy(), OFFSETS)
    np.testing.assert_array_equal(shuffled.flat[:, 5].numpy(), FLAT[:, 5])


def test_the_loss_is_the_detectors_loss_dict_summed_and_the_meter_counts_eval_batches_only():
    task = get_task("detection")
    torch.manual_seed(0)
    model = create_model("fcos-lite0-scratch", 3, 3, (64, 64), outputs="boxes", fpn_channels=32)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    y = DeviceBoxes.from_arrays(FLAT, OFFSETS)[torch.tensor([0, 1])]
    model.train()
    torch.manual_seed(1)
    losses = task.forward(model, x, y)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    torch.manual_seed(1)
    reference = model(x, [{"boxes": torch.tensor(FLAT[:1, :4]), "labels": torch.tensor([0])},
                          {"boxes": torch.tensor(FLAT[1:3, :4]), "labels": torch.tensor([2, 1])}])
    assert task.loss(losses, y).item() == pytest.approx(sum(v.item() for v in reference.values()), rel=1e-5)
    meter = task.meter(3, torch.device("cpu"))
    meter.update({k: v.detach() for k, v in losses.items()}, y)
    assert math.isnan(meter.compute()["map50"])  # train mode gives no boxes to score
    model.eval()
    with torch.no_grad():
        rows = model(x)
    assert rows.shape == (2, 100, 6) and math.isnan(task.loss(rows, y).item())
    meter.update(rows, y)
    assert 0.0 <= meter.compute()["map50"] <= 1.0


def test_evaluate_gives_pycocotools_figures_and_perfect_rows_score_one():
    task = get_task("detection")
    y = DeviceBoxes.from_arrays(FLAT, OFFSETS)
    rows = torch.zeros(4, 100, 6)
    rows[..., 5] = -1
    for i in range(4):  # every object found exactly, score 0.9
        part = FLAT[OFFSETS[i]:OFFSETS[i + 1]]
        rows[i, :len(part), :4] = torch.from_numpy(part[:, :4])
        rows[i, :len(part), 4] = 0.9
        rows[i, :len(part), 5] = torch.from_numpy(part[:, 4])
    result = task.evaluate(rows, y, ["a", "b", "c"])
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert result["num_images"] == 4 and result["num_boxes"] == 4
    rows[1, 0, :4] += 6  # one box shifted: the figures are pycocotools', unchanged by the task
    result = task.evaluate(rows, y, ["a", "b", "c"])
    boxes, labels = y.per_image()
    reference = coco_metrics([b.numpy() for b in boxes], [lab.numpy() for lab in labels], list(rows.numpy()),
                             ["a", "b", "c"])
    assert result["map"] == reference["map"] < 1.0
    assert np.asarray(result["confusion_at_iou50"]).sum() >= 4


@pytest.mark.parametrize("override, named", [
    ("checkpoint.monitor=val_loss", "checkpoint.monitor=val_loss"),
    ("augment.cutout=4", "augment.cutout=4"),
    ("data.name=digits", "data.name=digits"),
])
def test_switches_a_detection_run_does_not_understand_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("detect-synth", [override])
