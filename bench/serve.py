"""Serving throughput and latency: the batching server against its two references.

    python bench/serve.py [--run runs/NAME] [--requests 3000] [--seconds 10] [--concurrency 1,8,32,64]

Without --run, trains small-cnn on a 5,000-image subset of Fashion-MNIST for one epoch (scikit-
learn's digits when Fashion-MNIST is not available) in a temporary folder. Then, all on 127.0.0.1:

1. raw ONNX Runtime in this process, batch sizes 1..128: the throughput limit of the model;
2. `cvrecipe serve` in a subprocess with dynamic batching, loaded by an async HTTP client at each
   concurrency (each level bounded by --requests and --seconds);
3. the same server with --max-batch-size 1 (one forward pass per request): the naive server.

Prints a table and, at concurrency 32, the server's share of raw throughput (target ≥ 70%) and
its speed-up over the naive server (target ≥ 3×). Asserts nothing. The load generator shares the
machine's cores with the server, which a separate client machine would not.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.export import export_run
from cvrecipe.export.onnx import OnnxRunner
from cvrecipe.config import load_run_config
from cvrecipe.train.job import train

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
RAW_BATCH_SIZES = (1, 8, 32, 64, 128)
BODIES = 64  # distinct test images sent round-robin


def trained_run(tmp: Path) -> Path:
    if FASHION.exists():
        overrides = ["data.subset=5000", "train.epochs=1", "data.val_fraction=0.05", "train.sanity=false"]
        cfg = load_config("fashion-mnist-cnn", [f"runs_dir={tmp}", *overrides])
    else:
        cfg = load_config("digits-quick", [f"runs_dir={tmp}", "train.epochs=2", "train.sanity=false"])
    print(f"training {cfg.model.name} on {cfg.data.name} (one short run) ...", flush=True)
    return train(cfg)


def test_images(run_dir: Path) -> np.ndarray:
    cfg = load_run_config(run_dir)
    return load_dataset(cfg.data, seed=cfg.train.seed).eval_split[1].x  # (N, C, H, W) uint8


def png_bodies(x: np.ndarray) -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for img in x[:BODIES]:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def raw_throughput(model_path: Path, x: np.ndarray, seconds: float = 2.0) -> dict[int, float]:
    """Images/s of ONNX Runtime alone at each batch size (after two warm-up calls)."""
    runner = OnnxRunner(model_path)
    rates = {}
    for size in RAW_BATCH_SIZES:
        batch = np.ascontiguousarray(np.resize(x, (size, *x.shape[1:])))
        for _ in range(2):
            runner.predict(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner.predict(batch)
            n += size
        rates[size] = n / (time.perf_counter() - start)
    return rates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: Path, port: int, max_batch_size: int, max_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cvrecipe", "serve", str(export_dir), "--port", str(port), "--max-batch-size",
           str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--queue-size", "4096"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server on port {port} not ready after 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request when the last one is
    answered, until `requests` were sent or `seconds` passed. Uses aiohttp when installed: its
    client needs about a fifth of httpx's CPU per request, CPU the server shares here."""
    latencies, errors, sent = [], 0, 0
    post, close = await _client(url, concurrency)

    async def worker(i: int):
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[(sent + i) % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            if await post(body):
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    try:
        await asyncio.gather(*(post(bodies[0]) for _ in range(min(concurrency, 16))))  # warm connections
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await close()
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"rps": len(latencies) / elapsed, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "errors": errors, "n": len(latencies)}


async def _client(url: str, concurrency: int):
    """(post(body) → ok?, close()) over `concurrency` keep-alive connections."""
    headers = {"content-type": "image/png"}
    try:
        import aiohttp
    except ImportError:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)

        async def post(body: bytes) -> bool:
            try:
                return (await client.post("/v1/predict", content=body, headers=headers)).status_code == 200
            except httpx.HTTPError:
                return False
        return post, client.aclose
    session = aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def post(body: bytes) -> bool:
        try:
            async with session.post("/v1/predict", data=body, headers=headers) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False
    return post, session.close


def measure(export_dir: Path, bodies: list[bytes], levels: list[int], max_batch_size: int, max_wait_ms: float,
            requests: int, seconds: float) -> dict[int, dict]:
    port = free_port()
    proc = start_server(export_dir, port, max_batch_size, max_wait_ms)
    try:
        return {c: asyncio.run(load(f"http://127.0.0.1:{port}", bodies, c, requests, seconds)) for c in levels}
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder to serve (default: train a small one)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (default 3000)")
    parser.add_argument("--seconds", type=float, default=10, help="time limit per concurrency level (default 10)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels (default 1,8,32,64)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="server batch limit (default 64)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="server batch wait (default 2 ms)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or trained_run(Path(tmp))
        export_dir = run_dir / "export"
        if not (export_dir / "model.onnx").is_file():
            export_run(run_dir, "onnx", dynamic_batch=True)
        x = test_images(run_dir)
        bodies = png_bodies(x)
        print(f"model {export_dir / 'model.onnx'}, images {x.shape[1:]} (C, H, W), {os.cpu_count()} CPU cores, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        raw = raw_throughput(export_dir / "model.onnx", x)
        print("raw ONNX Runtime images/s by batch size: " + ", ".join(f"{b}: {r:,.0f}" for b, r in raw.items()),
              flush=True)
        batched = measure(export_dir, bodies, levels, args.max_batch_size, args.max_wait_ms, args.requests,
                          args.seconds)
        naive = measure(export_dir, bodies, levels, 1, 0, args.requests, args.seconds)
    report(raw, batched, naive, args)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def report(raw: dict[int, float], batched: dict, naive: dict, args) -> None:
    best_size = max(raw, key=raw.get)
    print(f"\n{'server':<28}{'concurrency':>12}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'n':>6}")
    for name, rows in ((f"batching (max {args.max_batch_size}, {args.max_wait_ms:g} ms)", batched),
                       ("naive (max batch 1)", naive)):
        for c, r in rows.items():
            print(f"{name:<28}{c:>12}{r['rps']:>10,.0f}{r['p50']:>9.1f}{r['p95']:>9.1f}{r['p99']:>9.1f}"
                  f"{r['errors']:>8}{r['n']:>6}")
    print(f"{'raw ONNX Runtime, in-process':<28}{'batch ' + str(best_size):>12}{raw[best_size]:>10,.0f}")
    if 32 in batched and 32 in naive:
        share = batched[32]["rps"] / raw[best_size]
        speedup = batched[32]["rps"] / naive[32]["rps"]
        errors = batched[32]["errors"] + naive[32]["errors"]
        print(f"\nat concurrency 32: {share:.0%} of raw in-process throughput (target >= 70%), "
              f"{speedup:.1f}x the naive server (target >= 3x), {errors} errors")


if __name__ == "__main__":
    main()
