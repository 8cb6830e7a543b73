"""Calibrated answers: evaluation fits a temperature on held-out data and stores it with the weights
and in the export; predict, the server and the exported model's answers are softmax(logits / T).
The ECE is checked against a plain NumPy binning written here, not against the package's own."""
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.job import evaluate, predict
from cvrecipe.export.exporter import export_run
from cvrecipe.train.job import train

from serve_helpers import one_torch_thread, running_server  # noqa: F401 (a module fixture)

IMAGES = 12  # test images sent through predict and the server


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def reference_ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE: equal-width confidence bins (lo, hi], |accuracy - confidence| weighted by share."""
    confidence, correct = probs.max(1), probs.argmax(1) == y
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
               for b in range(bins) if (which == b).any())


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, one_torch_thread):
    """A small CNN overfitted on 200 digits (overconfident), evaluated: (run folder, eval result, test split)."""
    root = tmp_path_factory.mktemp("calibrated")
    cfg = load_config("digits-quick", [f"runs_dir={root}", "train.sanity=false", f"data.cache_dir={root / 'cache'}",
                                       "data.val_fraction=0.3", "data.subset=200", "train.epochs=30"])
    run_dir = train(cfg, console=Console(quiet=True))
    result = evaluate(run_dir, console=Console(quiet=True))
    return run_dir, result, load_dataset(cfg.data, seed=cfg.train.seed).test


def test_the_temperature_fitted_on_val_lowers_the_test_ece(calibrated):
    run_dir, result, test = calibrated
    c = result["calibration"]
    model = load_model(run_dir / "best.safetensors")
    assert c["fitted_on"] == "val" and c["measured_on"] == "test" and c["bins"] == 15
    assert model.meta["temperature"] == pytest.approx(c["temperature"])
    assert json.loads((run_dir / "eval.json").read_text())["calibration"] == c
    logits = predict_logits(model, test.x).double().numpy()
    before, after = reference_ece(softmax(logits), test.y), reference_ece(softmax(logits / c["temperature"]), test.y)
    assert (c["ece_before"], c["ece_after"]) == (pytest.approx(before, abs=1e-6), pytest.approx(after, abs=1e-6))
    assert after < before


@pytest.mark.slow
def test_predicted_served_and_exported_probabilities_are_softmax_of_logits_over_t(calibrated, tmp_path):
    run_dir, result, test = calibrated
    t = result["calibration"]["temperature"]
    model = load_model(run_dir / "best.safetensors")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(IMAGES):
        Image.fromarray(test.x[i, 0]).save(folder / f"{i:02d}.png")
    k = len(model.meta["class_names"])
    eager = softmax(predict_logits(model, test.x[:IMAGES]).double().numpy() / t)  # (IMAGES, K)
    names = model.meta["class_names"]

    def as_rows(tops):  # answers' top-k lists → (IMAGES, K) probabilities in class order
        rows = np.zeros((len(tops), k))
        for row, top in zip(rows, tops):
            for entry in top:
                row[names.index(entry["class"])] = entry["probability"]
        return rows

    predicted = sorted(predict(run_dir, [str(folder)], k=k), key=lambda r: r["file"])
    np.testing.assert_allclose(as_rows([r["top"] for r in predicted]), eager, atol=1e-6)

    export = export_run(run_dir, "onnx")
    manifest = json.loads((run_dir / "export" / "model.json").read_text())
    assert manifest["temperature"] == pytest.approx(t) and export.parity.passed
    with running_server(run_dir / "export" / "model.onnx") as (url, _):
        served = []
        for i in range(IMAGES):
            png = io.BytesIO()
            Image.fromarray(test.x[i, 0]).save(png, format="PNG")
            r = httpx.post(url + f"/v1/predict?k={k}", files={"file": (f"{i}.png", png.getvalue(), "image/png")})
            served.append(r.json()["top"])
    np.testing.assert_allclose(as_rows(served), eager, atol=1e-4)  # ONNX Runtime's logits differ by ~1e-6
    assert abs(t - 1) > 0.05  # the scaling is not a no-op here, so the checks above tell T from 1
