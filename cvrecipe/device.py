"""The one place that decides device, autocast dtype and loss scaling."""
from __future__ import annotations

import contextlib
import os
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def backend_settings(device: torch.device, deterministic: bool = False, num_threads: int | None = None):
    """Torch's process-wide settings for one training run, put back as they were when it ends
    (fit() is also called from library code and tests, which must not inherit them):

    - deterministic: deterministic kernels only, cuDNN's autotuner off;
    - otherwise on CUDA, cuDNN times its convolution algorithms for each new shape and keeps the
      fastest (a one-time cost per shape; a fixed-shape training loop pays it in its first steps);
    - num_threads: the CPU thread count (None: leave it).
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
