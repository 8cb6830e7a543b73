"""POST /v1/detect over real HTTP: a small trained detector (exported to ONNX, and eager) answers boxes in
the uploaded image's own pixels, the same as `cvrecipe predict` gives (rescaled), an annotated PNG,
refuses bad parameters naming them, and feeds the monitor (boxes per image, class mix, scores) until
blank images raise drift. The web page draws the boxes in headless Chromium. Another task's model
answers 409."""
from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cvrecipe.evaluate.job import predict
from cvrecipe.monitor.settings import MonitorSettings

from detect_helpers import exported_detector  # noqa: F401 (fixture)
from serve_helpers import one_torch_thread, running_server, train_stripes_run, wait_until  # noqa: F401 (fixture)

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
UPLOAD = (160, 96)  # (W, H) the test images are sent at: not the model's 64 × 64, and not square
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # torch on one thread: see serve_helpers


def test_detect_on_a_classifier_is_a_409_naming_the_served_task(tmp_path):
    run_dir, images = train_stripes_run(tmp_path)
    data = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
    with running_server(run_dir, backend="torch") as (url, _):
        r = httpx.post(url + "/v1/detect", content=data, headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 409, r.text
    assert "detection" in r.text and "classification" in r.text


@pytest.fixture(scope="module")
def detector(exported_detector, tmp_path_factory):  # noqa: F811 (the fixture)
    """(run folder, test image files upscaled to UPLOAD as PNG, the test files as they are): trained,
    exported to ONNX with its reference profile (made from those test files)."""
    run, data = exported_detector
    uploads = tmp_path_factory.mktemp("uploads")
    for path in sorted((data / "images" / "test").glob("*.jpg")):
        Image.open(path).convert("RGB").resize(UPLOAD, Image.BILINEAR).save(uploads / f"{path.stem}.png")
    return run, sorted(uploads.glob("*.png")), sorted((data / "images" / "test").glob("*.jpg"))


def post(url: str, path: Path, **params) -> httpx.Response:
    kind = "image/png" if path.suffix == ".png" else "image/jpeg"
    return httpx.post(url + "/v1/detect", params=params, content=path.read_bytes(), headers={"content-type": kind},
                      timeout=60)


def same_boxes(served: list[dict], expected: list[dict], tolerance_px: float) -> None:
    """Each served box is the expected one of its rank: same class, corners within `tolerance_px`."""
    assert len(served) == len(expected), (served, expected)
    for got, want in zip(served, expected):
        assert got["class"] == want["class"] and abs(got["score"] - want["score"]) < 1e-4, (got, want)
        assert max(abs(got[k] - want[k]) for k in ("x1", "y1", "x2", "y2")) < tolerance_px, (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_boxes_are_predicts_in_the_uploaded_images_pixels(detector, backend):
    run, files, _ = detector
    files = files[:6]
    expected = predict(run, [str(f) for f in files], k=100)  # in each file's own pixels (UPLOAD), score >= 0.25
    found = 0
    with running_server(run, backend=backend) as (url, _):
        for path, want in zip(files, expected):
            r = post(url, path)
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["width"], body["height"]) == UPLOAD and body["model"]["name"] == "fcos-lite0"
            same_boxes(body["boxes"], want["boxes"], tolerance_px=0.01)
            found += len(body["boxes"])
            fewer = post(url, path, score_threshold=0.5, max_detections=1).json()["boxes"]
            same_boxes(fewer, [b for b in want["boxes"] if b["score"] >= 0.5][:1], tolerance_px=0.01)
    assert found >= 5, f"the trained detector found only {found} boxes in {len(files)} images"


@pytest.mark.slow
def test_png_answer_is_the_image_with_the_boxes_drawn(detector):
    run, files, _ = detector
    with running_server(run) as (url, _):
        path = next(p for p in files if post(url, p).json()["boxes"])
        boxes = post(url, path).json()["boxes"]
        by_query = post(url, path, format="png")
        by_accept = httpx.post(url + "/v1/detect", content=path.read_bytes(), timeout=60,
                               headers={"content-type": "image/png", "accept": "image/png"})
    assert by_query.status_code == 200 and by_query.headers["content-type"] == "image/png"
    assert by_accept.content == by_query.content
    drawn = np.asarray(Image.open(io.BytesIO(by_query.content)).convert("RGB")).astype(int)
    original = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert drawn.shape == original.shape == (UPLOAD[1], UPLOAD[0], 3)
    changed = np.abs(drawn - original).max(-1) > 0  # (H, W)
    near = np.zeros_like(changed)  # each box, its outline and its label above it (the label may run right)
    for b in boxes:
        near[max(0, int(b["y1"]) - 16):int(b["y2"]) + 3, max(0, int(b["x1"]) - 3):int(b["x2"]) + 60] = True
    assert changed.any() and not (changed & ~near).any(), "pixels changed away from the boxes"
    b = boxes[0]
    top_edge = changed[int(round(b["y1"])), int(b["x1"]) + 1:int(b["x2"])]
    assert top_edge.mean() > 0.9, "the best box's top edge is drawn"


@pytest.mark.slow
def test_bad_parameters_are_refused_naming_the_field_and_limit(detector):
    run, files, _ = detector
    with running_server(run) as (url, _):
        for params, field, limit in [({"score_threshold": 1.5}, "score_threshold", "1"),
                                     ({"score_threshold": -0.1}, "score_threshold", "0"),
                                     ({"max_detections": 0}, "max_detections", "1"),
                                     ({"max_detections": 101}, "max_detections", "100"),
                                     ({"score_threshold": "high"}, "score_threshold", "number"),
                                     ({"format": "gif"}, "format", "png")]:
            r = post(url, files[0], **params)
            assert r.status_code == 400, (params, r.text)
            message = r.json()["error"]["message"]
            assert field in message and limit in message, (params, message)
        r = httpx.post(url + "/v1/detect", content=b"not an image", headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image", r.text
        r = httpx.post(url + "/v1/predict", content=files[0].read_bytes(), headers={"content-type": "image/png"},
                       timeout=30)
        assert r.status_code == 409 and "detection" in r.text  # a classifier's route on a detector


@pytest.mark.slow
def test_the_monitor_follows_boxes_and_raises_drift_on_blank_images(detector, tmp_path):
    run, _, files = detector  # the very images of the reference profile: no drift
    monitor = MonitorSettings(window=24, min_samples=24, interval_s=0.2, log_db=tmp_path / "log.db")
    blank = io.BytesIO()
    Image.new("RGB", UPLOAD, (0, 0, 0)).save(blank, format="PNG")
    with running_server(run, monitor=monitor) as (url, _):
        boxless = 0  # real images in which the detector finds nothing (score >= 0.25)
        for path in files:
            r = post(url, path)
            assert r.status_code == 200
            boxless += not r.json()["boxes"]
        report = wait_until(lambda: (r := httpx.get(url + "/v1/monitor", timeout=5).json())["window"]["predictions"]
                            == len(files) and r["drift"][0]["state"] != "waiting" and r, 20, "a full window")
        states = {d["quantity"]: d for d in report["drift"]}
        assert {"class_mix", "boxes_per_image", "score", "brightness"} <= set(states)
        assert states["class_mix"]["state"] == "ok" and states["boxes_per_image"]["state"] == "ok", states
        assert states["score"]["state"] == "ok" and report["state"] in ("ok", "warn"), states
        assert report["reference"] is not None and len(report["class_mix"]["live"]) == 3
        for _ in range(len(files)):  # the camera goes dark: no boxes at all
            r = httpx.post(url + "/v1/detect", content=blank.getvalue(), headers={"content-type": "image/png"},
                           timeout=60)
            assert r.status_code == 200 and r.json()["boxes"] == []
        time.sleep(0.5)
        dark = wait_until(lambda: (r := httpx.get(url + "/v1/monitor", timeout=5).json())["state"] == "alert" and r,
                          20, "the drift alert")
        states = {d["quantity"]: d["state"] for d in dark["drift"]}
        assert states["boxes_per_image"] == "alert" and states["class_mix"] == "alert", states
        assert states["score"] == "alert" and states["brightness"] == "alert", states
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'cvrecipe_drift_state{quantity="boxes_per_image"} 2.0' in metrics
    import sqlite3

    with sqlite3.connect(tmp_path / "log.db") as db:
        logged = db.execute("SELECT COUNT(*), COUNT(predicted), SUM(top_k = '[]') FROM predictions").fetchone()
    # every request; those without boxes (all the blank ones) log no predicted class
    assert logged == (2 * len(files), len(files) - boxless, len(files) + boxless), (logged, boxless)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install chromium; `make test` installs it as root)")
def test_the_page_draws_the_boxes_over_the_uploaded_image(detector):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    run, files, _ = detector
    with running_server(run) as (url, _), sync_api.sync_playwright() as p:
        path = next(f for f in files if post(url, f).json()["boxes"])
        boxes = post(url, path).json()["boxes"]
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("fcos-lite0", timeout=15_000)
            sync_api.expect(page.locator("#title")).to_have_text("Detect objects in an image")
            page.set_input_files("#file", str(path))
            sync_api.expect(page.locator("#canvas")).to_have_attribute("data-boxes", str(len(boxes)), timeout=15_000)
            assert page.locator("#results .row .label").all_inner_texts() == [b["class"] for b in boxes]
            size = page.locator("#canvas").evaluate("c => [c.width, c.height]")
            assert size == list(UPLOAD)
            b = boxes[-1]  # the last drawn: nothing covers its left edge
            x, y = round(b["x1"]), round((b["y1"] + b["y2"]) / 2)
            pixel = f"c => Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data)"
            on_edge = page.locator("#canvas").evaluate(pixel)
            image = np.asarray(Image.open(path).convert("RGB"))
            assert np.abs(np.asarray(on_edge[:3]) - image[y, x]).max() > 40, (on_edge, image[y, x])
            assert page.locator("#error").inner_text() == ""
        finally:
            browser.close()
