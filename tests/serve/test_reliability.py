"""The server under hostile or heavy traffic, over real sockets: clients that send their whole body
before reading (urllib) see every refusal instead of a reset connection; a mixed load of good and
bad requests gets no reset and no 5xx; requests in flight when SIGTERM arrives are all answered;
large photos are answered; /v1/model keeps file paths for the token holder. Bounded in requests
and time."""
import http.client
import io
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serve_helpers import loopback_socket, one_torch_thread, running_server, train_stripes_run, wait_until  # noqa: F401

from image_files import jpeg_declaring, png_declaring

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # slow: end to end


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    run_dir, images = train_stripes_run(tmp_path_factory.mktemp("reliability"))
    return run_dir, next((images / "test" / "cat").glob("*.jpg")).read_bytes()


def urllib_post(url: str, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> int | str:
    """What urllib sees: the status code, or the name of the exception (a reset connection)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        return type(getattr(err, "reason", err)).__name__


def chunked_post(url: str, size: int, headers: dict) -> int | str:
    """A body with no Content-Length, sent in full (chunked) before the answer is read."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v1/predict", body=iter([b"\xff" * 65536] * (size // 65536)),
                     headers={"Content-Type": "image/jpeg", **headers}, encode_chunked=True)
        return conn.getresponse().status
    except OSError as err:
        return type(err).__name__
    finally:
        conn.close()


def test_clients_that_send_the_whole_body_first_see_every_refusal(stripes):
    run_dir, good = stripes
    with running_server(run_dir, backend="torch", max_body_mb=1, token="s3cret") as (url, _):
        auth = {"Authorization": "Bearer s3cret"}
        predict = url + "/v1/predict"
        calls = [lambda: urllib_post(predict, b"\xff" * 12_000_000, headers=auth),  # declared: 413 before reading
                 lambda: chunked_post(url, 12 * 2**20, auth),  # counted while reading: 413
                 lambda: urllib_post(predict, good + b"\0" * 900_000),  # no token: 401 before reading
                 lambda: urllib_post(predict, b"x" * 900_000, "text/plain", auth)]  # 415 before reading
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda call: call(), calls * 6))
        assert Counter(answers) == Counter({413: 12, 401: 6, 415: 6}), Counter(answers)
        assert urllib_post(predict, good, headers=auth) == 200


def test_a_mixed_load_gets_no_reset_and_no_5xx(stripes):
    run_dir, good = stripes
    requests = [(good, "image/jpeg", 200), (b"\xff" * 12_000_000, "image/jpeg", 413),
                (jpeg_declaring(30_000, 30_000), "image/jpeg", 413), (png_declaring(9000, 9000), "image/png", 413),
                (b"not an image", "image/jpeg", 400), (good[:-60], "image/jpeg", 400), (b"", "image/jpeg", 400),
                (good, "text/plain", 415)]
    with running_server(run_dir, backend="torch", max_body_mb=2) as (url, _):
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda r: (urllib_post(url + "/v1/predict", r[0], r[1]), r[2]), requests * 40))
    assert all(got == expected for got, expected in answers), Counter(got for got, _ in answers)


def test_requests_in_flight_at_sigterm_are_all_answered(stripes):
    """48 requests sent, then SIGTERM: connections the kernel had queued and requests not yet read
    are answered during the shutdown grace, not reset with the listening socket."""
    run_dir, good = stripes
    sock = loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cvrecipe", "serve", str(run_dir), "--port", str(port),
                             "--backend", "torch"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(good)}\r\n"
               f"Connection: close\r\n\r\n").encode() + good
    sent, answers = threading.Barrier(49), []

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(request)
            sent.wait()
            reply = b""
            try:
                while chunk := s.recv(65536):
                    reply += chunk
                answers.append(reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/1.1 ") else "no answer")
            except OSError as err:
                answers.append(type(err).__name__)

    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, 90, "the server")
        threads = [threading.Thread(target=client) for _ in range(48)]
        for t in threads:
            t.start()
        sent.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert Counter(answers) == Counter({"200": 48})
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "stopping: answering queued connections" in proc.stdout.read()


def test_large_photos_are_answered(stripes):
    run_dir, _ = stripes
    ramp = Image.linear_gradient("L").resize((6000, 6000))
    buf = io.BytesIO()
    Image.merge("RGB", [ramp, ramp.rotate(90), ramp]).save(buf, "JPEG", quality=70)  # 108 MB decoded
    with running_server(run_dir, backend="torch") as (url, _):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: urllib_post(url + "/v1/predict", buf.getvalue()), range(8)))
    assert answers == [200] * 8


def test_model_info_shows_file_paths_only_to_the_token_holder(stripes):
    run_dir, _ = stripes
    with running_server(run_dir, backend="torch", token="s3cret") as (url, _):
        anonymous = httpx.get(url + "/v1/model").json()
        holder = httpx.get(url + "/v1/model", headers={"Authorization": "Bearer s3cret"}).json()
    assert anonymous["auth"] and anonymous["file"] == "best.safetensors" and anonymous["run"] == run_dir.name
    assert str(run_dir) not in str(anonymous)
    assert holder["file"] == str(run_dir / "best.safetensors") and holder["run"] == str(run_dir)
