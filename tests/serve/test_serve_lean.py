"""A server of an ONNX export runs without torch, and is warm when it says it is ready.

The server runs for real in a child process (`cvrecipe serve` through the CLI); a thread in that
process waits for /readyz, then sends the first requests over HTTP and reports which modules the
process holds: no torch or torchvision, nothing imported by the first requests (warm-up
already paid for the decoders and the model), and the start-up objects frozen out of the garbage
collector's full passes.
"""
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cvrecipe.export import export_run
from cvrecipe.serve import state as state_module

from serve_helpers import CLASSES, loopback_socket, running_server, train_stripes_run, wait_until

pytestmark = pytest.mark.slow  # end to end: trains, exports and serves in child processes
ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import gc, json, os, signal, sys, threading, time, urllib.error, urllib.request

source, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
files = [(open(p, "rb").read(), t) for p, t in zip(sys.argv[4::2], sys.argv[5::2])]
url = f"http://127.0.0.1:{port}"


def post(route, data, content_type):
    request = urllib.request.Request(url + route, data=data, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def watch():
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        post("/healthz", b"x", "image/png")  # a 405: the client's own POST path is warm now
        before = set(sys.modules)
        answers = [post("/v1/predict", data, content_type) for data, content_type in files]
        report = {"answers": answers, "new_modules": sorted(set(sys.modules) - before), "frozen": gc.get_freeze_count(),
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}
        with open(out, "w") as f:
            json.dump(report, f)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


threading.Thread(target=watch, daemon=True).start()
from cvrecipe.cli import main
sys.exit(main(["serve", source, "--port", port, "--backend", "onnxruntime"]))
'''


@pytest.fixture(scope="module")
def stripes_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    run_dir, images = train_stripes_run(root)
    export_run(run_dir, "onnx", dynamic_batch=True)
    return run_dir / "export", images


def encoded(path: Path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format=fmt)
    return buf.getvalue()


def test_onnx_server_runs_without_torch_and_warm(stripes_onnx, tmp_path):
    export_dir, images = stripes_onnx
    jpeg = sorted((images / "test" / CLASSES[0]).glob("*.jpg"))[0]
    png = tmp_path / "image.png"
    png.write_bytes(encoded(jpeg, "PNG"))
    script, out = tmp_path / "child.py", tmp_path / "report.json"
    script.write_text(CHILD)
    with loopback_socket() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, str(script), str(export_dir), str(port), str(out), str(png), "image/png",
                           str(jpeg), "image/jpeg"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"the child reported nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["torch"] == [], "a server of an ONNX export imported torch"
    for status, body in report["answers"]:
        assert status == 200 and body["top"][0]["class"] in CLASSES, body
    # PNG and JPEG first requests: nothing left to import (the decoders' plugins, the multipart and
    # JSON paths) — a first request that imports pays for it in latency
    assert report["new_modules"] == [], f"the first requests imported {report['new_modules']}"
    # start-up objects out of the collector's sight (tens of thousands: modules, the model)
    assert report["frozen"] > 10_000


def test_readyz_waits_for_the_warm_up(stripes_onnx, monkeypatch):
    export_dir, _ = stripes_onnx
    release, started = threading.Event(), threading.Event()
    warm = state_module.ServerState._warm_decode

    def held_warm_up(self, backend, size):
        started.set()
        assert release.wait(30), "the test never released the warm-up"
        warm(self, backend, size)

    monkeypatch.setattr(state_module.ServerState, "_warm_decode", held_warm_up)
    with running_server(export_dir, wait_ready=False, backend="onnxruntime") as (url, app):
        assert started.wait(30)
        ready = httpx.get(url + "/readyz", timeout=5)
        assert (ready.status_code, ready.json()["status"]) == (503, "loading")
        assert not app.state.server.warmed_up
        release.set()
        wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 30, "/readyz after warm-up")
        assert app.state.server.warmed_up
        image = np.full((16, 16, 3), 200, np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        answer = httpx.post(url + "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert answer.status_code == 200
