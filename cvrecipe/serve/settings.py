"""Server settings: one dataclass, filled from the `cvrecipe serve` command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cvrecipe.monitor.settings import MonitorSettings


@dataclass
class ServeSettings:
    source: Path  # a run folder, an export folder (with model.json) or a model file
    backend: str = "auto"  # onnxruntime | torch | auto (onnxruntime when an ONNX export exists)
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    max_batch_size: int = 32  # images per forward pass; 1 disables batching
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    queue_size: int = 256  # images waiting for a forward pass before new requests get 503
    timeout_s: float = 10.0  # a request not answered in this time (queue + inference) gets 504
    max_body_mb: float = 10.0  # request bodies above this many MiB get 413
    max_pixels: int = 40_000_000  # images declaring more pixels (width × height) are refused unread; = data.max_pixels
    max_files: int = 64  # images per /v1/predict/batch request
    token: str | None = None  # bearer token required by predict and admin routes; None = open
    cors_origin: str | None = None  # one origin allowed to call from a browser; None = CORS off
    warmup_batches: int = 2  # forward passes at each warm-up batch size before /readyz says ready
    ort_threads: int | None = None  # ONNX Runtime intra-op threads; None = its default (one per core)
    ort_optimization: str = "all"  # ONNX Runtime graph optimisation: disable | basic | extended | all
    ort_io_binding: bool = False  # run ONNX Runtime through an IO binding
    own_process: bool = False  # the server owns its process (`cvrecipe serve`): process-wide tuning such as gc.freeze
    monitor: MonitorSettings = field(default_factory=MonitorSettings)  # drift, feedback, prediction log

    def __post_init__(self):
        self.source = Path(self.source)
        checks = {"max_batch_size": self.max_batch_size >= 1, "max_wait_ms": self.max_wait_ms >= 0,
                  "queue_size": self.queue_size >= 1, "timeout_s": self.timeout_s > 0,
                  "max_body_mb": self.max_body_mb > 0, "max_pixels": self.max_pixels > 0,
                  "max_files": self.max_files >= 1, "ort_threads": self.ort_threads is None or self.ort_threads >= 1,
                  "ort_optimization": self.ort_optimization in ("disable", "basic", "extended", "all")}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid server setting(s): {', '.join(f'{n}={getattr(self, n)}' for n in bad)}")
        if self.backend not in ("auto", "onnxruntime", "torch"):
            raise ValueError(f"backend must be auto, onnxruntime or torch, got '{self.backend}'")

    @property
    def ort_options(self) -> dict:
        """OnnxRunner's keyword arguments."""
        return {"threads": self.ort_threads, "optimization": self.ort_optimization, "io_binding": self.ort_io_binding}

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
