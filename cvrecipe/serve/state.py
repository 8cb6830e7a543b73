"""What a running server holds: the current model, the batcher, readiness, and model reloads."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import time

import numpy as np

from cvrecipe.monitor.live import Monitor
from cvrecipe.serve.backends import Backend, load_backend, resolve_source, warm_up
from cvrecipe.serve.batching import Batcher, QueueFull, ShuttingDown
from cvrecipe.serve.inputs import ServeError
from cvrecipe.serve.metrics import Metrics
from cvrecipe.serve.settings import ServeSettings

log = logging.getLogger("cvrecipe.serve")


class ServerState:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.monitor = Monitor(settings.monitor, self.metrics.registry) if settings.monitor.enabled else None
        self.backend: Backend | None = None  # swapped as a whole on reload; read once per batch
        self.batcher: Batcher | None = None
        self.status = "loading"  # loading | ready | failed | draining
        self.stopping = False  # a shutdown signal arrived: /readyz says 503 while the last requests are answered
        self.arriving = 0  # predict requests reading or checking their body, not yet queued
        self.error: str | None = None
        self.warmed_up = False  # a decode and forward pass ran at start (see _warm_decode)
        self._reload_lock = asyncio.Lock()
        self._load_task: asyncio.Task | None = None

    # -- lifecycle (called from the app's lifespan) ----------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.batcher = Batcher(self._infer, s.max_batch_size, s.max_wait_ms / 1000, s.queue_size, self.metrics,
                               arriving=lambda: self.arriving)
        self.batcher.start()
        if self.monitor is not None:
            await self.monitor.start()
        # load in the background: /healthz answers at once, /readyz says 503 until this finishes
        self._load_task = asyncio.get_running_loop().create_task(self._load_initial())

    async def stop(self) -> None:
        """Refuse new work and finish what is queued (uvicorn has already let in-flight requests end)."""
        self.status = "draining"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        if self.monitor is not None:
            await self.monitor.stop()  # after the batcher: the last answered requests' rows are committed

    async def _load_initial(self) -> None:
        try:
            backend = await asyncio.to_thread(self._load)
        except Exception as err:  # noqa: BLE001 - reported by /readyz and the log, server stays up
            self.status, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("could not load the model from %s: %s", self.settings.source, self.error)
            return
        self._install(backend)
        self.status = "ready"
        log.info("serving %s version %s (%s)", backend.info["name"], backend.version, backend.source.path)
        if backend.runner.fixed_batch == 1 and self.settings.max_batch_size > 1:
            log.warning("%s has a fixed batch size of 1, so images run one by one; export with --dynamic-batch "
                        "to batch them", backend.source.path)

    def _load(self) -> Backend:
        """Resolve, load and warm up the model; runs on a thread, never on the event loop."""
        s = self.settings
        backend = load_backend(resolve_source(s.source, s.backend), s.ort_options)
        size = min(s.max_batch_size, backend.runner.fixed_batch or s.max_batch_size)
        warm_up(backend, size, s.warmup_batches)
        self._warm_decode(backend, size)
        if s.own_process:
            gc.collect()  # start-up garbage, collected before _install freezes what is left
        return backend

    def _warm_decode(self, backend: Backend, size: int) -> None:
        """Decode PNG and JPEG files as requests send them, at batch sizes 1 and `size`, so the
        first request finds the decoders' plugins loaded (the first request after a start took
        ~1.4 s without this) and the model warm at the input it will get."""
        from PIL import Image

        channels, height, width = backend.input_shape
        files = []
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.new("L" if channels == 1 else "RGB", (width, height), 128).save(buf, format=fmt)
            files.append(buf.getvalue())
        for n in sorted({1, size}):
            decoded = backend.decode([files[i % 2] for i in range(n)], self.settings.max_pixels)
            bad = [d for d in decoded if not isinstance(d, np.ndarray)]
            if bad:
                raise ValueError(f"warm-up: the server's decoder refused its own test image: {bad[0].message}")
            backend.outputs(decoded)
        self.warmed_up = True

    def _install(self, backend: Backend) -> None:
        self.backend = backend
        if self.settings.own_process:
            # What is alive now (modules, the model and its session) lives as long as the server: out
            # of the collector's sight, a full collection no longer walks it. Such collections took
            # 70-490 ms each (docs/serving.md#tail-latency), paid by the requests they interrupted.
            gc.freeze()
        self.metrics.set_model(backend.info["name"], backend.version, backend.source.backend)
        if self.monitor is not None:
            self.monitor.set_model(backend.info["name"], backend.version, backend.info["class_names"],
                                   backend.source.path)

    # -- inference ---------------------------------------------------------------------------------
    def _infer(self, blobs: list[bytes]) -> tuple[list, Backend]:
        """On the inference thread: decode a batch of image files, run the model on those that
        decoded. One output per blob: logits (K,) float32, or the ServeError that refused it."""
        backend = self.backend  # one model per batch, even if a reload swaps it meanwhile
        start = time.perf_counter()
        outputs = backend.decode(blobs, self.settings.max_pixels)
        good = [i for i, out in enumerate(outputs) if isinstance(out, np.ndarray)]
        if good:
            images = [outputs[i] for i in good]  # (C, H, W) uint8 each
            decoded = time.perf_counter()
            if self.monitor is not None and not backend.whole_images:
                results, features = backend.outputs_and_features(images)  # + what drift embeds
                self.monitor.inspect([blobs[i] for i in good], np.stack(images), decoded - start,
                                     time.perf_counter() - decoded, features)
            else:
                results = backend.outputs(images)  # logits (K,) each, or (K, H, W) for a tiled segmentation model
            for i, logits in zip(good, results):
                outputs[i] = logits
        return outputs, backend

    @contextlib.contextmanager
    def arrival(self):
        """Count a request as on its way to the batcher while it reads and checks its body."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    def require_ready(self) -> Backend:
        if self.status != "ready" or self.backend is None:
            reason = {"loading": "the model is still loading", "draining": "the server is shutting down",
                      "failed": f"the model failed to load ({self.error})"}[self.status]
            raise ServeError(503, "not_ready", reason, {"Retry-After": "1"})
        return self.backend

    def require_task(self, task: str) -> Backend:
        """The served model, when it is ready and answers `task`; otherwise the error to send."""
        backend = self.require_ready()
        if backend.info["task"] != task:
            raise ServeError(409, "wrong_task", f"this route serves {task} models; the served model is a "
                                                f"{backend.info['task']} model")
        return backend

    async def infer(self, blobs: list[bytes], deadline: float) -> tuple[list, Backend]:
        """Per image file, logits (K,) or the ServeError that refused it, through the batcher;
        raises 503 when the queue is full and 504 when `deadline` (time.perf_counter) passes first."""
        if deadline <= time.perf_counter():  # e.g. a slow upload: no point queuing it
            self.metrics.rejected.labels("timeout").inc()
            raise ServeError(504, "timeout", f"no answer within the server's {self.settings.timeout_s} s limit "
                                             f"(the request took that long to arrive)")
        size = self.settings.max_batch_size
        futures = []
        try:
            for start in range(0, len(blobs), size):
                futures.append(self.batcher.submit(blobs[start:start + size]))
        except (QueueFull, ShuttingDown) as err:
            for f in futures:
                f.cancel()
            self.metrics.rejected.labels("queue_full" if isinstance(err, QueueFull) else "shutting_down").inc()
            raise ServeError(503, "overloaded" if isinstance(err, QueueFull) else "shutting_down",
                             f"{err}; retry shortly", {"Retry-After": "1"}) from err
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError as err:
            self.metrics.rejected.labels("timeout").inc()
            raise ServeError(504, "timeout", f"no answer within the server's {self.settings.timeout_s} s limit "
                                             f"(queue + inference)") from err
        return [out for outputs, _ in results for out in outputs], results[0][1]

    # -- reload ------------------------------------------------------------------------------------
    async def reload(self) -> dict:
        """Load and warm the model from the configured source again, then swap it in. Requests keep
        being answered by the old model until the swap; a failed load leaves it serving."""
        async with self._reload_lock:
            old = self.require_ready()
            start = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._load)
            except Exception as err:  # noqa: BLE001 - any load failure keeps the old model
                self.metrics.reloads.labels("failed").inc()
                message = f"could not load {self.settings.source}: {type(err).__name__}: {err}"
                raise ServeError(500, "reload_failed", f"{message}; still serving {old.version}") from err
            if new.info["task"] != old.info["task"]:
                self.metrics.reloads.labels("failed").inc()
                raise ServeError(409, "task_changed", f"the new model is a {new.info['task']} model, the served "
                                                      f"one a {old.info['task']} model; restart the server instead")
            if new.input_shape != old.input_shape:
                self.metrics.reloads.labels("failed").inc()
                message = f"the new model takes {new.input_shape} images, the served one {old.input_shape}"
                raise ServeError(409, "input_shape_changed", f"{message}; restart the server instead")
            self._install(new)
            self.metrics.reloads.labels("ok").inc()
            log.info("reloaded: version %s → %s", old.version, new.version)
            return {"previous_version": old.version, "version": new.version,
                    "seconds": round(time.perf_counter() - start, 3)}
