"""What the serving process uses: CPU, resident memory, threads, and GPU memory when torch has a GPU."""
from __future__ import annotations

import sys

import psutil


class Resources:
    def __init__(self):
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first call only sets the starting point

    def sample(self) -> dict:
        """CPU % since the previous sample (100 = one core busy), RSS bytes, threads, GPU memory bytes."""
        with self.process.oneshot():
            out = {"cpu_percent": self.process.cpu_percent(None), "rss_bytes": self.process.memory_info().rss,
                   "threads": self.process.num_threads(), "gpu_memory_bytes": None, "gpu_utilization": None}
        torch = sys.modules.get("torch")  # never imported for this: an ONNX server may run without torch
        if torch is not None and torch.cuda.is_available():
            out["gpu_memory_bytes"] = int(torch.cuda.memory_allocated())
            try:
                out["gpu_utilization"] = float(torch.cuda.utilization())
            except Exception:  # noqa: BLE001 - needs NVML (pynvml); the memory figure stands alone
                pass
        return out
