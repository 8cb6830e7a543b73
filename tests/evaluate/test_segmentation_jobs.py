"""The jobs after training, for a segmentation run: eval.json, the report's sections in a real
browser, `predict` writing mask PNGs (and overlays) equal to the model's tiled answer, and
`data inspect` on image/mask pairs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.cli import main
from cvrecipe.data.report import inspect_data
from cvrecipe.evaluate.job import evaluate, predict, report

from pagecheck import view_page
from serve_helpers import one_torch_thread, train_shapes_run  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: end to end


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return train_shapes_run(tmp_path_factory.mktemp("segjobs"))


def test_eval_and_report(shapes, tmp_path):
    run_dir, _ = shapes
    result = evaluate(run_dir, console=Console(quiet=True))
    stored = json.loads((run_dir / "eval.json").read_text())
    assert stored["task"] == "segmentation" and stored["miou"] == pytest.approx(result["miou"])
    assert len(stored["per_image"]) == stored["num_images"] and len(stored["per_class"]) == 3
    page = report(run_dir, console=Console(quiet=True))
    for name in ("overlays.png", "pixel_confusion.png", "pixel_confidence.png", "curves.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    info = view_page(page, tmp_path / "report.png")
    assert info["headings"][:5] == ["Training curves", "Per-class IoU and Dice", "Overlays", "Worst images",
                                    "Per-pixel confidence"]
    assert all(image["width"] > 0 for image in info["images"])  # every figure decoded in the browser
    assert info["tables"][1] == 4  # 3 classes + the mean


def test_predict_writes_masks_equal_to_the_tiled_answer(shapes, tmp_path):
    run_dir, data = shapes
    files = sorted((data / "image").glob("*.png"))[:3]
    out = tmp_path / "masks"
    results = predict(run_dir, [str(f) for f in files], out_dir=out, overlay=True)
    model = load_model(run_dir)
    for f, r in zip(files, results):
        mask = np.asarray(Image.open(r["mask_file"]))
        assert Image.open(r["mask_file"]).mode == "P" and mask.shape == (48, 48)
        image = np.asarray(Image.open(f)).transpose(2, 0, 1)[None]
        expected = predict_logits(model, image).argmax(1)[0].numpy()  # whole image, in 32×32 tiles
        np.testing.assert_array_equal(mask, expected)
        assert sum(a["pixels"] for a in r["areas"]) == 48 * 48
        assert np.asarray(Image.open(r["overlay_file"])).shape == (48, 48, 3)
    assert main(["predict", str(run_dir), str(files[0]), "--out", str(tmp_path / "cli"), "--json"]) == 0
    assert (tmp_path / "cli" / f"{files[0].stem}.mask.png").is_file()


def test_data_inspect_shows_masks_and_pixel_balance(shapes, tmp_path):
    _, data = shapes
    audit = inspect_data(f"masks:{data}", tmp_path / "inspect", None,
                         ["task=segmentation", "augment.crop_size=32", "augment.rot90=true"],
                         console=Console(quiet=True))
    masks = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "label").glob("*.png"))])
    counts = np.bincount(masks.ravel(), minlength=3)
    assert audit["splits"]["train"]["unit"] == "pixels"
    assert list(audit["splits"]["train"]["class_counts"].values()) == counts.tolist()
    html = (tmp_path / "inspect" / "report.html").read_text()
    assert "Masks over images" in html and "What the model sees" in html and "draw 1: 32×32" in html
