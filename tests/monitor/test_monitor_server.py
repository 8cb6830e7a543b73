"""Monitoring in a real server on 127.0.0.1: drift that stays quiet on clean traffic and fires on
shifted traffic, feedback and live accuracy, gauges in /metrics, the webhook, the prediction log."""
import io
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter

from cvrecipe.monitor import MonitorSettings
from cvrecipe.monitor.profile import PROFILE, read_profile

from monitor_helpers import served  # noqa: F401 (session fixture)
from serve_helpers import CLASSES, metric_samples, one_torch_thread, running_server, wait_until  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shifted(data: bytes, how: str) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if how == "dark":
        img = img.point(lambda v: int(v * 0.35))
    elif how == "blur":
        img = img.filter(ImageFilter.GaussianBlur(2))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def predict(client: httpx.Client, url: str, data: bytes) -> dict:
    r = client.post(url + "/v1/predict", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.json()


def monitor(url: str) -> dict:
    return httpx.get(url + "/v1/monitor", params={"fresh": True}, timeout=30).json()


def test_profile_holds_the_reference(served):
    export_dir, _ = served
    profile = read_profile(export_dir / PROFILE)
    assert profile["class_names"] == list(CLASSES)
    assert sum(profile["class_counts"]) == profile["images"] == len(profile["confidence"]) == 150
    assert set(profile["inputs"]) == {"brightness", "contrast", "sharpness", "size", "channel0_mean",
                                      "channel1_mean", "channel2_mean"}
    assert profile["embedding"]["null_mmd2"]["50"] == sorted(profile["embedding"]["null_mmd2"]["50"])
    assert profile["embedding_features"]["kind"] == "features-pca"


def test_the_onnx_export_gives_the_features_the_eager_head_receives(served):
    """The export's second output is the input of the model's head: compared with a forward hook
    on the eager model's last linear layer, the trusted reference."""
    from cvrecipe.artifact.checkpoint import load_model
    from cvrecipe.artifact.inference import predict_features
    from cvrecipe.export.onnx import OnnxRunner
    from cvrecipe.serve.inputs import decode_batch

    export_dir, files = served
    runner = OnnxRunner(export_dir / "model.onnx")
    model = load_model(export_dir.parent / "best.safetensors", "cpu")
    shape = (model.meta["in_channels"], *model.meta["input_size"])
    x = np.stack(decode_batch([data for _, data in files[:16]], shape, 10**8))
    logits, features = runner.predict_features(x)
    eager_logits, eager_features = predict_features(model, x)
    assert features.shape == eager_features.shape and features.shape[1] > len(CLASSES)
    np.testing.assert_allclose(features, eager_features, atol=1e-4)
    np.testing.assert_allclose(logits, eager_logits, atol=1e-4)
    np.testing.assert_array_equal(runner.predict(x), logits)  # the first output alone, as before


def test_clean_traffic_stays_ok_and_shifted_traffic_alerts(served, tmp_path):
    export_dir, files = served
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    settings = MonitorSettings(window=100, min_samples=50, interval_s=0.2,
                               alert_webhook=f"http://127.0.0.1:{hook.server_port}/hook")
    try:
        with running_server(export_dir, monitor=settings) as (url, _), httpx.Client(timeout=30) as client:
            assert monitor(url)["state"] == "waiting"
            for _, data in files[:100]:
                predict(client, url, data)
            clean = monitor(url)
            assert clean["window"]["predictions"] == 100
            assert clean["state"] == "ok", [(d["quantity"], d["state"], d.get("p_value")) for d in clean["drift"]]
            assert {d["quantity"] for d in clean["drift"]} >= {"class_mix", "confidence", "brightness", "embedding"}
            assert next(d for d in clean["drift"] if d["quantity"] == "embedding")["space"] == "features-pca"
            for _, data in files[100:200]:
                predict(client, url, shifted(data, "dark"))
            dark = monitor(url)
            states = {d["quantity"]: d["state"] for d in dark["drift"]}
            assert dark["state"] == "alert" and states["brightness"] == "alert", states
            wait_until(lambda: any(r["state"] == "alert" for r in received), 10, "the alert webhook")
            alert = next(r for r in received if r["state"] == "alert")
            # states are recomputed while windows fill (the clean one may pass through warn, the dark one
            # too): the webhook says each change, the alert coming from a state that was not one
            assert alert["previous"] in ("waiting", "ok", "warn")
            assert all(r["previous"] != r["state"] for r in received)
            assert "brightness" in {q["quantity"] for q in alert["quantities"]}
            states = {s.labels["quantity"]: s.value for s in metric_samples(url, "cvrecipe_drift_state")}
            assert states["overall"] == 2 and states["brightness"] == 2
    finally:
        hook.shutdown()


def test_feedback_updates_live_accuracy_and_the_log(served, tmp_path):
    export_dir, files = served
    db = tmp_path / "log.sqlite"
    settings = MonitorSettings(window=200, interval_s=0.2, log_db=db, capture_percent=100)
    with running_server(export_dir, monitor=settings) as (url, _), httpx.Client(timeout=30) as client:
        answers = [(label, predict(client, url, data)) for label, data in files[:40]]
        assert all(a["request_id"] for _, a in answers)
        expected_correct = 0
        for label, answer in answers:
            r = client.post(url + "/v1/feedback", json={"request_id": answer["request_id"], "label": label})
            assert r.status_code == 200, r.text
            assert r.json()["stored"] == "log" and r.json()["correct"] == (answer["top"][0]["class"] == label)
            expected_correct += answer["top"][0]["class"] == label
        acc = monitor(url)["accuracy"]
        assert acc["labelled"] == 40 and acc["accuracy"] == pytest.approx(expected_correct / 40)
        bad = client.post(url + "/v1/feedback", json={"request_id": "nope", "label": "cat"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "unknown_request"
        bad = client.post(url + "/v1/feedback", json={"request_id": answers[0][1]["request_id"], "label": "zebra"})
        assert bad.status_code == 400 and "zebra" in bad.json()["error"]["message"]
        wait_until(lambda: metric_samples(url, "cvrecipe_live_accuracy")[0].value == pytest.approx(expected_correct / 40),
                   10, "the accuracy gauge")
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT request_id, predicted, label, capture FROM predictions").fetchall()
    assert len(rows) == 40 and all(label is not None for _, _, label, _ in rows)
    assert {r[0] for r in rows} == {a["request_id"] for _, a in answers}
    assert all((db.with_name(db.name + ".captures") / r[3]).is_file() for r in rows)


def test_dashboard_resource_gauges_and_stages(served):
    export_dir, files = served
    with running_server(export_dir, monitor=MonitorSettings(interval_s=0.2)) as (url, _):
        page = httpx.get(url + "/dashboard")
        assert page.status_code == 200 and "<script>" in page.text
        assert "src=" not in page.text and "<link" not in page.text  # self-contained: no external script or style
        wait_until(lambda: metric_samples(url, "cvrecipe_process_resident_bytes")[0].value > 10e6, 10, "RSS gauge")
        assert metric_samples(url, "cvrecipe_process_threads")[0].value >= 2
        for _, data in files[:3]:
            assert httpx.post(url + "/v1/predict", content=data, headers={"content-type": "image/jpeg"}).is_success
        counts = {s.labels["stage"]: s.value for s in metric_samples(url, "cvrecipe_stage_seconds_count")}
        assert counts["respond"] == counts["log"] == 3 and counts["decode"] >= 1 and counts["infer"] >= 1


def test_monitoring_off_and_bad_settings(served, capsys):
    from cvrecipe.cli import main

    export_dir, files = served
    with running_server(export_dir, monitor=MonitorSettings(enabled=False)) as (url, _), httpx.Client() as client:
        assert predict(client, url, files[0][1])["top"]
        for method, route in (("GET", "/v1/monitor"), ("POST", "/v1/feedback")):
            r = client.request(method, url + route, json={"request_id": "x", "label": "cat"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "monitoring_off"
        assert "cvrecipe_drift_state" not in client.get(url + "/metrics").text
    assert main(["serve", str(export_dir), "--capture", "10"]) == 2
    assert "--capture needs a --log-db" in capsys.readouterr().err
    assert main(["serve", str(export_dir), "--alert-webhook", "ftp://x"]) == 2
    assert "--alert-webhook must be an http" in capsys.readouterr().err
