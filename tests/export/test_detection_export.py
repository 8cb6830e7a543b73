"""A detector's export: `cvrecipe export RUN --format onnx --dynamic-batch` writes a graph with the
post-processing (Fast NMS) inside, ONNX Runtime finds the eager model's detections, model.json says
what the output is, and the parity measure (matched detections) fails where it must. Detectors that
cannot be exported are refused with the reason."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import load_images_for_model, predict_logits
from cvrecipe.export.exporter import ExportError, export_model
from cvrecipe.imagefile import expand_image_paths
from cvrecipe.models import create_model
from cvrecipe.tasks import get_task
from cvrecipe.tasks.box_metrics import match_detections

from detect_helpers import exported_detector  # noqa: F401 (fixture)
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(*detections, pad_to: int = 5) -> np.ndarray:
    """One image's (pad_to, 6) rows from (x1, y1, x2, y2, score, class) tuples, padded as the detectors pad."""
    out = np.zeros((pad_to, 6), np.float32)
    out[:, 5] = -1
    out[:len(detections)] = detections
    return out


def test_parity_matches_detections_not_rows_and_fails_on_a_moved_box_or_a_changed_class():
    eager = np.stack([rows((10, 10, 30, 30, 0.9, 0), (40, 40, 60, 60, 0.30, 1), (5, 40, 20, 60, 0.30, 2)),
                      rows((0, 0, 64, 64, 0.5, 1), (1, 1, 2, 2, 0.04, 0))])  # under 0.05: not looked for
    swapped = eager.copy()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]  # tied scores in the other order: the same detections
    task = get_task("detection")
    report = task.parity(eager, swapped, [2], half=False)
    assert report.passed and report.agreement == 1.0 and report.detections == 4 and report.max_abs_diff == 0
    moved = swapped.copy()
    moved[0, 0, :4] += [0.5, 0, 0.5, 0]  # IoU 0.95: still the same detection, but half a pixel off
    moved[1, 0, 4] = 0.502
    report = task.parity(eager, moved, [2], half=False)
    assert report.agreement == 1.0 and report.max_abs_diff == pytest.approx(0.5)
    assert report.max_score_diff == pytest.approx(0.002, abs=1e-6)
    assert not report.passed and "0.5 px" in report.summary()  # box limit 0.05 px (fp32)
    assert task.parity(eager, moved, [2], half=True).passed  # fp16 allows 1 px and 0.02
    relabelled = swapped.copy()
    relabelled[1, 0, 5] = 2  # another class: not the eager detection
    report = task.parity(eager, relabelled, [2], half=False)
    assert report.agreement == 0.75 and not report.passed
    assert match_detections(eager, relabelled).matched == 3


def test_detectors_that_cannot_export_are_refused_with_the_reason(tmp_path):
    images = np.zeros((2, 3, 64, 64), np.uint8)
    model = create_model("fasterrcnn-mobilenet320", 3, 3, (64, 64), outputs="boxes")
    model.meta["task"] = "detection"
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportError, match="fasterrcnn-mobilenet320 cannot be exported to .*two-stage"):
            export_model(model, images, tmp_path / "export", fmt)
    ssd = create_model("ssdlite320", 3, 3, (64, 64), outputs="boxes")
    ssd.meta["task"] = "detection"
    for dynamic in (True, False):
        with pytest.raises(ExportError, match="ssdlite320 cannot be exported to onnx.*--format torchscript"):
            export_model(ssd, images, tmp_path / "export", "onnx", dynamic_batch=dynamic)
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_cvrecipe_export_writes_a_detector_that_onnx_runtime_runs_like_the_eager_model(exported_detector):
    onnxruntime = pytest.importorskip("onnxruntime")
    run, data = exported_detector  # `cvrecipe export RUN --format onnx --dynamic-batch` ran on it
    manifest = json.loads((run / "export" / "model.json").read_text())
    assert manifest["task"] == "detection"
    assert manifest["output"]["name"] == "detections" and manifest["output"]["shape"] == ["batch", 100, 6]
    parity = manifest["files"]["model.onnx"]["parity"]
    assert parity["passed"] and parity["measure"] == "matched detections" and parity["detections"] > 0
    profile = json.loads((run / "export" / "profile.json").read_text())
    assert profile["signals"] == "boxes" and profile["task"] == "detection" and profile["images"] == 24

    # on its own: ONNX Runtime's session on the test images against the eager model, batch sizes 1 and 24
    model = load_model(run / "best.safetensors", "cpu")
    images, _, _ = load_images_for_model(expand_image_paths([data / "images" / "test"]), model.meta)
    with torch.no_grad():
        eager = predict_logits(model, images, batch_size=24).numpy()
    session = onnxruntime.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections"]
    whole = session.run(None, {"image": images})[0]
    one_by_one = np.concatenate([session.run(None, {"image": images[i:i + 1]})[0] for i in range(len(images))])
    confident = (eager[..., 4] >= 0.25).sum()
    assert confident >= 10, f"the trained detector found only {confident} boxes scoring 0.25 or more"
    for exported in (whole, one_by_one):
        assert exported.shape == eager.shape == (24, 100, 6)
        found = match_detections(eager, exported)
        assert found.reference > 0 and found.share == 1.0, found
        assert found.max_box_diff < 0.05 and found.max_score_diff < 1e-3, found
