"""The one place that decides device, autocast dtype and loss scaling."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None means plain fp32. 'auto' picks bf16 on CUDA (fp16 on GPUs without bf16) and fp32 on CPU.
    Whether bf16 pays on a CPU depends on the CPU: without native bf16 instructions autocast made conv
    training slower, while on an AMD EPYC with avx512_bf16 it made the speedrun net's step ~2x faster
    (see README), so recipes that were measured ask for bf16 explicitly."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ValueError(f"train.precision must be fp32, bf16, fp16 or auto, got '{precision}'")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


MEMORY_FRACTION = 0.5  # of the memory free now that a dataset may take by default (the rest: model, activations, others)


def available_memory() -> int:
    """Bytes of host memory available now (Linux: MemAvailable, which counts reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(memory_gb: float | None, device: torch.device | str | None = None) -> int:
    """Bytes a dataset may hold in memory before it is streamed from disk: `memory_gb` when set,
    else MEMORY_FRACTION of the host memory available now, and on a GPU (where the in-memory
    path keeps the training images) also of the device memory free now."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    budget = MEMORY_FRACTION * available_memory()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, MEMORY_FRACTION * free)
    return int(budget)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator that draws epoch `epoch`'s data order and augmentation: seeded by (seed, epoch)
    alone, so a resumed run draws exactly what an uninterrupted one would have."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 100_003 + epoch)
    return gen


# glibc's malloc gives big freed blocks back to the kernel at once, so a CPU training step that frees
# and re-allocates the same activation buffers (tens of MB each at batch 256) takes a page fault and
# a page zeroing per 4 KiB of them on every step: ~30,000 faults per step of the speedrun net on
# 2 cores, 5-8 % of its time. Serving blocks up to 32 MiB (glibc's ceiling) from the heap and keeping
# up to 256 MiB of freed heap for reuse cuts that to ~5,500 faults per step (README, "Freed memory on the CPU").
_MMAP_THRESHOLD_BYTES = 32 << 20
_TRIM_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for the next allocation instead of returning it to
    the kernel (see above). Process-wide and not undone: glibc cannot go back to its adaptive
    thresholds once they are set, and later runs in the process gain from it too. The peak memory
    it can add is bounded by the 256 MiB kept. False (and nothing changed) where the C library is
    not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


@contextlib.contextmanager
def backend_settings(device: torch.device, deterministic: bool = False, num_threads: int | None = None):
    """Torch's process-wide settings for one training run, put back as they were when it ends
    (fit() is also called from library code and tests, which must not inherit them):

    - deterministic: deterministic kernels only, cuDNN's autotuner off;
    - otherwise on CUDA, cuDNN times its convolution algorithms for each new shape and keeps the
      fastest (a one-time cost per shape; a fixed-shape training loop pays it in its first steps);
    - num_threads: the CPU thread count (None: leave it);
    - on CPU, freed memory is kept for reuse (reuse_freed_memory; the one setting not put back).
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads())
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if device.type == "cpu":
            reuse_freed_memory()
        if num_threads:
            torch.set_num_threads(num_threads)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_num_threads(saved[3])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
