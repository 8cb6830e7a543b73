"""Run report: calibration against direct computations, Grad-CAM on a synthetic image whose class
lives in one region, FLOPs against a hand count, and one tracked run end to end: report files,
temperature stored with the weights, the page in a real browser, and the MLflow record."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from mlflow.tracking import MlflowClient

from cvrecipe.cli import main
from cvrecipe.evaluate.calibration import fit_temperature, nll, reliability
from cvrecipe.evaluate.explain import grad_cam, last_feature_layer
from cvrecipe.evaluate.report import model_facts, write_report
from cvrecipe.models import create_model
from cvrecipe.config import load_run_config
from cvrecipe.train.tracking import flatten
from cvrecipe.artifact.checkpoint import read_metadata

from pagecheck import view_page

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes


def ece_reference(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE the textbook way: loop over (lo, hi] confidence bins (the first also holds 0)."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def test_ece_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 7, generator=gen) * 3
    y = torch.randint(0, 7, (2000,), generator=gen)
    y[:1200] = logits[:1200].argmax(1)  # partly right, so bins differ in accuracy
    expected = ece_reference(logits.double().softmax(1).numpy(), y.numpy())
    assert reliability(logits, y)["ece"] == pytest.approx(expected, abs=1e-6)


def test_temperature_scaling_recovers_the_true_temperature_and_lowers_nll():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 5, generator=gen) * 4
    y = torch.multinomial((logits / 2.5).softmax(1), 1, generator=gen)[:, 0]  # labels drawn at T = 2.5
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.05)
    assert nll(logits, y, t) < nll(logits, y) - 0.1
    assert reliability(logits / t, y)["ece"] < reliability(logits, y)["ece"]


def quadrant_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16×16 images of noise; only the top-left 8×8 quadrant carries the class: vertical (0) or
    horizontal (1) stripes of random phase."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randint(0, 256, (n, 1, 16, 16), generator=gen).float()
    phase = torch.randint(0, 2, (n, 1, 1), generator=gen)
    grid = torch.arange(8)
    vertical = ((grid[None, None, :] + phase) % 2).expand(n, 8, 8)
    horizontal = ((grid[None, :, None] + phase) % 2).expand(n, 8, 8)
    stripes = torch.where(y[:, None, None] == 0, vertical, horizontal).float() * 255
    x[:, 0, :8, :8] = stripes
    return x.to(torch.uint8), y


class LocalCNN(torch.nn.Module):
    """Two 3×3 convs (receptive field 5×5) and global pooling: each map cell sees only its neighbourhood,
    so where the evidence lies is well defined."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x.float() / 255)


def test_grad_cam_highlights_the_only_informative_region():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LocalCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, y = quadrant_data(64, gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = quadrant_data(128, gen)
    assert (model(x).argmax(1) == y).float().mean() > 0.9  # it did learn the stripes
    assert last_feature_layer(model, x) is model.net[3]  # the ReLU after the last conv
    cam = grad_cam(model, x, y)
    assert cam.shape == (128, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    inside = cam[:, :8, :8].mean()
    outside = (cam.sum((1, 2)) - cam[:, :8, :8].sum((1, 2))).mean() / (256 - 64)
    assert inside > 3 * outside


def test_flops_match_a_hand_count():
    model = create_model("seed-cnn", 10, 3, (32, 32))
    # multiply-adds per layer for 32×32 inputs: conv 30²·32·3·9, 13²·64·32·9, 4²·128·64·9;
    # dense 512·64 and 64·10 (biases are not counted)
    macs = 30 * 30 * 32 * 3 * 9 + 13 * 13 * 64 * 32 * 9 + 4 * 4 * 128 * 64 * 9 + 512 * 64 + 64 * 10
    facts = model_facts(model)
    assert facts["flops_per_image"] == 2 * macs
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())


def test_flatten_config_for_mlflow():
    assert flatten({"train": {"lr": 0.1, "grad_clip": None}, "model": {"kwargs": {"width": 8}}, "name": "x"}) == {
        "train.lr": "0.1", "train.grad_clip": "None", "model.kwargs.width": "8", "name": "x"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One small digits run through `cvrecipe run`, tracked in a fresh MLflow SQLite store."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = main(["run", "digits-quick", f"runs_dir={root / 'runs'}", "name=tracked", "train.epochs=3",
                 "--no-sanity", f"data.cache_dir={root / 'cache'}", "track.mlflow=true", f"track.mlflow_uri={uri}",
                 "track.experiment=report-test"])
    assert code == 0
    return root / "runs" / "tracked", uri


def test_run_writes_the_report_and_plots(tracked_run):
    run_dir, _ = tracked_run
    html = (run_dir / "report.html").read_text()
    for name in ("curves", "confusion", "reliability", "top_losses", "gradcam", "filters"):
        with Image.open(run_dir / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) >= 24, name
    assert "data:image/png;base64," in html and "src=\"http" not in html  # self-contained
    for text in ("FLOPs", "parameters", "Per-class precision", "Calibration", "Top losses", "Grad-CAM"):
        assert text in html


def test_the_run_report_shows_the_evaluation_it_was_handed(tracked_run):
    """`cvrecipe run` passes its evaluation's logits to the report instead of computing them twice:
    every table must be what a report that computes its own shows."""
    run_dir, _ = tracked_run
    tables = re.compile(r"<table.*?</table>", re.S)
    html = (run_dir / "report.html").read_text()
    accuracy = json.loads((run_dir / "eval.json").read_text())["accuracy"]
    assert f"{accuracy:.4f}" in html
    write_report(run_dir)
    from_run = tables.findall(html)
    assert len(from_run) >= 3 and tables.findall((run_dir / "report.html").read_text()) == from_run


def test_calibrate_stores_the_temperature_with_the_weights(tracked_run):
    run_dir, _ = tracked_run
    assert main(["report", str(run_dir), "--calibrate"]) == 0
    _, extra = read_metadata(run_dir / "best.safetensors")
    cal = extra["calibration"]
    assert cal["temperature"] > 0 and cal["fitted_on"] == "val"
    assert cal["val_nll_scaled"] <= cal["val_nll"] + 1e-9  # never worse on the data it was fitted on
    assert f"T = {cal['temperature']:.3f}" in (run_dir / "report.html").read_text()
    assert "epoch" in extra  # the checkpoint's other metadata is kept


def test_report_renders_in_a_browser(tracked_run, tmp_path):
    run_dir, _ = tracked_run
    info = view_page(run_dir / "report.html", tmp_path / "run-report.png")
    assert info["title"].startswith("Run report")
    assert len(info["images"]) >= 6 and all(i["width"] > 0 and i["shown"] > 0 for i in info["images"])
    assert len(info["tables"]) >= 3 and all(rows > 0 for rows in info["tables"])
    assert (tmp_path / "run-report.png").stat().st_size > 20_000


def test_mlflow_holds_params_metrics_model_and_report(tracked_run):
    run_dir, uri = tracked_run
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    cfg = load_run_config(run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr) and run.data.params["model.kwargs.width"] == "16"
    history = client.get_metric_history(run_id, "val_acc")
    assert [m.step for m in history] == [1, 2, 3]
    with open(run_dir / "metrics.csv") as f:
        last = f.read().strip().splitlines()[-1].split(",")
    assert history[-1].value == pytest.approx(float(last[6]))  # METRIC_FIELDS: val_acc is column 6
    files = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/best.safetensors", "model/config.yaml", "model/metrics.csv"} <= files
    report_files = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/eval.json", "report/plots"} <= report_files
