"""Serving throughput and latency: `cvrecipe serve` against a peer server and raw ONNX Runtime.

    python bench/serve.py [--run runs/NAME] [--second-run RUN] [--rounds 2] [--requests 3000] [--seconds 6]
                          [--concurrency 1,8,32,64] [--naive] [--no-monitor]
    python bench/serve.py --detect [--run RUN] [--detect-size 128] ...   # a detector through POST /v1/detect

Without --run, trains small-cnn on a 5,000-image subset of Fashion-MNIST for one epoch (scikit-
learn's digits when Fashion-MNIST is not available) in a temporary folder. --second-run adds a
second model (e.g. a fine-tuned EfficientNet-Lite0 run, where inference costs more than HTTP);
each run is exported to ONNX if it has no export yet. Then, per model, all on 127.0.0.1:

1. raw ONNX Runtime in this process, batch sizes 1..128: the throughput limit of the model; and
   what ONNX Runtime's options are worth at batch 32 (threads, graph optimisation, IO binding);
2. `cvrecipe serve` (batch 32, wait 5 ms) and LitServe 0.2.19 serving the same ONNX file with the
   same batch and wait (bench/litserve_peer.py), each in a subprocess, driven by the same closed-loop
   aiohttp load generator with the same multipart PNG requests at each concurrency, the two
   servers alternated round by round (A B, then B A, ...) so that load from other processes on a
   shared machine falls on both alike; resident memory of each server after its run (LitServe:
   all its processes);
3. with --naive, `cvrecipe serve --max-batch-size 1` (one forward pass per request).

`cvrecipe serve` monitors its traffic by default (drift, live accuracy; LitServe has none);
--no-monitor serves with monitoring off, to compare the two servers doing the same work.

--detect serves a detector instead, through POST /v1/detect (JSON boxes; LitServe's peer serves
classifiers only, so cvrecipe alone is measured, and ONNX Runtime's option variants are skipped).
Without --run it trains fcos-lite0 for one epoch on --detect-images synthetic images of --detect-size pixels
(sklearn's digits 0-2 pasted on noise, data/synth_detect.py's `compose`): throughput does not depend on
how well it learnt, the post-processing being fixed-shape (models/detectors.py).

Prints per-round rows, then per server and concurrency the median over rounds, and the ratios the
targets are stated in. Asserts nothing. The load generator shares the machine's cores with the
server, which a separate client machine would not.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from cvrecipe.config import load_config, load_run_config
from cvrecipe.data import load_dataset
from cvrecipe.export import export_run
from cvrecipe.export.onnx import OnnxRunner
from cvrecipe.train.job import train

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
RAW_BATCH_SIZES = (1, 8, 32, 64, 128)
ORT_VARIANTS = {  # name → OnnxRunner options, measured at batch 32 against the server's defaults
    "server defaults (2 threads, all, no spin)": {"spin": False},
    "1 intra-op thread": {"spin": False, "threads": 1},
    "graph optimisation basic": {"spin": False, "optimization": "basic"},
    "graph optimisation off": {"spin": False, "optimization": "disable"},
    "IO binding": {"spin": False, "io_binding": True},
    "threads spinning": {"spin": True},
}
BODIES = 64  # distinct test images sent round-robin


def trained_run(tmp: Path) -> Path:
    if FASHION.exists():
        overrides = ["data.subset=5000", "train.epochs=1", "data.val_fraction=0.05", "train.sanity=false"]
        cfg = load_config("fashion-mnist-cnn", [f"runs_dir={tmp}", *overrides])
    else:
        cfg = load_config("digits-quick", [f"runs_dir={tmp}", "train.epochs=2", "train.sanity=false"])
    print(f"training {cfg.model.name} on {cfg.data.name} (one short run) ...", flush=True)
    return train(cfg)


def trained_detector(tmp: Path, size: int, count: int = 64) -> Path:
    """fcos-lite0 trained for one epoch on `count` synthetic `size` px images with 1-6 digits 0, 1 and 2
    each (and as many test images, at most BODIES, for the export check and the requests)."""
    from cvrecipe.data.sources import digits
    from cvrecipe.data.synth_detect import compose, write_split

    ds = digits(tmp / "digits")
    keep = ds.train.y < 3  # three classes: a few images hold them all
    background = np.random.default_rng(0).integers(0, 80, (8, 3, 16, 16)).astype(np.uint8)
    for split, n, seed in (("train", count, 1), ("test", min(count, BODIES), 2)):
        items = compose(ds.train.x[keep], ds.train.y[keep], background, n, (size, size), seed)
        write_split(tmp / "set", split, items, ["0", "1", "2"])
    cfg = load_config("detect-synth", [f"data.name=boxes:{tmp / 'set'}", f"data.image_size={size}", f"runs_dir={tmp}",
                                       "train.epochs=1", "train.batch_size=16", f"data.cache_dir={tmp / 'cache'}",
                                       "train.sanity=false"])  # a throwaway model to time: the checks need more images
    print(f"training {cfg.model.name} on {count} images of digits pasted on noise at {size} px (one epoch) ...",
          flush=True)
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


def raw_throughput(model_path: Path, x: np.ndarray, seconds: float = 2.0,
                   sizes: tuple[int, ...] = RAW_BATCH_SIZES) -> dict[int, float]:
    """Images/s of ONNX Runtime alone at each batch size (after two warm-up calls), with the
    server's session options."""
    runner = OnnxRunner(model_path, spin=False)
    return {size: _rate(runner, x, size, seconds) for size in sizes}


def _rate(runner: OnnxRunner, x: np.ndarray, size: int, seconds: float) -> float:
    batch = np.ascontiguousarray(np.resize(x, (size, *x.shape[1:])))
    for _ in range(2):
        runner.predict(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.predict(batch)
        n += size
    return n / (time.perf_counter() - start)


def ort_variants(model_path: Path, x: np.ndarray, rounds: int = 3, seconds: float = 0.7) -> dict[str, float]:
    """Median images/s at batch 32 per ORT_VARIANTS entry, the variants interleaved round by round."""
    runners = {name: OnnxRunner(model_path, **options) for name, options in ORT_VARIANTS.items()}
    rates = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            rates[name].append(_rate(runner, x, 32, seconds))
    return {name: float(np.median(r)) for name, r in rates.items()}


GC_PROBE = """
import gc, sys, time
{imports}
import cvrecipe.serve.app, cvrecipe.serve.state, onnxruntime
def full_ms():
    t = time.perf_counter(); gc.collect(); return (time.perf_counter() - t) * 1000
before = sorted(full_ms() for _ in range(3))[1]
gc.freeze()
print(len(gc.get_objects()) + gc.get_freeze_count(), before, sorted(full_ms() for _ in range(3))[1])
"""


def gc_pauses() -> dict[str, tuple[int, float, float]]:
    """(objects, ms per full collection, ms after gc.freeze) in a fresh process holding the serving
    stack, with torch and torchvision imported as the server did before it served ONNX without them."""
    out = {}
    for name, imports in (("with torch (as before)", "import torch, torchvision.io, torchvision.transforms.v2"),
                          ("without torch (now)", "")):
        code = GC_PROBE.format(imports=imports)
        line = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, check=True).stdout.split()
        out[name] = (int(line[0]), float(line[1]), float(line[2]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, export_dir: Path, port: int, max_batch_size: int, max_wait_ms: float,
                 extra: tuple[str, ...] = (), route: str = "/v1/predict") -> tuple[subprocess.Popen, str]:
    """(process, URL of `route`) of a server started in a subprocess and ready to answer."""
    if kind == "litserve":
        cmd = [sys.executable, str(ROOT / "bench" / "litserve_peer.py"), str(export_dir), "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
        ready, predict = "/health", "/predict"
    else:
        cmd = [sys.executable, "-m", "cvrecipe", "serve", str(export_dir), "--port", str(port), "--max-batch-size",
               str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--queue-size", "4096", *extra]
        ready, predict = "/readyz", route
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}{predict}"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"{kind} server on port {port} not ready after 120 s")


def resident_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the process and all its children, MB."""
    import psutil

    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (LitServe runs several processes), then SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request when the last one is
    answered, until `requests` were sent or `seconds` passed. Every request is a multipart form
    with the PNG in a `file` field."""
    import aiohttp

    latencies, errors, sent = [], 0, 0
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def post(body: bytes) -> bool:
        form = aiohttp.FormData()
        form.add_field("file", body, filename="image.png", content_type="image/png")
        try:
            async with session.post(url, data=form) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

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
        await session.close()
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"rps": len(latencies) / elapsed, "p50": np.percentile(lat, 50), "p99": np.percentile(lat, 99),
            "errors": errors, "n": len(latencies)}


def measure(kind: str, export_dir: Path, bodies: list[bytes], levels: list[int], max_batch_size: int,
            max_wait_ms: float, requests: int, seconds: float, extra: tuple[str, ...] = (),
            route: str = "/v1/predict") -> dict:
    """{concurrency: figures} for one server started for this round, plus its resident memory."""
    port = free_port()
    proc, url = start_server(kind, export_dir, port, max_batch_size, max_wait_ms, extra, route)
    try:
        rows = {c: asyncio.run(load(url, bodies, c, requests, seconds)) for c in levels}
        rows["rss_mb"] = resident_mb(proc)
        return rows
    finally:
        stop_server(proc)


def bench_model(label: str, run_dir: Path, args, levels: list[int]) -> dict:
    export_dir = run_dir / "export"
    if not (export_dir / "model.onnx").is_file():
        export_run(run_dir, "onnx", dynamic_batch=True)
    x = test_images(run_dir)
    bodies = png_bodies(x)
    print(f"\n== {label}: {export_dir / 'model.onnx'}, images {x.shape[1:]} (C, H, W), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}; cvrecipe's monitoring {'off' if args.no_monitor else 'on'}",
          flush=True)
    # a detector's batch of 32 already takes ~0.4 s at 128 px: larger ones only lengthen the run
    raw = raw_throughput(export_dir / "model.onnx", x, args.raw_seconds, (1, 8, 32) if args.detect else RAW_BATCH_SIZES)
    print("raw ONNX Runtime images/s by batch size: " + ", ".join(f"{b}: {r:,.0f}" for b, r in raw.items()),
          flush=True)
    variants = {}
    if not args.detect:
        variants = ort_variants(export_dir / "model.onnx", x, seconds=args.raw_seconds * 0.35)
        print("ONNX Runtime options at batch 32 (images/s, median of 3 interleaved): "
              + "; ".join(f"{name}: {r:,.0f}" for name, r in variants.items()), flush=True)
    servers = ["cvrecipe"] if args.detect else ["cvrecipe", "litserve"]  # the peer serves classifiers only
    route = "/v1/detect" if args.detect else "/v1/predict"
    no_monitor = ("--no-monitor",) if args.no_monitor else ()  # cvrecipe's options; LitServe has no monitoring
    rounds = {name: [] for name in servers}
    for r in range(args.rounds):
        for name in servers if r % 2 == 0 else servers[::-1]:  # A B, B A, ...: alternated
            extra = no_monitor if name == "cvrecipe" else ()
            rows = measure(name, export_dir, bodies, levels, 32, 5.0, args.requests, args.seconds, extra, route)
            rounds[name].append(rows)
            for c in levels:
                f = rows[c]
                print(f"round {r + 1} {name:<9} c={c:<3} {f['rps']:>7,.0f} req/s  p50 {f['p50']:6.1f}  "
                      f"p99 {f['p99']:6.1f} ms  errors {f['errors']}  n {f['n']}", flush=True)
            print(f"round {r + 1} {name:<9} resident memory {rows['rss_mb']:.0f} MB", flush=True)
    naive = measure("cvrecipe", export_dir, bodies, levels, 1, 0, args.requests, args.seconds,
                    no_monitor, route) if args.naive else None
    return {"raw": raw, "variants": variants, "rounds": rounds, "naive": naive}


def median(rows: list[dict], c: int, key: str) -> float:
    return float(np.median([r[c][key] for r in rows]))


def report(label: str, result: dict, levels: list[int]) -> None:
    rounds, raw = result["rounds"], result["raw"]
    if "litserve" not in rounds:  # a detector: cvrecipe alone
        report_alone(label, result, levels)
        return
    print(f"\n{label}: median over {len(rounds['cvrecipe'])} rounds (batch 32, wait 5 ms, multipart PNG)")
    print(f"{'concurrency':>11} | {'cvrecipe req/s':>14} {'p50':>6} {'p99':>6} | {'LitServe req/s':>14} {'p50':>6} "
          f"{'p99':>6} | {'thr. ratio':>10} {'p99 ratio':>9} {'errors':>7}")
    for c in levels:
        a = {k: median(rounds["cvrecipe"], c, k) for k in ("rps", "p50", "p99")}
        b = {k: median(rounds["litserve"], c, k) for k in ("rps", "p50", "p99")}
        errors = sum(r[c]["errors"] for rows in rounds.values() for r in rows)
        print(f"{c:>11} | {a['rps']:>14,.0f} {a['p50']:>6.1f} {a['p99']:>6.1f} | {b['rps']:>14,.0f} {b['p50']:>6.1f} "
              f"{b['p99']:>6.1f} | {a['rps'] / b['rps']:>9.2f}x {a['p99'] / b['p99']:>8.2f}x {errors:>7}")
    best = max(raw, key=raw.get)
    top = max(median(rounds["cvrecipe"], c, "rps") for c in levels)
    print(f"raw ONNX Runtime in-process: {raw[best]:,.0f} images/s (batch {best}); cvrecipe's best: "
          f"{top / raw[best]:.0%} of it")
    print("resident memory, MB (per round): cvrecipe " + ", ".join(f"{r['rss_mb']:.0f}" for r in rounds["cvrecipe"])
          + "; LitServe (all processes) " + ", ".join(f"{r['rss_mb']:.0f}" for r in rounds["litserve"]))
    if result["naive"]:
        print("naive cvrecipe (max batch 1): " + ", ".join(f"c={c}: {result['naive'][c]['rps']:,.0f} req/s"
                                                           for c in levels))


def report_alone(label: str, result: dict, levels: list[int]) -> None:
    rounds, raw = result["rounds"]["cvrecipe"], result["raw"]
    print(f"\n{label}: median over {len(rounds)} rounds (batch 32, wait 5 ms, multipart PNG, POST /v1/detect)")
    print(f"{'concurrency':>11} | {'cvrecipe img/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7}")
    for c in levels:
        errors = sum(r[c]["errors"] for r in rounds)
        print(f"{c:>11} | {median(rounds, c, 'rps'):>14,.1f} {median(rounds, c, 'p50'):>7.1f} "
              f"{median(rounds, c, 'p99'):>7.1f} {errors:>7}")
    best = max(raw, key=raw.get)
    top = max(median(rounds, c, "rps") for c in levels)
    print(f"raw ONNX Runtime in-process: {raw[best]:,.1f} images/s (batch {best}); cvrecipe's best: "
          f"{top:,.1f} images/s, {top / raw[best]:.0%} of it")
    print("resident memory, MB (per round): cvrecipe " + ", ".join(f"{r['rss_mb']:.0f}" for r in rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder to serve (default: train a small one)")
    parser.add_argument("--second-run", type=Path, help="a second run folder (e.g. fine-tuned EfficientNet-Lite0)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the two servers, alternated (default 2)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (default 3000)")
    parser.add_argument("--seconds", type=float, default=6, help="time limit per concurrency level (default 6)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels (default 1,8,32,64)")
    parser.add_argument("--naive", action="store_true", help="also measure cvrecipe serve with batching off")
    parser.add_argument("--no-monitor", action="store_true", help="cvrecipe serve with monitoring off (as LitServe)")
    parser.add_argument("--raw-seconds", type=float, default=2.0,
                        help="seconds per batch size of the in-process ONNX Runtime rates (default 2)")
    parser.add_argument("--detect", action="store_true", help="serve a detector through POST /v1/detect")
    parser.add_argument("--detect-size", type=int, default=128,
                        help="--detect without --run: the trained detector's image size, px (default 128)")
    parser.add_argument("--detect-images", type=int, default=64,
                        help="--detect without --run: training (and test) images of the trained detector (default 64)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    for name, (objects, full, frozen) in (gc_pauses() if not args.detect else {}).items():
        print(f"server process {name}: {objects:,} objects; a full garbage collection takes {full:.0f} ms, "
              f"{frozen:.1f} ms after gc.freeze() (median of 3)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or (trained_detector(Path(tmp), args.detect_size, args.detect_images) if args.detect
                                else trained_run(Path(tmp)))
        results[run_dir.name] = bench_model(run_dir.name, run_dir, args, levels)
        if args.second_run:
            results[args.second_run.name] = bench_model(args.second_run.name, args.second_run, args, levels)
    for label, result in results.items():
        report(label, result, levels)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
