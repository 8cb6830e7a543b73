"""POST /v1/segment over real HTTP (uvicorn on a free 127.0.0.1 port): the mask PNG equals the eager
model's tiled answer at the image's own size, with ONNX Runtime and torch; per-class areas as JSON;
the same errors, limits and metrics as /v1/predict; each route refuses the other task's model."""
import io
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.export import export_run

from serve_helpers import metric_samples, one_torch_thread, running_server, train_shapes_run  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
              pytest.mark.slow]  # end to end: trains, exports and serves


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    run_dir, data = train_shapes_run(tmp_path_factory.mktemp("segserve"))
    export_run(run_dir, "onnx", dynamic_batch=True)
    model = load_model(run_dir)
    rng = np.random.default_rng(0)
    from conftest import shapes_pair

    image, _ = shapes_pair(72, rng)  # larger than the training images: nine 32×32 tiles at overlap 0.5
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    expected = predict_logits(model, image.transpose(2, 0, 1)[None]).argmax(1)[0].numpy()
    return SimpleNamespace(run=run_dir, png=buf.getvalue(), expected=expected, classes=model.meta["class_names"])


def post(url, data, route="/v1/segment", content_type="image/png"):
    return httpx.post(url + route, content=data, headers={"content-type": content_type}, timeout=60)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_mask_png_is_the_eager_tiled_answer(seg, backend):
    with running_server(seg.run, backend=backend) as (url, _):
        assert httpx.get(url + "/v1/model").json()["task"] == "segmentation"
        r = post(url, seg.png)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        mask = np.asarray(img)
        assert img.mode == "P" and mask.shape == (72, 72)  # the image's own size, never resized
        agree = (mask == seg.expected).mean()
        assert agree >= 0.999
        r = httpx.post(url + "/v1/segment?format=json&mask=true", content=seg.png,
                       headers={"content-type": "image/png"}, timeout=60)
        body = r.json()
        assert (body["width"], body["height"]) == (72, 72) and [a["class"] for a in body["areas"]] == seg.classes
        counts = np.bincount(mask.ravel(), minlength=len(seg.classes))
        assert [a["pixels"] for a in body["areas"]] == counts.tolist()
        assert body["mask"].startswith("data:image/png;base64,") and 0 < body["mean_confidence"] <= 1


def test_errors_limits_and_metrics_are_those_of_predict(seg):
    with running_server(seg.run, backend="onnxruntime", max_body_mb=0.05) as (url, _):
        assert post(url, b"not an image").json()["error"]["code"] == "not_an_image"
        assert post(url, b"").json()["error"]["code"] == "empty_image"
        assert post(url, b"x" * 60_000).status_code == 413  # the body limit
        assert post(url, seg.png, content_type="text/plain").status_code == 415
        assert post(url, seg.png, route="/v1/segment?format=xml").status_code == 400
        wrong = post(url, seg.png, route="/v1/predict")
        assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "wrong_task"
        assert post(url, seg.png).status_code == 200
        counts = {(s.labels["route"], s.labels["status"]): s.value
                  for s in metric_samples(url, "cvrecipe_requests_total") if s.name == "cvrecipe_requests_total"}
        assert counts[("/v1/segment", "200")] == 1 and counts[("/v1/segment", "400")] == 3
        assert sum(s.value for s in metric_samples(url, "cvrecipe_images_total")) == 1


def test_a_classifier_server_refuses_segment(tmp_path):
    from serve_helpers import train_stripes_run

    run_dir, images = train_stripes_run(tmp_path)
    data = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
    with running_server(run_dir, backend="torch") as (url, _):
        r = post(url, data, content_type="image/jpeg")
        assert r.status_code == 409 and "segmentation" in r.json()["error"]["message"]


def test_the_monitor_follows_the_pixel_class_mix(seg):
    """The profile of a segmentation run holds its held-out pixels per class; the server pools the
    pixels of the masks it answers and compares: PSI equal to stats.psi of the answered areas, ok
    for images like the training ones, alert for images with no shapes in them."""
    from cvrecipe.monitor import MonitorSettings, stats
    from cvrecipe.monitor.profile import profile_run, read_profile

    from conftest import shapes_pair

    profile = read_profile(profile_run(seg.run))  # RUN/export/profile.json, beside the ONNX export
    assert profile["task"] == "segmentation" and len(profile["pixel_counts"]) == len(seg.classes)

    def png(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(1)
    clean = [png(shapes_pair(48, rng)[0]) for _ in range(10)]
    blank = [png(np.clip(rng.normal(80, 15, (48, 48, 3)), 0, 255).astype(np.uint8)) for _ in range(10)]
    settings = MonitorSettings(window=10, min_samples=10, interval_s=0.2)
    with running_server(seg.run, backend="onnxruntime", monitor=settings) as (url, _):
        states = {}
        for name, images in (("clean", clean), ("blank", blank)):
            areas = [post(url, data, route="/v1/segment?format=json").json()["areas"] for data in images]
            pooled = np.sum([[a["pixels"] for a in answer] for answer in areas], 0)
            report = httpx.get(url + "/v1/monitor", params={"fresh": True}, timeout=30).json()
            mix = next(d for d in report["drift"] if d["quantity"] == "class_mix")
            assert mix["statistic"] == "psi" and mix["unit"] == "pixels"
            assert mix["score"] == pytest.approx(stats.psi(profile["pixel_counts"], pooled), rel=1e-9)
            assert report["class_mix"]["live"] == pytest.approx(stats.shares(pooled).tolist())
            assert {d["quantity"] for d in report["drift"]} == {"class_mix", "confidence"}
            states[name] = mix["state"]
    assert states == {"clean": "ok", "blank": "alert"}
