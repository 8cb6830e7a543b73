"""Parity: does an exported file give the eager model's answers on real images?

Both sides get the same uint8 (N, C, H, W) images decoded by the data layer, so the comparison
covers everything after decoding: rescale, normalisation and the network. The exported file is
run at more than one batch size; what counts as agreement, and the tolerances, are the task's
(`Task.parity`: for classification, see cvrecipe/tasks/classification.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cvrecipe.tasks import ParityReport

__all__ = ["ParityReport", "run_in_batches"]


def run_in_batches(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                   batch_sizes: list[int]) -> np.ndarray:
    """Outputs for all of `x` from `predict`, cycling through `batch_sizes` so more than one size is exercised."""
    out, start, i = [], 0, 0
    while start < len(x):
        size = batch_sizes[i % len(batch_sizes)]
        out.append(np.asarray(predict(x[start:start + size]), dtype=np.float32))
        start, i = start + size, i + 1
    return np.concatenate(out)
