"""Parity: does an exported file give the eager model's answers on real images?

Both sides get the same uint8 (N, C, H, W) images decoded by the data layer, so the comparison
covers everything after decoding: rescale, normalisation and the network.

Tolerances (max |logit difference|, share of images whose top-1 class agrees):
- fp32 export: ≤ 1e-4 and 100%. Differences come only from kernel summation order (~1e-6 here).
- fp16 export: ≤ 1% of the largest reference logit magnitude (at least 0.01) and ≥ 99%;
  half precision keeps ~3 significant digits, so near-ties between two classes may flip.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

FP32_ATOL = 1e-4
FP32_MIN_AGREEMENT = 1.0
FP16_RELATIVE_ATOL = 1e-2  # of max |reference logit|
FP16_MIN_AGREEMENT = 0.99


@dataclass
class ParityReport:
    images: int
    batch_sizes: list[int]  # batch sizes the exported file was run at
    max_abs_diff: float  # max |exported - eager| over all logits
    top1_agreement: float  # share of images with the same arg-max class
    atol: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_agreement >= self.min_agreement

    def summary(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g} (limit {self.atol:.3g}), top-1 agreement "
                f"{self.top1_agreement:.2%} (limit {self.min_agreement:.2%}) on {self.images} images")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def tolerances(reference: np.ndarray, half: bool) -> tuple[float, float]:
    """(atol, min_agreement) for an export in fp16 (`half`) or fp32; see the module docstring."""
    if not half:
        return FP32_ATOL, FP32_MIN_AGREEMENT
    scale = float(np.abs(reference).max()) if reference.size else 1.0
    return max(0.01, FP16_RELATIVE_ATOL * scale), FP16_MIN_AGREEMENT


def run_in_batches(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                   batch_sizes: list[int]) -> np.ndarray:
    """Logits (N, K) from `predict`, cycling through `batch_sizes` so more than one size is exercised."""
    out, start, i = [], 0, 0
    while start < len(x):
        size = batch_sizes[i % len(batch_sizes)]
        out.append(np.asarray(predict(x[start:start + size]), dtype=np.float32))
        start, i = start + size, i + 1
    return np.concatenate(out)


def compare(reference: np.ndarray, exported: np.ndarray, batch_sizes: list[int], atol: float,
            min_agreement: float) -> ParityReport:
    if reference.shape != exported.shape:
        raise ValueError(f"exported model gives logits of shape {exported.shape}, eager model {reference.shape}")
    n = len(reference)
    diff = float(np.abs(reference - exported).max()) if n else 0.0
    agree = float((reference.argmax(1) == exported.argmax(1)).mean()) if n else 1.0
    return ParityReport(n, batch_sizes, diff, agree, atol, min_agreement)
