"""TorchScript: trace a model into one file that `torch.jit.load` runs without this package.

torch 2.14 marks torch.jit as deprecated in favour of torch.export, but TorchScript files are
still what many C++ and mobile runtimes load, so the format is kept and its FutureWarnings are
silenced here, where they are expected.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def write_torchscript(module: nn.Module, sample: torch.Tensor, path: Path, dynamic_batch: bool,
                      outputs: tuple[str, ...] = ("logits",)) -> dict:
    """Trace `module` on `sample` (B, C, H, W) uint8 and save it; returns facts for model.json.

    A traced convolutional classifier accepts any batch size, so `dynamic_batch` changes nothing
    here; the parity check runs it at more than one batch size to confirm that.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module.eval(), sample, check_trace=False)
        torch.jit.save(traced, str(path))
    return {"batch_size": None, "runtime": "torch.jit.load", "torch": torch.__version__, "outputs": list(outputs)}


class TorchScriptRunner:
    """A loaded TorchScript file with the `predict(uint8 (B, C, H, W)) → float32 (B, K)` interface."""

    fixed_batch = None

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).to(self.device)
            return self.module(batch).float().cpu().numpy()
