"""The HTTP server, over real HTTP: uvicorn on a free 127.0.0.1 port, a trained model, real
ONNX Runtime / TorchScript / eager backends. Every load loop is bounded in count and time."""
import asyncio
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from cvrecipe.cli import main
from cvrecipe.data.images import decode_images
from cvrecipe.export import export_model, export_run
from cvrecipe.artifact.checkpoint import load_model

from serve_helpers import (CLASSES, SlowUpload, loopback_socket, metric_samples, one_torch_thread,  # noqa: F401
                           running_server, train_stripes_run, wait_until)

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """A trained run with ONNX (dynamic batch) and TorchScript exports, and a test image per class
    that the eager model classifies correctly (the expected answer for the server)."""
    root = tmp_path_factory.mktemp("stripes")
    run_dir, images = train_stripes_run(root)
    export_run(run_dir, "onnx", dynamic_batch=True)
    export_run(run_dir, "torchscript")
    model = load_model(run_dir)
    good = {}
    for label, name in enumerate(CLASSES):
        for path in sorted((images / "test" / name).glob("*.jpg")):
            x, _, _ = decode_images([(path.name, path.read_bytes())], 3, (16, 16))
            with torch.no_grad():
                if int(model(torch.from_numpy(x)).argmax()) == label:
                    good[name] = path.read_bytes()
                    break
    assert set(good) == set(CLASSES), "the trained model should get at least one test image of each class right"
    return SimpleNamespace(run=run_dir, export=run_dir / "export", images=images, good=good)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width × height pixels but holds almost no data: a decompression bomb's
    header. Decoding it would fail (truncated), so a 413 naming the size proves it was not decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post_image(url: str, data: bytes, route: str = "/v1/predict", content_type: str = "image/jpeg", **kw):
    return httpx.post(url + route, content=data, headers={"content-type": content_type, **kw.pop("headers", {})},
                      timeout=30, **kw)


def assert_healthy(url: str, good: bytes) -> None:
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    assert post_image(url, good).status_code == 200


@pytest.mark.parametrize("source, backend, fmt", [("export", "onnxruntime", "onnx"), ("export", "torch", "torchscript"),
                                                  ("run", "torch", "safetensors")])
def test_good_images_get_the_eager_models_answer(stripes, source, backend, fmt):
    with running_server(getattr(stripes, source), backend=backend) as (url, _):
        info = httpx.get(url + "/v1/model").json()
        assert (info["backend"], info["format"], info["class_names"]) == (backend, fmt, list(CLASSES))
        for name, data in stripes.good.items():
            r = post_image(url, data, params={"k": 3})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["top"][0]["class"] == name and body["model"]["version"] == info["version"]
            assert abs(sum(t["probability"] for t in body["top"]) - 1) < 1e-5  # k = all 3 classes
            assert r.headers["x-request-id"] == body["request_id"]
        # the same image as a multipart upload, and several in one batch request (order kept)
        r = httpx.post(url + "/v1/predict", files={"file": ("fox.jpg", stripes.good["fox"], "image/jpeg")})
        assert r.json()["top"][0]["class"] == "fox"
        files = [("file", (f"{n}.jpg", stripes.good[n], "image/jpeg")) for n in ("dog", "cat", "fox")]
        results = httpx.post(url + "/v1/predict/batch", files=files).json()["results"]
        assert [(r["file"], r["top"][0]["class"]) for r in results] == [("dog.jpg", "dog"), ("cat.jpg", "cat"),
                                                                        ("fox.jpg", "fox")]


def test_bad_inputs_get_json_errors_and_the_server_stays_healthy(stripes):
    good = stripes.good["cat"]

    def chunked(n_chunks: int):  # no Content-Length: the limit must be enforced while reading
        for _ in range(n_chunks):
            yield b"\xff" * 10_000

    cases = [  # (what, request, expected status, expected error code)
        ("not an image", dict(data=b"hello, this is text"), 400, "not_an_image"),
        ("empty body", dict(data=b""), 400, "empty_image"),
        ("truncated JPEG", dict(data=good[:-40]), 400, "corrupt_image"),  # header intact, scan cut
        ("corrupt PNG", dict(data=png_header(16, 16)), 400, "corrupt_image"),
        ("unsupported type", dict(data=good, content_type="text/plain"), 415, "unsupported_media_type"),
        ("Content-Length over limit", dict(data=b"\xff" * 80_000), 413, "body_too_large"),
        ("chunked body over limit", dict(data=chunked(8)), 413, "body_too_large"),
        ("bomb header", dict(data=png_header(12_000, 12_000), content_type="image/png"), 413, "too_many_pixels"),
        ("bomb beyond PIL's ceiling", dict(data=png_header(100_000, 100_000)), 413, "too_many_pixels"),
        ("bad k", dict(data=good, params={"k": 0}), 400, "bad_request"),
    ]
    with running_server(stripes.export, max_body_mb=0.05) as (url, _):
        for what, request, status, code in cases:
            r = post_image(url, request.pop("data"), **request)
            assert r.status_code == status, (what, r.text)
            assert r.json()["error"]["code"] == code, what
            assert_healthy(url, good)
        bomb = post_image(url, png_header(12_000, 12_000)).json()["error"]["message"]
        assert "12000x12000" in bomb and "without decoding" in bomb
        r = httpx.post(url + "/v1/predict", data={"note": "no file"}, files={})
        assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
        two = [("file", ("a.jpg", good, "image/jpeg")), ("file", ("b.jpg", good, "image/jpeg"))]
        assert httpx.post(url + "/v1/predict", files=two).status_code == 400
        r = httpx.post(url + "/v1/predict/batch", files=[two[0], ("file", ("bad.jpg", b"junk", "image/jpeg"))])
        results = r.json()["results"]
        assert r.status_code == 200 and results[0]["top"] and results[1]["error"]["code"] == "not_an_image"
        assert httpx.get(url + "/no/such/route").json()["error"]["code"] == "not_found"
        statuses = {(s.labels["route"], s.labels["status"]) for s in metric_samples(url, "cvrecipe_requests_total")}
        assert {("/v1/predict", "413"), ("/v1/predict", "415"), ("/v1/predict", "400")} <= statuses


def test_queue_full_gets_503_with_retry_after(stripes):
    good = stripes.good["dog"]
    # while a slow upload is on its way, batches wait up to a second for it; two queued images fill the queue
    with running_server(stripes.export, max_batch_size=64, max_wait_ms=1000, queue_size=2) as (url, _):
        slow = SlowUpload(url, good)
        two = [("file", (f"{i}.jpg", good, "image/jpeg")) for i in range(2)]
        first = {}
        sender = threading.Thread(target=lambda: first.update(r=httpx.post(url + "/v1/predict/batch", files=two,
                                                                            timeout=30)))
        sender.start()
        wait_until(lambda: metric_samples(url, "cvrecipe_queue_depth_images")[0].value == 2, 10, "a full queue")
        r = post_image(url, good)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        sender.join(timeout=30)
        assert first["r"].status_code == 200 and len(first["r"].json()["results"]) == 2
        assert slow.release().status_code == 200
        assert_healthy(url, good)


def test_timeout_gets_504(stripes):
    good = stripes.good["fox"]
    # with a slow upload on its way, an image waits up to 1 s for it: longer than the 0.3 s timeout
    with running_server(stripes.export, max_batch_size=2, max_wait_ms=1000, timeout_s=0.3) as (url, _):
        slow = SlowUpload(url, good)
        r = post_image(url, good)
        assert (r.status_code, r.json()["error"]["code"]) == (504, "timeout")
        assert httpx.get(url + "/healthz").status_code == 200
        assert slow.release().status_code == 504  # its own 0.3 s ran out while it was held back
        two = [("file", (f"{i}.jpg", good, "image/jpeg")) for i in range(2)]
        r = httpx.post(url + "/v1/predict/batch", files=two, timeout=30)
        assert r.status_code == 200 and [x["top"][0]["class"] for x in r.json()["results"]] == ["fox", "fox"]
        rejected = {s.labels["reason"]: s.value for s in metric_samples(url, "cvrecipe_rejected_total")}
        assert rejected == {"timeout": 2.0}


async def fire(url: str, body: bytes, n: int, concurrency: int, timeout_s: float = 60) -> list[httpx.Response]:
    """`n` predict requests, at most `concurrency` at a time (bounded in count and in time)."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one():
            async with gate:
                return await client.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout_s)


def test_concurrent_requests_share_forward_passes(stripes):
    with running_server(stripes.export, max_batch_size=16, max_wait_ms=200) as (url, _):
        # while an upload is still arriving, every batch waits up to 200 ms for company, so
        # batching shows even when this busy machine delivers the 24 requests slowly
        slow = SlowUpload(url, stripes.good["cat"])
        responses = asyncio.run(fire(url, stripes.good["dog"], n=24, concurrency=24))
        assert slow.release().json()["top"][0]["class"] == "cat"
        assert [r.status_code for r in responses] == [200] * 24
        assert {r.json()["top"][0]["class"] for r in responses} == {"dog"}
        sizes = {s.name.rsplit("_", 1)[-1] + s.labels.get("le", ""): s.value
                 for s in metric_samples(url, "cvrecipe_batch_size_images")}
        assert sizes["sum"] == 25 and sizes["count"] < 25  # fewer forward passes than requests
        assert sizes["bucket1.0"] < sizes["count"]  # at least one batch held more than one image
        assert metric_samples(url, "cvrecipe_in_flight_requests")[0].value == 1  # only /metrics itself


@pytest.mark.slow
def test_reload_under_load_swaps_models_without_failures(stripes, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(stripes.export, export_dir)
    good = stripes.good["cat"]
    with running_server(export_dir, max_batch_size=8, max_wait_ms=2) as (url, _):
        old_version = httpx.get(url + "/v1/model").json()["version"]
        # new weights for the same network: the trained model with its last layer nudged
        model = load_model(stripes.run)
        with torch.no_grad():
            model.net[-1].bias.add_(0.01)
        images, _, _ = decode_images([("cat", good)], 3, (16, 16))
        export_model(model, images, export_dir, "onnx", dynamic_batch=True)
        results, stop = [], threading.Event()

        async def load():  # bounded: at most 600 requests or 30 s
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async def worker():
                    deadline = time.monotonic() + 30
                    while not stop.is_set() and len(results) < 600 and time.monotonic() < deadline:
                        r = await client.post("/v1/predict", content=good, headers={"content-type": "image/jpeg"})
                        results.append((r.status_code, r.json().get("model", {}).get("version")))
                await asyncio.gather(*(worker() for _ in range(4)))

        loader = threading.Thread(target=asyncio.run, args=(load(),))
        loader.start()
        wait_until(lambda: len(results) >= 20, 20, "requests before the reload")
        r = httpx.post(url + "/admin/reload", timeout=60)
        assert r.status_code == 200, r.text
        new_version = r.json()["version"]
        served = len(results)
        wait_until(lambda: len(results) >= served + 20, 20, "requests after the reload")
        stop.set()
        loader.join(timeout=40)
    assert new_version != old_version and r.json()["previous_version"] == old_version
    assert {status for status, _ in results} == {200}
    versions = [v for _, v in results]
    assert versions[0] == old_version and versions[-1] == new_version
    assert set(versions) == {old_version, new_version}


def test_auth_and_cors(stripes):
    good = stripes.good["fox"]
    origin = "http://localhost:5173"
    with running_server(stripes.export, token="s3cret", cors_origin=origin) as (url, _):
        r = post_image(url, good)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post_image(url, good, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url + "/admin/reload").status_code == 401
        r = post_image(url, good, headers={"authorization": "Bearer s3cret", "origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        for route in ("/healthz", "/readyz", "/metrics", "/v1/model", "/"):
            assert httpx.get(url + route).status_code == 200, route
        preflight = httpx.options(url + "/v1/predict",
                                  headers={"origin": origin, "access-control-request-method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == origin
    with running_server(stripes.export) as (url, _):  # no token, no CORS unless configured
        r = post_image(url, good, headers={"origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_not_ready_until_a_valid_model_is_loaded(stripes, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(stripes.export, export_dir)
    with open(export_dir / "model.onnx", "ab") as f:
        f.write(b"tampered")
    with running_server(export_dir, wait_ready=False) as (url, _):
        ready = wait_until(lambda: (r := httpx.get(url + "/readyz")).json()["status"] == "failed" and r, 20,
                           "the load to fail")
        assert ready.status_code == 503 and "does not match the sha256" in ready.json()["error"]
        assert httpx.get(url + "/healthz").status_code == 200
        r = post_image(url, stripes.good["fox"])
        assert (r.status_code, r.json()["error"]["code"]) == (503, "not_ready")
    with running_server(stripes.export) as (url, _):
        version = httpx.get(url + "/v1/model").json()["version"]
        assert httpx.get(url + "/readyz").json() == {"status": "ready", "version": version}
        assert "Drop an image" in httpx.get(url + "/").text


def test_cli_refuses_a_missing_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.safetensors").write_bytes(b"")
    assert main(["serve", str(tmp_path / "run"), "--backend", "onnxruntime"]) == 2
    assert "cvrecipe export" in capsys.readouterr().err


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_sighup_reloads_and_sigterm_finishes_in_flight_requests(stripes):
    sock = loopback_socket()  # a free port, released just before the server binds it
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cvrecipe", "serve", str(stripes.export), "--port", str(port),
                             "--max-batch-size", "64", "--max-wait-ms", "1500"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 90, "the server process")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [s for s in metric_samples(url, "cvrecipe_reloads_total") if s.value == 1], 30,
                   "the SIGHUP reload")
        # a slow upload is in flight, and three requests wait up to 1.5 s in a batch for it to
        # join; SIGTERM arrives meanwhile, and every one of them must still be answered
        slow = SlowUpload(url, stripes.good["cat"])
        answers = []
        senders = [threading.Thread(target=lambda: answers.append(post_image(url, stripes.good["dog"])))
                   for _ in range(3)]
        for t in senders:
            t.start()
        wait_until(lambda: metric_samples(url, "cvrecipe_queue_depth_images")[0].value == 3, 10, "queued requests")
        proc.send_signal(signal.SIGTERM)
        # once uvicorn has stopped accepting connections, these four are in flight
        wait_until(lambda: _refuses_connections(port), 30, "the server to stop accepting connections")
        assert slow.release().json()["top"][0]["class"] == "cat"
        for t in senders:
            t.join(timeout=30)
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert all(r.json()["top"][0]["class"] == "dog" for r in answers)
        proc.wait(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log = proc.stdout.read()
    assert "reloaded" in log and "Shutting down" in log, log
