"""Live monitoring inside the server: a sliding window of served predictions, drift against the
reference profile, accuracy from fed-back labels, resources, the prediction log and alerts.

Where the work happens (the request path only appends to deques):
- the inference thread computes each image's input statistics (`inspect`), beside decode and infer;
- the request, once answered, records its predictions (`record`) and, with a log, waits for their
  commit (log.py) before its response goes out;
- a periodic task recomputes the figures every `interval_s` on a worker thread (`evaluate`), sets
  the Prometheus gauges, keeps a short history for the dashboard and POSTs a webhook when the
  overall state changes.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
import urllib.request
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvrecipe.imagefile import Header
from cvrecipe.monitor import drift, stats
from cvrecipe.monitor.log import PredictionLog, row_json
from cvrecipe.monitor.metrics import MonitorMetrics
from cvrecipe.monitor.profile import find_profile, read_profile
from cvrecipe.monitor.resources import Resources
from cvrecipe.monitor.settings import MonitorSettings

log = logging.getLogger("cvrecipe.monitor")
RECENT_MAX = 100_000  # predictions remembered in memory for feedback without a log
HISTORY_POINTS = 600  # dashboard history: one point per interval
CONFIDENCE_BINS = np.linspace(0, 1, 11)
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
              "PPM": ".ppm"}


@dataclass
class Seen:
    """One served image, as the window keeps it."""
    time: float
    predicted: int
    confidence: float
    inputs: dict  # input statistic → value
    logits: np.ndarray  # (K,)
    latency_ms: float
    features: np.ndarray | None = None  # (D,) penultimate features, when the served model gives them
    pixels: np.ndarray | None = None  # (K,) predicted pixels per class, for a segmentation model
    boxes: np.ndarray | None = None  # (n, 2) [class, score] of a detector's boxes at the profile's score floor


class Monitor:
    def __init__(self, settings: MonitorSettings, registry):
        self.settings = settings
        self.metrics = MonitorMetrics(registry)
        self.resources = Resources()
        self.log = (PredictionLog(settings.log_db, settings.capture_dir, settings.log_max_rows, settings.log_max_age_s)
                    if settings.log_db is not None else None)
        self._lock = threading.Lock()
        self._window: deque[Seen] = deque(maxlen=settings.window)
        self._labelled: OrderedDict = OrderedDict()  # (request_id, item) → (time, predicted, label, confidence)
        self._recent: OrderedDict = OrderedDict()  # (request_id, item) → (predicted, confidence)
        self._inspected: OrderedDict = OrderedDict()  # id(file bytes) → (input stats, header)
        self.reference: drift.Reference | None = None
        self.profile_path: Path | None = None
        self.class_names: list[str] = []
        self.model: dict = {}
        self.state = "waiting"
        self.report: dict = {}
        self.history: deque = deque(maxlen=HISTORY_POINTS)
        self.served = 0  # images recorded since start
        self._task: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.log is not None:
            self.log.start()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cvrecipe-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.log is not None:
            await self.log.close()

    def set_model(self, name: str, version: str, class_names: list[str], model_file: Path) -> None:
        """The served model changed (start or reload): its reference profile, if it has one."""
        if list(class_names) != self.class_names:
            with self._lock:  # another model's answers say nothing about this one
                self._window.clear()
        self.class_names = list(class_names)
        self.model = {"name": name, "version": version}
        path = find_profile(model_file)
        reference = None
        if path is not None:
            try:
                reference = drift.reference_for(read_profile(path))
            except (ValueError, KeyError) as err:
                log.error("reference profile %s not used: %s", path, err)
        if reference is not None and reference.class_names != self.class_names:
            log.error("reference profile %s is for classes %s, the model has %s; not used", path,
                      reference.class_names, self.class_names)
            reference = None
        if reference is None:
            log.warning("no reference profile for %s: drift is not computed; write one with "
                        "`cvrecipe monitor profile RUN`", model_file)
        self.reference, self.profile_path = reference, path if reference is not None else None

    # -- the request path ----------------------------------------------------------------------------
    def inspect(self, blobs: list[bytes], images: np.ndarray, decode_s: float, infer_s: float,
                features: np.ndarray | None = None) -> None:
        """On the inference thread: input statistics of decoded images (N, C, H, W) uint8, the files
        they came from and their penultimate features (N, D) if any, kept until their request records them."""
        values = stats.input_stats(images)
        names = list(values)
        columns = np.stack([values[n] for n in names], 1).tolist()  # (N, S)
        with self._lock:
            for k, (blob, row) in enumerate(zip(blobs, columns)):
                self._inspected[id(blob)] = (dict(zip(names, row)), None if features is None else features[k])
            while len(self._inspected) > 8192:  # entries of requests that timed out
                self._inspected.popitem(last=False)
        self.metrics.stages["decode"].observe(decode_s)
        self.metrics.stages["infer"].observe(infer_s)

    async def record(self, request_id: str, files: list[tuple[str, bytes]], logits: dict[int, np.ndarray],
                     tops: dict[int, list], latency_ms: float, headers: dict[int, Header]) -> None:
        """After a request was answered (before the response is sent): its images join the window
        and, with a log, their rows are committed. `headers`: each file's, as the route read it."""
        start, now = time.perf_counter(), time.time()
        rows, captures = [], {}
        with self._lock:
            for i, z in logits.items():
                inputs, features = self._inspected.pop(id(files[i][1]), (None, None))
                header = headers[i]
                inputs = {**(inputs or {}), "size": math.sqrt(header.width * header.height)}
                predicted = int(np.argmax(z))
                confidence = float(tops[i][0]["probability"])
                self._window.append(Seen(now, predicted, confidence, inputs, z, latency_ms, features))
                self._recent[(request_id, i)] = (predicted, confidence)
                if self.log is not None:
                    rows.append(self._row(request_id, i, now, files[i], predicted, tops[i], latency_ms, inputs,
                                          header, captures))
            while len(self._recent) > RECENT_MAX:
                self._recent.popitem(last=False)
            self.served += len(logits)
        if rows:
            await self.log.write(rows, captures)
        self.metrics.stages["log"].observe(time.perf_counter() - start)

    def _row(self, request_id, item, now, file, predicted, top, latency_ms, inputs, header, captures) -> dict:
        name, data = file
        capture = None
        if self.settings.capture_percent and random.random() * 100 < self.settings.capture_percent:
            capture = f"{request_id}-{item}{FORMAT_EXT.get(header.format if header else '', '.img')}"
            captures[capture] = data
        return {"request_id": request_id, "item": item, "time": now, "model_version": self.model.get("version"),
                "file": name, "predicted": self.class_names[predicted] if predicted >= 0 else None,
                "confidence": top[0]["probability"] if top and "probability" in top[0] else None,
                "top_k": row_json(top), "latency_ms": latency_ms, "input_hash": hashlib.sha256(data).hexdigest(),
                "width": header.width if header else None, "height": header.height if header else None,
                "stats": row_json(inputs), "state": self.state, "capture": capture}

    def record_pixels(self, pixels: np.ndarray, confidence: float, latency_ms: float) -> None:
        """A segmented image joins the window: its predicted pixels per class (K,) and its mean per-pixel
        confidence (no log row, no feedback: those are per image class)."""
        seen = Seen(time.time(), int(np.argmax(pixels)), confidence, {}, np.zeros(0), latency_ms, pixels=pixels)
        with self._lock:
            self._window.append(seen)
            self.served += 1

    async def record_boxes(self, request_id: str, file: tuple[str, bytes], rows: np.ndarray, answer: list[dict],
                           latency_ms: float, header: Header) -> None:
        """A detected image joins the window: its detections (rows (D, 6) [x1, y1, x2, y2, score, class])
        scoring at least the reference profile's floor, the same for every request whatever score
        threshold it asked for, and its input statistics; with a log, a row holding `answer` (the boxes
        sent) is committed. No feedback: an image with boxes has no one label."""
        start, now = time.perf_counter(), time.time()
        floor = getattr(self.reference, "score_threshold", drift.BOX_SCORE_FLOOR)
        kept = rows[(rows[:, 5] >= 0) & (rows[:, 4] >= floor)]
        boxes = np.stack([kept[:, 5], kept[:, 4]], 1)  # (n, 2) [class, score]
        best = int(np.argmax(kept[:, 4])) if len(kept) else None
        predicted, confidence = (int(kept[best, 5]), float(kept[best, 4])) if best is not None else (-1, 0.0)
        with self._lock:
            inputs, _ = self._inspected.pop(id(file[1]), (None, None))
            inputs = {**(inputs or {}), "size": math.sqrt(header.width * header.height)}
            self._window.append(Seen(now, predicted, confidence, inputs, np.zeros(0), latency_ms, boxes=boxes))
            self.served += 1
        if self.log is not None:
            captures: dict = {}
            row = self._row(request_id, 0, now, file, predicted, answer, latency_ms, inputs, header, captures)
            row["confidence"] = confidence if predicted >= 0 else None  # the best box's score
            await self.log.write([row], captures)
        self.metrics.stages["log"].observe(time.perf_counter() - start)

    async def feedback(self, request_id: str, item: int, label: str) -> dict:
        """Record the true label of a served image. ValueError: unknown class; KeyError: unknown request."""
        if label not in self.class_names:
            raise ValueError(f"label '{label}' is not one of the model's classes ({', '.join(self.class_names)})")
        key = (request_id, item)
        known = self._recent.get(key)
        if known is None and self.log is not None:
            found = await asyncio.to_thread(self.log.lookup, request_id, item)
            if found is not None:
                known = (self.class_names.index(found[0]), float(found[1]))
        if known is None:
            raise KeyError(f"no prediction with request_id '{request_id}' and item {item} is known "
                           f"(too old, or from another server)")
        if self.log is not None:
            await self.log.feedback(request_id, item, label)
        with self._lock:
            self._labelled[key] = (time.time(), known[0], self.class_names.index(label), known[1])
            self._labelled.move_to_end(key)
            while len(self._labelled) > self.settings.window:
                self._labelled.popitem(last=False)
        self.metrics.feedback.inc()
        return {"request_id": request_id, "item": item, "label": label, "predicted": self.class_names[known[0]],
                "correct": known[0] == self.class_names.index(label), "stored": "log" if self.log else "memory"}

    # -- the figures -----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Everything /v1/monitor shows, computed from a snapshot of the window."""
        cutoff = time.time() - self.settings.window_s
        with self._lock:
            seen = [s for s in self._window if s.time >= cutoff]
            labelled = [v for v in self._labelled.values() if v[0] >= cutoff]
        boxes = [s.boxes for s in seen if s.boxes is not None]
        # a detector's window: the scores of all its boxes; otherwise one confidence per image
        confidence = np.concatenate([b[:, 1] for b in boxes]) if boxes else np.array([s.confidence for s in seen])
        report = {"time": time.time(), "model": self.model, "window": self._window_info(seen),
                  "reference": self._reference_info(), "classes": self.class_names}
        drifts = []
        if self.reference is not None:
            with _one_blas_thread():
                drifts = self.reference.detect(seen, self.settings.min_samples)
        report["drift"] = drifts
        report["state"] = drift.worst(d["state"] for d in drifts)
        report["class_mix"] = self._class_mix(seen)
        report["confidence"] = self._confidence_hist(confidence)
        report["accuracy"] = accuracy_figures(labelled, self.class_names)
        report["latency_ms"] = _percentiles([s.latency_ms for s in seen])
        report["resources"] = self.resources.sample()
        report["log"] = ({"path": redact(str(self.log.path)), "rows_written": self.log.rows_written, "pending": self.log.pending,
                          "commits": self.log.commits} if self.log else None)
        return report

    def _window_info(self, seen: list[Seen]) -> dict:
        span = (seen[-1].time - seen[0].time) if len(seen) > 1 else 0.0
        return {"predictions": len(seen), "size": self.settings.window, "max_age_s": self.settings.window_s,
                "seconds": span, "served_total": self.served}

    def _reference_info(self) -> dict | None:
        if self.reference is None:
            return None
        return {"path": str(self.profile_path), "images": self.reference.profile["images"],
                "source": self.reference.profile.get("source", {})}

    def _class_mix(self, seen: list[Seen]) -> dict:
        """Shares of the window's predicted classes (of its pixels, for a segmentation model; of its boxes, for a
        detector) and the reference's."""
        if seen and seen[-1].pixels is not None:
            counts = np.sum([s.pixels for s in seen if s.pixels is not None], 0)
        elif seen and seen[-1].boxes is not None:  # a detector: the classes of its boxes, pooled
            classes = np.concatenate([s.boxes[:, 0] for s in seen if s.boxes is not None]).astype(np.int64)
            counts = np.bincount(classes, minlength=len(self.class_names))
        else:
            counts = np.bincount(np.array([s.predicted for s in seen], np.int64), minlength=len(self.class_names))
        live = stats.shares(counts).tolist()
        reference = stats.shares(self.reference.class_counts).tolist() if self.reference else None
        return {"live": live, "reference": reference}

    def _confidence_hist(self, confidence: np.ndarray) -> dict:
        live = stats.shares(np.histogram(confidence, CONFIDENCE_BINS)[0]).tolist()
        reference = (stats.shares(np.histogram(self.reference.confidence, CONFIDENCE_BINS)[0]).tolist()
                     if self.reference else None)
        return {"edges": CONFIDENCE_BINS.tolist(), "live": live, "reference": reference,
                "mean": float(confidence.mean()) if len(confidence) else None}

    # -- the periodic task -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        last_served, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                report = await asyncio.to_thread(self.evaluate)
            except Exception:  # noqa: BLE001 - monitoring must never take the server down
                log.exception("monitoring evaluation failed")
                continue
            now = time.monotonic()
            report["throughput_per_s"] = (self.served - last_served) / max(now - last_time, 1e-9)
            last_served, last_time = self.served, now
            self.publish(report)

    def publish(self, report: dict) -> None:
        """Adopt a freshly computed report: gauges, history, state change and its webhook."""
        self.report = report
        self.metrics.update(report)
        self.history.append({"time": report["time"], "throughput_per_s": report.get("throughput_per_s"),
                             "latency_ms": report["latency_ms"], "state": report["state"],
                             "states": {d["quantity"]: d["state"] for d in report["drift"]},
                             "accuracy": report["accuracy"]["accuracy"],
                             "cpu_percent": report["resources"]["cpu_percent"],
                             "rss_bytes": report["resources"]["rss_bytes"]})
        previous, self.state = self.state, report["state"]
        if previous != self.state and self.state != "waiting" and not (previous == "waiting" and self.state == "ok"):
            log.warning("drift state %s → %s", previous, self.state)
            if self.settings.alert_webhook:
                self._send_alert(previous, report)

    def _send_alert(self, previous: str, report: dict) -> None:
        body = {"event": "drift_state_changed", "previous": previous, "state": report["state"],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(report["time"])),
                "model": report["model"], "window": report["window"]["predictions"],
                "quantities": [{k: d.get(k) for k in ("quantity", "statistic", "score", "state")}
                               for d in report["drift"] if d["state"] in ("warn", "alert")]}

        def post():
            request = urllib.request.Request(self.settings.alert_webhook, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                self.metrics.alerts.labels("sent").inc()
            except Exception as err:  # noqa: BLE001 - a dead receiver must not stop monitoring
                self.metrics.alerts.labels("failed").inc()
                log.error("alert webhook %s failed: %s", self.settings.alert_webhook, err)

        threading.Thread(target=post, name="cvrecipe-alert", daemon=True).start()


_BLAS: list = []  # the ThreadpoolController, made on first use (it lists the loaded libraries)


def _one_blas_thread():
    """The detectors' matrix products are small (1,000 × 500 × 16): on one BLAS thread. A second
    one gains nothing there and busy-waits after each product, taking a core from requests: an
    evaluation cost 19-23 ms of CPU with two threads, 8-12 ms with one (bench/monitor_cost.py)."""
    from threadpoolctl import ThreadpoolController

    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def accuracy_figures(labelled: list[tuple], class_names: list[str]) -> dict:
    """Accuracy, recall per true class and ECE of (time, predicted, label, confidence) tuples."""
    if not labelled:
        return {"labelled": 0, "accuracy": None, "per_class_recall": {}, "ece": None}
    predicted = np.array([v[1] for v in labelled])
    label = np.array([v[2] for v in labelled])
    confidence = np.array([v[3] for v in labelled])
    correct = predicted == label
    recall = {class_names[c]: float(correct[label == c].mean()) for c in np.unique(label)}
    return {"labelled": len(labelled), "accuracy": float(correct.mean()), "per_class_recall": recall,
            "ece": stats.ece(confidence, correct.astype(np.float64))}


def redact(target: str) -> str:
    """A database URL without its password."""
    return re.sub(r"//([^:@/]+):[^@]*@", r"//\1:***@", target)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
