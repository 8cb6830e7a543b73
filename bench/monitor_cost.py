"""What monitoring costs inside the server, part by part: CPU time per image of the input
statistics (`inspect`, on the inference thread), of recording an answered image (`record`: the
window, and with a log its journal line and its share of the writer thread's inserts), and per
evaluation of the detectors and gauges (`evaluate`, once a second).

    python bench/monitor_cost.py --run RUN [--batches 300] [--batch 32]

RUN needs an export with its reference profile (`cvrecipe export RUN --dynamic-batch`). Images
are random PNGs of the model's input size; the logits and features are random: the figures are the
monitor's own work, not the model's. CPU time is the process's (every thread). Prints a table;
asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry

from cvrecipe.imagefile import read_header
from cvrecipe.monitor.live import Monitor
from cvrecipe.monitor.settings import MonitorSettings


def _inputs(meta: dict, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, list[bytes]]:
    channels, (height, width) = meta["preprocessing"]["channels"], meta["preprocessing"]["input_size"]
    images = rng.integers(0, 256, (batch, channels, height, width), dtype=np.uint8)
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return images, blobs


async def measure(export_dir: Path, batches: int, batch: int, log_db: Path | None) -> dict:
    meta = json.loads((export_dir / "model.json").read_text())
    model_file = next(p for p in export_dir.iterdir() if p.suffix in (".onnx", ".pt"))
    monitor = Monitor(MonitorSettings(log_db=log_db), CollectorRegistry())
    monitor.set_model(meta["model"]["name"], "bench", meta["class_names"], model_file)
    if monitor.reference is None:
        raise SystemExit(f"{export_dir}: no reference profile (cvrecipe monitor profile RUN)")
    rng = np.random.default_rng(0)
    images, blobs = _inputs(meta, batch, rng)
    headers = [read_header(b) for b in blobs]
    features_dim = monitor.reference.features_embedding.mean.shape[0] if monitor.reference.features_embedding else 0
    features = rng.normal(size=(batch, features_dim)).astype(np.float32) if features_dim else None
    logits = rng.normal(size=(batch, len(meta["class_names"]))).astype(np.float32)
    await monitor.start()
    inspect_s = record_s = 0.0
    for _ in range(batches):
        files = [bytes(b) for b in blobs]  # new objects per batch, as requests bring
        t0 = time.process_time()
        monitor.inspect(files, images, 0.001, 0.001, features)
        t1 = time.process_time()
        for k in range(batch):  # one request per image, as /v1/predict
            top = [{"class": meta["class_names"][int(np.argmax(logits[k]))], "probability": 0.9}]
            await monitor.record(uuid.uuid4().hex, [("image.png", files[k])], {0: logits[k]}, {0: top}, 3.0,
                                 {0: headers[k]})
        inspect_s += t1 - t0
        record_s += time.process_time() - t1
    t0 = time.process_time()
    await monitor.stop()  # the writer thread's remaining commits belong to record's cost
    record_s += time.process_time() - t0
    monitor.evaluate()
    t0 = time.process_time()
    for _ in range(20):
        monitor.evaluate()
    evaluate_ms = (time.process_time() - t0) / 20 * 1000
    n = batches * batch
    return {"inspect_us": inspect_s / n * 1e6, "record_us": record_s / n * 1e6, "evaluate_ms": evaluate_ms,
            "window": monitor.evaluate()["window"]["predictions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder with export/ and its profile")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    export_dir = args.run / "export"
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"no log": asyncio.run(measure(export_dir, args.batches, args.batch, None)),
                "SQLite log": asyncio.run(measure(export_dir, args.batches, args.batch, Path(tmp) / "log.sqlite"))}
    print(f"monitor CPU time, {args.batches} batches of {args.batch} images (window {rows['no log']['window']}):")
    for name, row in rows.items():
        print(f"  {name:10s}  inspect {row['inspect_us']:5.1f} µs/image  record {row['record_us']:5.1f} µs/image  "
              f"evaluate {row['evaluate_ms']:.1f} ms")


if __name__ == "__main__":
    main()
