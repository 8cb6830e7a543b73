"""Detection end to end: `cvrecipe run` on a tiny synthetic set, and a detector that learns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvrecipe.artifact.build import build_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.job import predict
from cvrecipe.tasks import get_task
from detector_helpers import digit_boxes_set
from pagecheck import view_page
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)


# torch on one thread: a 64 px FCOS step took 0.16 s on one thread and 0.4-13 s on two of a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


CLASSES = 3  # digits 0, 1, 2 as objects


def synth_set(out: Path, splits: dict[str, tuple[int, int]]) -> Path:
    """Digits 0-2 pasted on dark noise at 64 px, written as COCO JSON (+ YOLO labels); {split: (images, seed)}."""
    return digit_boxes_set(out, splits, (64, 64), CLASSES)


def overrides(path: Path, tmp_path: Path, *more: str) -> list[str]:
    return [f"data.name=boxes:{path}", "data.image_size=64", f"data.cache_dir={tmp_path / 'cache'}",
            f"runs_dir={tmp_path / 'runs'}", "model.kwargs={fpn_channels: 64}", "train.num_threads=1",
            "train.sanity=false", *more]  # 16 images: too few for the checks' held-out comparisons


@pytest.mark.slow
def test_cvrecipe_run_trains_evaluates_and_reports_a_detector(tmp_path, capsys):
    path = synth_set(tmp_path / "set", {"train": (16, 1), "val": (4, 2), "test": (4, 3)})
    code = main(["run", "detect-synth", *overrides(path, tmp_path, "train.epochs=2", "train.batch_size=8")])
    assert code == 0
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    # each epoch's line gives val mAP@.5 and hides what a detector does not measure (NaN)
    assert len(epoch_lines) == 2 and all("val map50 " in line and "nan" not in line for line in epoch_lines)
    run = tmp_path / "runs" / "detect-synth"
    result = json.loads((run / "eval.json").read_text())
    assert result["task"] == "detection" and result["split"] == "test" and result["num_images"] == 4
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar100"):
        assert key in result
    assert set(result["per_class"]) == {"0", "1", "2"}
    assert sum(row["boxes"] for row in result["per_class"].values()) == result["num_boxes"] > 0
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[3:7] == ["train_loss", "train_map50", "val_loss", "val_map50"] and len(rows) == 3
    info = view_page(run / "report.html", tmp_path / "report.png")
    assert info["headings"][1:] == ["Per-class AP", "Precision-recall curves", "Boxes", "Worst images"]
    assert all(image["width"] > 0 for image in info["images"])
    for name in ("boxes.png", "pr_curves.png"):
        assert (run / "plots" / name).is_file()
    per_image = result["per_image"]
    assert len(per_image) == 4 and sum(r["tp"] + r["missed"] for r in per_image) == result["num_boxes"]
    answers = predict(run, [str(path / "images" / "test")])  # the answer layer, through `predict`
    assert len(answers) == 4 and all(isinstance(a["boxes"], list) for a in answers)
    assert main(["eval", str(run), "--tta", "1"]) == 0  # image + mirror, the boxes merged (tests/artifact/test_tta.py)
    with_tta = json.loads((run / "eval.json").read_text())
    assert with_tta["tta"] == 1 and 0 <= with_tta["map"] <= 1 and with_tta["num_boxes"] == result["num_boxes"]


@pytest.mark.slow
def test_a_detector_overfits_eight_images_far_above_its_untrained_self(tmp_path):
    """Trained and scored on the same 8 images: mAP@.5 must rise well above the untrained model's."""
    path = synth_set(tmp_path / "set", {"train": (8, 1), "test": (8, 1)})  # the same 8 images twice
    args = overrides(path, tmp_path, "train.epochs=12", "train.batch_size=8", "data.val_fraction=0",
                     "augment.hflip=false", "optim.lr=3e-3")
    cfg = load_config("detect-synth", args)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    task = get_task("detection", cfg)
    untrained = build_model(cfg, ds)
    before = task.evaluate(predict_logits(untrained, ds.test.x), task.batch_targets(ds.test.y, 0, len(ds.test)),
                           ds.classes)
    assert main(["run", "detect-synth", *args]) == 0
    after = json.loads((tmp_path / "runs" / "detect-synth" / "eval.json").read_text())
    print(f"mAP@.5 on the 8 training images: untrained {before['map50']:.3f}, trained {after['map50']:.3f}")
    assert after["map50"] >= before["map50"] + 0.3, (before["map50"], after["map50"])
