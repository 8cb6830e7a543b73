"""A small trained detector for the export, serving and monitoring tests: digits pasted on dark noise
(COCO JSON + YOLO labels), FCOS on a pretrained EfficientNet-Lite0 at 64 px, trained for seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
from detector_helpers import digit_boxes_set
from rich.console import Console

from cvrecipe.config import load_config
from cvrecipe.train.job import train

CLASSES = ("0", "1", "2")  # digits 0, 1, 2 as objects
SIZE = 64


def synth_boxes(out: Path, splits: dict[str, tuple[int, int]], max_objects: int = 2) -> Path:
    """{split: (images, seed)} of SIZE px images with 1 to `max_objects` digits each."""
    return digit_boxes_set(out, splits, (SIZE, SIZE), len(CLASSES), max_objects)


def train_detector_run(root: Path, epochs: int = 6) -> tuple[Path, Path]:
    """(run folder, data folder): detect-synth's FCOS (FPN 64 wide) trained on 16 images, tested on 24."""
    data = synth_boxes(root / "set", {"train": (16, 1), "val": (4, 2), "test": (24, 3)})
    cfg = load_config("detect-synth", [f"data.name=boxes:{data}", f"data.image_size={SIZE}",
                                       f"data.cache_dir={root / 'cache'}", f"runs_dir={root / 'runs'}", "name=det",
                                       "model.kwargs={fpn_channels: 64}", "train.num_threads=1",
                                       f"train.epochs={epochs}", "train.batch_size=8", "optim.lr=3e-3",
                                       "train.sanity=false"])  # 16 images: too few for the checks' held-out comparisons
    return train(cfg, console=Console(quiet=True)), data


@pytest.fixture(scope="session")
def exported_detector(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, data folder): train_detector_run's detector, exported by `cvrecipe export RUN --format onnx
    --dynamic-batch` (model.onnx, model.json, profile.json); trained once per session (torch on one thread
    meanwhile), shared by the modules that import this fixture."""
    import torch

    from cvrecipe.cli import main

    root = tmp_path_factory.getbasetemp() / "detector"
    if (root / "runs" / "det" / "export" / "profile.json").is_file():
        return root / "runs" / "det", root / "set"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run, data = train_detector_run(root)
        assert main(["export", str(run), "--format", "onnx", "--dynamic-batch"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run, data
