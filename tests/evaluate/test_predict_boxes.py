"""`cvrecipe predict` with a detector: boxes in each image's own pixels, and images annotated with them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvrecipe.artifact.checkpoint import load_model, save_weights
from cvrecipe.artifact.inference import load_images_for_model
from cvrecipe.cli import main
from cvrecipe.models import create_model
from cvrecipe.tasks import answers_of
from detector_helpers import confident_detector
from serve_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEIGHT = 200, 90  # not square, and not the model's 64 x 64: x and y scale differently


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return confident_detector(tmp_path_factory.mktemp("run") / "best.safetensors")


def photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    image[20:60, 120:170] = (230, 200, 40)  # a planted bright block
    Image.fromarray(image).save(path)
    return path


def test_predicted_boxes_are_the_eager_models_boxes_scaled_to_the_image(detector, tmp_path, capsys):
    files = [photo(tmp_path / "wide.png", 0), photo(tmp_path / "other.png", 1)]
    annotated = tmp_path / "annotated"
    code = main(["predict", str(detector), *map(str, files), "--json", "--annotate", str(annotated)])
    assert code == 0
    results = json.loads(capsys.readouterr().out)

    model = load_model(detector)  # the reference: the eager model on the images resized to its input
    x, good, _ = load_images_for_model(files, model.meta)
    with torch.no_grad():
        rows = model(torch.from_numpy(x)).numpy()
    at_input = answers_of("detection").answers(rows, model.meta)  # (64, 64) pixels
    scale = np.array([WIDTH / 64, HEIGHT / 64, WIDTH / 64, HEIGHT / 64])
    for result, expected, path in zip(results, at_input, good):
        assert result["file"] == str(path)
        assert len(result["boxes"]) == len(expected["boxes"]) > 0
        got = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in result["boxes"]])
        want = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in expected["boxes"]]) * scale
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
        assert [b["class"] for b in result["boxes"]] == [b["class"] for b in expected["boxes"]]
        assert got[:, [0, 2]].max() <= WIDTH and got[:, [1, 3]].max() <= HEIGHT

        drawn = np.asarray(Image.open(result["annotated_file"]))  # at the image's own size, boxes drawn
        original = np.asarray(Image.open(path))
        assert drawn.shape == original.shape == (HEIGHT, WIDTH, 3)
        expected_drawing = answers_of("detection").annotate(original, result["boxes"], model.meta["class_names"])
        assert np.array_equal(drawn, expected_drawing) and not np.array_equal(drawn, original)

def test_annotate_refused_for_a_classifier_in_one_line(tmp_path, capsys):
    model = create_model("small-cnn", 2, 3, (16, 16), [0.0] * 3, [1.0] * 3, ["a", "b"])
    model.meta = {"task": "classification", **model.meta}
    save_weights(model, tmp_path / "best.safetensors")
    code = main(["predict", str(tmp_path / "best.safetensors"), str(photo(tmp_path / "a.png")),
                 "--annotate", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--annotate" in err and "not drawn" in err, err
    assert not (tmp_path / "out").exists()
