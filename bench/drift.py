"""Drift detection on real traffic: false alarms on clean windows, detection delay on shifted ones,
and what monitoring costs in throughput.

    python bench/drift.py --run runs/fashion-mnist [--window 500] [--clean-windows 20] [--step 50]

The run needs a held-out split (Fashion-MNIST: test); its export (ONNX, dynamic batch) and
reference profile are written when missing (the profile from the first 3,000 test images). The
rest of the held-out images are replayed as PNG files through `cvrecipe serve` over real HTTP
on 127.0.0.1:

1. clean: `--clean-windows` windows of `--window` requests each (windows beyond the number of
   distinct held-out images reuse images); after each window the drift states of every detector
   are read from GET /v1/monitor?fresh=1: an "alert" there is a false alarm;
2. each shift — darkened (×0.5), inverted, Gaussian noise (σ = 25 grey levels), blurred (Gaussian,
   radius 1), rotated 90°, and scikit-learn's 8×8 digits scaled into a 28×28 MNIST-like frame —
   starts from a window full of clean traffic, then sends shifted images in steps of `--step`
   requests, up to one window, reading the states after each step: the delay is the number of
   shifted requests sent when a detector first says "alert" (resolution: one step);
3. throughput at concurrency 32, monitoring on (default settings), with the prediction log, and
   off (--no-monitor), servers alternated A/B/C for `--rounds` rounds; medians reported.

Prints tables; asserts nothing. The load generator shares the machine with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, load, stop_server, test_images  # noqa: E402

from cvrecipe.export import export_run  # noqa: E402
from cvrecipe.monitor.profile import PROFILE, profile_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shift(x: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """Shifted copies of uint8 images (N, C, H, W)."""
    if how == "darkened":
        return (x * 0.5).astype(np.uint8)
    if how == "inverted":
        return 255 - x
    if how == "noise":
        return np.clip(x + rng.normal(0, 25, x.shape), 0, 255).astype(np.uint8)
    if how == "blurred":
        return np.stack([_pil(img, lambda im: im.filter(ImageFilter.GaussianBlur(1))) for img in x])
    if how == "rot90":
        return np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))
    if how == "digits":
        return digits_like(x.shape, len(x))
    raise ValueError(how)


def _pil(img: np.ndarray, fn) -> np.ndarray:
    out = np.asarray(fn(Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def digits_like(shape: tuple, n: int) -> np.ndarray:
    """scikit-learn's 8×8 digits (0..16) as MNIST-like images: scaled to 20×20, centred in the frame."""
    from sklearn.datasets import load_digits

    _, c, h, w = shape
    digits = (load_digits().images * (255 / 16)).astype(np.uint8)
    out = np.zeros((n, c, h, w), np.uint8)
    inner = (round(h * 20 / 28), round(w * 20 / 28))
    top, left = (h - inner[0]) // 2, (w - inner[1]) // 2
    for i in range(n):
        img = np.asarray(Image.fromarray(digits[i % len(digits)]).resize(inner[::-1], Image.BILINEAR))
        out[i, :, top:top + inner[0], left:left + inner[1]] = img
    return out


def start_server(export_dir: Path, port: int, *extra: str):
    import subprocess

    cmd = [sys.executable, "-m", "cvrecipe", "serve", str(export_dir), "--port", str(port), "--queue-size", "4096",
           *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # stop_server signals its process group
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


async def _client(url: str, concurrency: int):
    """(post(body) → ok?, close()) over `concurrency` keep-alive connections to /v1/predict."""
    import aiohttp

    session = aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def post(body: bytes) -> bool:
        try:
            async with session.post("/v1/predict", data=body, headers={"content-type": "image/png"}) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False
    return post, session.close


async def send(post, bodies: list[bytes], concurrency: int = 8) -> None:
    queue = list(reversed(bodies))

    async def worker():
        while queue:
            if not await post(queue.pop()):
                raise RuntimeError("a replayed request failed")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def states(url: str) -> dict[str, str]:
    report = httpx.get(url + "/v1/monitor", params={"fresh": True}, timeout=60).json()
    return {d["quantity"]: d["state"] for d in report["drift"]}


async def replay(url: str, clean: list[bytes], shifted: dict[str, list[bytes]], window: int, windows: int,
                 step: int) -> tuple[list[dict], dict[str, dict]]:
    post, close = await _client(url, 8)
    try:
        clean_states = []
        for k in range(windows):
            start = (k * window) % len(clean)
            await send(post, (clean + clean)[start:start + window])
            clean_states.append(states(url))
            print(f"  clean window {k + 1}/{windows}: "
                  f"{', '.join(q for q, s in clean_states[-1].items() if s == 'alert') or 'no alert'}", flush=True)
        delays = {}
        for name, bodies in shifted.items():
            await send(post, clean[:window])  # a window full of clean traffic first
            first: dict[str, int] = {}
            for sent in range(step, window + 1, step):
                await send(post, bodies[sent - step:sent])
                for q, s in states(url).items():
                    if s == "alert" and q not in first:
                        first[q] = sent
            delays[name] = first
            print(f"  {name}: {first or 'not detected'}", flush=True)
        return clean_states, delays
    finally:
        await close()


def throughput(export_dir: Path, bodies: list[bytes], rounds: int, requests: int, seconds: float,
               log_dir: Path) -> dict[str, list[dict]]:
    """{variant: [{rps, cpu_ms}, ...] per round}. cpu_ms: the server process's CPU time (user + system,
    all threads) per answered request over the measurement: steadier than req/s on shared cores."""
    import psutil

    variants = {"off": ["--no-monitor"], "on": [], "on + log": ["--log-db", str(log_dir / "bench-log.sqlite")]}
    out = {name: [] for name in variants}
    for r in range(rounds):
        for name, extra in variants.items():
            port = free_port()
            proc = start_server(export_dir, port, *extra)
            try:
                server = psutil.Process(proc.pid)
                before = server.cpu_times()
                result = asyncio.run(load(f"http://127.0.0.1:{port}/v1/predict", bodies, 32, requests, seconds))
                after = server.cpu_times()
            finally:
                stop_server(proc)
            cpu_s = (after.user + after.system) - (before.user + before.system)
            cpu_ms = cpu_s * 1000 / (result["n"] + min(32, 16))  # the load's warm-up requests included
            out[name].append({"rps": result["rps"], "cpu_ms": cpu_ms})
            print(f"  round {r + 1} {name}: {result['rps']:.0f} req/s, p99 {result['p99']:.1f} ms, "
                  f"server CPU {cpu_ms:.3f} ms/request, {result['errors']} errors", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (a classifier with a test split)")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--clean-windows", type=int, default=20)
    parser.add_argument("--step", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="A/B/C rounds of the throughput comparison")
    parser.add_argument("--requests", type=int, default=3000, help="per throughput measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--profile-images", type=int, default=3000,
                        help="held-out images the profile is written from when missing (the rest are replayed)")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="detection only (counts requests, times nothing: needs no machine lock)")
    parser.add_argument("--skip-detection", action="store_true", help="throughput only")
    parser.add_argument("--shuffle-seed", type=int, help="replay the held-out images in an order drawn with this seed "
                                                          "(default: their order in the split)")
    args = parser.parse_args()

    export_dir = args.run / "export"
    if not (export_dir / "model.onnx").is_file():
        export_run(args.run, "onnx", dynamic_batch=True)
    if not (export_dir / PROFILE).is_file():
        profile_run(args.run, max_images=args.profile_images)
    profiled = json.loads((export_dir / PROFILE).read_text())["source"]["held_out_used"]
    x = test_images(args.run)
    held_out = x[profiled:]  # the profile was written from the first `profiled` held-out images
    if args.shuffle_seed is not None:
        held_out = held_out[np.random.default_rng(args.shuffle_seed).permutation(len(held_out))]
    print(f"{len(held_out)} held-out images not in the profile; window {args.window}, step {args.step}", flush=True)
    rng = np.random.default_rng(0)
    clean = encode(held_out)
    kinds = ("darkened", "inverted", "noise", "blurred", "rot90", "digits")
    shifted = {k: encode(shift(held_out[-args.window:], k, rng)) for k in kinds}

    clean_states, delays = None, None
    if not args.skip_detection:
        port = free_port()
        proc = start_server(export_dir, port, "--window", str(args.window), "--window-s", "1e9")
        try:
            clean_states, delays = asyncio.run(replay(f"http://127.0.0.1:{port}", clean, shifted, args.window,
                                                      args.clean_windows, args.step))
        finally:
            stop_server(proc)
    rates = None
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            rates = throughput(export_dir, clean[:64], args.rounds, args.requests, args.seconds, Path(tmp))
    report(clean_states, delays, rates, args)


def encode(x: np.ndarray) -> list[bytes]:
    """Each uint8 image (C, H, W) as a PNG file (lossless: the server decodes the same pixels)."""
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def report(clean_states: list[dict] | None, delays: dict | None, rates: dict | None, args) -> None:
    if clean_states:
        detection_report(clean_states, delays, args)
    if rates:
        off = statistics.median(r["rps"] for r in rates["off"])
        off_cpu = statistics.median(r["cpu_ms"] for r in rates["off"])
        print(f"\nthroughput at concurrency 32 and server CPU per request (medians of {args.rounds} alternated rounds):")
        for name, rounds in rates.items():
            med = statistics.median(r["rps"] for r in rounds)
            cpu = statistics.median(r["cpu_ms"] for r in rounds)
            each = ", ".join(f"{r['rps']:.0f}" for r in rounds)
            print(f"  {name:<9} {med:7.0f} req/s ({med / off - 1:+.1%} vs off)  {cpu:.3f} CPU-ms/request "
                  f"({cpu / off_cpu - 1:+.1%})  rounds: {each}")


def detection_report(clean_states: list[dict], delays: dict, args) -> None:
    detectors = list(clean_states[0])
    print(f"\nfalse alarms (state alert) in {len(clean_states)} clean windows of {args.window} requests:")
    for q in detectors:
        alerts = sum(s[q] == "alert" for s in clean_states)
        warns = sum(s[q] == "warn" for s in clean_states)
        print(f"  {q:<15} {alerts:>2} alert, {warns:>2} warn")
    any_alert = sum(any(v == "alert" for v in s.values()) for s in clean_states)
    print(f"  {'any detector':<15} {any_alert:>2} alert")
    print(f"\ndelay to the first alert, in shifted requests (step {args.step}; '-' = not within {args.window}):")
    print("  " + f"{'shift':<10}" + "".join(f"{q[:11]:>12}" for q in detectors) + f"{'first':>8}")
    for name, first in delays.items():
        cells = "".join(f"{first.get(q, '-'):>12}" for q in detectors)
        print(f"  {name:<10}{cells}{min(first.values()) if first else '-':>8}")


if __name__ == "__main__":
    main()
