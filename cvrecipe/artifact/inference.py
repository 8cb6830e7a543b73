"""Batched inference over uint8 images, and reading image files into a model's input shape."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cvrecipe.artifact.tta import tta_logits
from cvrecipe.device import autocast


@torch.no_grad()
def iter_logits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512,
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                channels_last: bool = False, tta: int = 0, tta_mirror: bool = True) -> Iterator[torch.Tensor]:
    """Per batch of `batch_size` uint8 images (N, C, H, W), in order: the model's float32 outputs
    on the CPU ((B, K) logits for a classifier), in eval mode (the model's mode is put back after).
    `x` may also be a ShardedArray (images on disk): it is read a batch at a time.

    `tta` > 0 averages the outputs of flipped (and at level 2, shifted) views; `tta_mirror=False`
    leaves the mirrored ones out; see tta.py."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    if channels_last:  # weights too: conv kernels then run without layout conversions (1.6x for EfficientNet on CPU)
        model.to(memory_format=torch.channels_last)
    try:
        for start in range(0, len(x), batch_size):
            batch = torch.as_tensor(x[start:start + batch_size]).to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                yield tta_logits(model, batch, tta, tta_mirror).float().cpu()
    finally:
        model.train(was_training)


def predict_logits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   channels_last: bool = False, tta: int = 0, tta_mirror: bool = True) -> torch.Tensor:
    """All of iter_logits' batches in one tensor: (N, K) float32 on the CPU for a classifier."""
    out = list(iter_logits(model, x, batch_size, device, dtype, channels_last, tta, tta_mirror))
    return torch.cat(out) if out else torch.zeros(0, model.meta["num_classes"])


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand_image_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the image files inside them."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def load_images_for_model(paths: list[Path], meta: dict, max_pixels: int | None = None
                          ) -> tuple[np.ndarray, list[Path], list[tuple[str, str]]]:
    """Decode files to the model's input shape with the same guarded decoder as training data:
    files whose header declares more than `max_pixels` (default: data.max_pixels' default) are
    refused unread."""
    from cvrecipe.data.images import MAX_PIXELS, decode_images

    items = [(str(p), p.read_bytes()) for p in paths]
    x, good, skipped = decode_images(items, meta["in_channels"], tuple(meta["input_size"]),
                                     max_pixels=max_pixels or MAX_PIXELS)
    return x, [paths[i] for i in good], skipped
