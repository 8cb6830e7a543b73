"""The reliability figures of docs/reliability.md, measured on real processes over 127.0.0.1:

    python bench/reliability.py [--code PATH] [--requests 2000] [--concurrency 64]

1. a 629-byte JPEG declaring 30000x30000: the decoder's time and peak-memory growth on it alone,
   then `cvrecipe predict RUN bomb.jpg`: wall time and peak resident memory of the whole command,
   next to the same command on an ordinary image (interpreter and torch start-up included);
2. `cvrecipe serve RUN`: resident memory before and during 24 concurrent 6000x6000 JPEGs (0.7 MB
   each, inside the default body and pixel limits), and after;
3. the same server under a mixed load of --requests good and bad requests at --concurrency,
   sent with urllib (which sends the whole body before reading): answers by status, and resets;
4. SIGTERM while 48 requests are in flight: how many were answered.

--code runs the `cvrecipe` processes from another checkout (e.g. an export of an earlier commit),
so figures before and after a change come from the same script. The run it serves is trained
here first (small-cnn, 32x32 RGB, 3 classes, seconds). Asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_image_folder  # noqa: E402
from image_files import jpeg_declaring, png_declaring  # noqa: E402


def cvrecipe(code: Path, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(code)}
    return subprocess.Popen([sys.executable, "-m", "cvrecipe", *map(str, args)], cwd=code, env=env, **popen)


def peak_rss_mb(proc: subprocess.Popen, every_s: float = 0.01) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of a child process, sampled until it exits."""
    start, peak = time.perf_counter(), 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(every_s)
    return time.perf_counter() - start, peak / 2**20


def photo_jpeg(side: int = 6000) -> bytes:
    ramp = Image.linear_gradient("L").resize((side, side))
    noise = Image.effect_noise((side, side), 8)
    buf = io.BytesIO()
    Image.merge("RGB", [ramp, ramp.rotate(90), noise]).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def post(url: str, body: bytes, content_type: str = "image/jpeg") -> int | str:
    request = urllib.request.Request(url + "/v1/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        return type(getattr(err, "reason", err)).__name__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(code: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = cvrecipe(code, "serve", run_dir, "--port", port, "--backend", "torch", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


# the decoder alone, in a process of its own: seconds and peak-memory growth of decode_images on the file
DECODE_ONLY = """
import sys, time
from pathlib import Path
from cvrecipe.data.images import decode_images
def status(key):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))
data = Path(sys.argv[1]).read_bytes()
decode_images([('warm-up', Path(sys.argv[2]).read_bytes())], 3, (32, 32))
open('/proc/self/clear_refs', 'w').write('5')
rss, start = status('VmRSS:'), time.perf_counter()
x, good, skipped = decode_images([('bomb', data)], 3, (32, 32))
print(f'{(time.perf_counter() - start) * 1000:.2f} ms, peak RSS growth {(status("VmHWM:") - rss) / 1024:,.0f} MB, '
      f'{"decoded" if good else "refused"}')
"""


def bomb_predict(code: Path, run_dir: Path, tmp: Path) -> None:
    bomb, good = tmp / "bomb.jpg", tmp / "good.jpg"
    bomb.write_bytes(jpeg_declaring(30_000, 30_000))
    good.write_bytes(next((tmp / "images" / "test" / "cat").glob("*.jpg")).read_bytes())
    out = subprocess.run([sys.executable, "-c", DECODE_ONLY, str(bomb), str(good)], capture_output=True, text=True,
                         cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    print(f"  decode_images on bomb.jpg alone: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
    for image in (good, bomb):
        proc = cvrecipe(code, "predict", run_dir, image, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds, peak = peak_rss_mb(proc)
        answer = proc.stdout.read().strip().splitlines()[-1]
        print(f"  predict {image.name:9s} ({image.stat().st_size:,} bytes): {seconds:5.2f} s, peak RSS {peak:,.0f} MB "
              f"-> {answer[:110]}", flush=True)


def big_photos(url: str, proc: subprocess.Popen, good: bytes, n: int = 24, side: int = 6000) -> None:
    body = photo_jpeg(side)
    ps = psutil.Process(proc.pid)
    post(url, good)  # the decoders load on the first image: not part of the figure
    before = ps.memory_info().rss / 2**20
    peak, done = before, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, ps.memory_info().rss / 2**20)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = Counter(pool.map(lambda _: post(url, body), range(n)))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = ps.memory_info().rss / 2**20
    print(f"  {n} concurrent {side}x{side} JPEGs ({len(body) / 1e6:.2f} MB each): answers {dict(answers)} in "
          f"{seconds:.1f} s; server RSS {before:,.0f} MB before, peak {peak:,.0f} MB, {after:,.0f} MB after", flush=True)


def mixed_load(url: str, good: bytes, requests: int, concurrency: int) -> None:
    kinds = [(good, "image/jpeg"), (good, "image/jpeg"), (good, "image/jpeg"),
             (b"\xff" * 12_000_000, "image/jpeg"),  # above the 10 MiB body limit
             (jpeg_declaring(30_000, 30_000), "image/jpeg"), (png_declaring(20_000, 20_000), "image/png"),
             (b"not an image at all", "image/jpeg"), (good[: len(good) // 2], "image/jpeg"), (b"", "image/png"),
             (good, "text/plain")]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = Counter(pool.map(lambda i: post(url, *kinds[i % len(kinds)]), range(requests)))
    seconds = time.perf_counter() - start
    resets = sum(v for k, v in answers.items() if isinstance(k, str))
    server_errors = sum(v for k, v in answers.items() if isinstance(k, int) and k >= 500)
    print(f"  {requests:,} mixed requests at concurrency {concurrency} in {seconds:.1f} s: "
          f"{dict(sorted(answers.items(), key=str))}; resets {resets}, 5xx {server_errors}", flush=True)


def sigterm_in_flight(code: Path, run_dir: Path, good: bytes, n: int = 48) -> None:
    proc, url = start_server(code, run_dir)
    port = int(url.rsplit(":", 1)[1])
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(good)}\r\n"
               f"Connection: close\r\n\r\n").encode() + good
    sent, answers = threading.Barrier(n + 1), []

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

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    sent.wait()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    proc.wait(60)
    print(f"  SIGTERM with {n} requests sent: {dict(Counter(answers))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose cvrecipe runs (default: this one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--photos", type=int, default=24, help="concurrent large photos in part 2 (default 24)")
    parser.add_argument("--photo-side", type=int, default=6000, help="their side in pixels (default 6000)")
    parser.add_argument("--in-flight", type=int, default=48, help="requests in flight at SIGTERM (default 48)")
    args = parser.parse_args()
    code = args.code.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_image_folder(tmp / "images", per_class={"train": 60, "test": 10}, size=32)
        proc = cvrecipe(code, "train", "digits-quick", f"data.name=folder:{images}", f"runs_dir={tmp / 'runs'}",
                        "name=r", "train.epochs=2", "model.kwargs={width: 8}", "train.sanity=false",
                        f"data.cache_dir={tmp / 'cache'}", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if proc.wait() != 0:
            raise RuntimeError("training the benchmark's run failed")
        run_dir = tmp / "runs" / "r"
        good = next((images / "test" / "cat").glob("*.jpg")).read_bytes()
        print(f"code: {code}  cpus: {os.cpu_count()}  python {sys.version.split()[0]}")
        print("1. a JPEG bomb given to predict")
        bomb_predict(code, run_dir, tmp)
        print("2-3. the server: large photos, then a mixed load")
        server, url = start_server(code, run_dir)
        try:
            big_photos(url, server, good, args.photos, args.photo_side)
            mixed_load(url, good, args.requests, args.concurrency)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        print("4. shutdown under load")
        sigterm_in_flight(code, run_dir, good, args.in_flight)


if __name__ == "__main__":
    main()
