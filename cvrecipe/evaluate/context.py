"""What a task's report sections get to work with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from cvrecipe.config import Config
from cvrecipe.data import ImageDataset, Split
from cvrecipe.models import ImageModel


@dataclass
class ReportContext:
    run_dir: Path
    cfg: Config
    ds: ImageDataset
    split: str  # the evaluated split's name
    part: Split  # its images and targets
    model: ImageModel  # the best checkpoint, on `device`
    checkpoint: Path  # best.safetensors
    outputs: torch.Tensor  # the model's outputs on `part` (with the run's TTA), on the CPU
    metrics: dict  # the task's evaluate() result on `part`
    device: torch.device
    plots: Path  # RUN/plots/: every figure is also written here
    calibrate: bool
    console: Console
