"""Batched inference over uint8 images, and reading image files into a model's input shape."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cvrecipe.artifact.tiling import run_outputs
from cvrecipe.artifact.tta import tta_logits
from cvrecipe.device import autocast
from cvrecipe.tasks import get_task, spec_of, task_of


TILED_BATCH = 4  # images per call for models run in tiles (their outputs are (B, K, H, W) at full size)


def inference_batch_size(model: torch.nn.Module, batch_size: int) -> int:
    """The images per batch iter_logits takes: `batch_size`, or at most TILED_BATCH for a model its task runs
    on whole images (in tiles)."""
    meta = getattr(model, "meta", {})
    return min(batch_size, TILED_BATCH) if spec_of(task_of(meta)).whole_images(meta) else batch_size


@torch.no_grad()
def iter_logits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512,
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                channels_last: bool = False, tta: int = 0, tta_mirror: bool = True) -> Iterator[torch.Tensor]:
    """Per batch of `batch_size` uint8 images (N, C, H, W), in order: the model's float32 outputs
    on the CPU ((B, K) logits for a classifier; (B, K, H, W) for a segmentation model, run over
    overlapping tiles of its input size when its meta asks for it: tiling.py), in eval mode (the
    model's mode is put back after). `x` may also be a ShardedArray (images on disk): it is read a
    batch at a time.

    `tta` > 0 averages the outputs of flipped (and at level 2, shifted) views; `tta_mirror=False`
    leaves the mirrored ones out; see tta.py."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    if channels_last:  # weights too: conv kernels then run without layout conversions (1.6x for EfficientNet on CPU)
        model.to(memory_format=torch.channels_last)
    meta = getattr(model, "meta", {})
    task = _task(model)
    batch_size = inference_batch_size(model, batch_size)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            return tta_logits(model, batch, tta, tta_mirror, task.merge_views).float()

    try:
        for start in range(0, len(x), batch_size):
            batch = torch.as_tensor(x[start:start + batch_size]).to(device, non_blocking=True)
            yield run_outputs(forward, batch, meta).cpu()
    finally:
        model.train(was_training)


def predict_logits(model: torch.nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   channels_last: bool = False, tta: int = 0, tta_mirror: bool = True) -> torch.Tensor:
    """All of iter_logits' batches in one tensor: (N, K) float32 on the CPU for a classifier,
    (N, K, H, W) for a segmentation model."""
    out = list(iter_logits(model, x, batch_size, device, dtype, channels_last, tta, tta_mirror))
    return _task(model).merge_batches(out, model.meta)  # the task's outputs may be more than one tensor


def _task(model: torch.nn.Module):
    return get_task(task_of(getattr(model, "meta", {})))


def head_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The classifier's last linear layer (its head), whose input is the penultimate features."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def predict_features(model: torch.nn.Module, x: np.ndarray, batch_size: int = 512,
                     device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits (N, K), penultimate features (N, D) or None) of a classifier in float32, the features
    being what its head layer receives (None for a model without a linear head)."""
    head, captured = head_layer(model), []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].flatten(1).float().cpu())) \
        if head is not None else None
    try:
        logits = predict_logits(model, x, batch_size, device).numpy()
    finally:
        if hook is not None:
            hook.remove()
    return logits, (torch.cat(captured).numpy() if captured else None)


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


def load_image_batches(paths: list[Path], meta: dict, max_pixels: int | None = None
                       ) -> tuple[list[np.ndarray], list[Path], list[tuple[str, str]]]:
    """Image files as the model takes them: one batch resized to the input size, or, for a model run
    in tiles (its task says so), one batch per image at its own size (nothing is resized). Returns the
    batches (N_i, C, H_i, W_i) uint8, the files that decoded, in order, and (file, reason) for the rest."""
    if not spec_of(task_of(meta)).whole_images(meta):
        x, good, skipped = load_images_for_model(paths, meta, max_pixels)
        return ([x] if len(x) else []), good, skipped
    from cvrecipe.data.images import MAX_PIXELS, decode_images

    batches, good, skipped = [], [], []
    for path in paths:
        x, ok, bad = decode_images([(str(path), path.read_bytes())], meta["in_channels"], None, threads=1,
                                   max_pixels=max_pixels or MAX_PIXELS)
        skipped += bad
        if ok:
            batches.append(x)
            good.append(path)
    return batches, good, skipped
