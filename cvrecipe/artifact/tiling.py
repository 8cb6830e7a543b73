"""Sliding-window inference: a model trained on tiles (crops) of its input size segments images of
any size, tile by tile, with overlapping tiles blended by Gaussian weights (MONAI's
`sliding_window_inference`). A tile's outputs near its edges saw less context and weigh little;
near its centre they weigh most, so no seams show where tiles meet.

A model that is run this way says so in its metadata: meta["tile"] = {"size": [h, w], "overlap":
share of a tile shared with its neighbour, "batch": tiles per forward pass}. `run_outputs` is the
one entry point used by evaluation, prediction, export checks and serving: it tiles when the model
asks for it and otherwise calls the model on the images as they are.
"""
from __future__ import annotations

from typing import Callable

import torch

Predict = Callable[[torch.Tensor], torch.Tensor]  # uint8 (n, C, h, w) → float outputs (n, ...)


def run_outputs(predict: Predict, x: torch.Tensor, meta: dict) -> torch.Tensor:
    """`predict`'s outputs for uint8 images x (B, C, H, W): through tiles when meta["tile"] says so."""
    tile = meta.get("tile")
    if not tile:
        return predict(x)
    return tiled(predict, x, tile["size"], tile.get("overlap", 0.5), tile.get("batch", 8))


def tiled(predict: Predict, x: torch.Tensor, size: list[int], overlap: float = 0.5, batch: int = 8) -> torch.Tensor:
    """(B, K, H, W) float32 outputs of `predict` over overlapping `size` tiles of x (B, C, H, W) uint8,
    blended with Gaussian weights (sigma = 1/8 of the tile side, MONAI's default). An image smaller
    than a tile is zero-padded to one and cropped back. `predict` always sees uint8 tiles of `size`."""
    from monai.inferers import sliding_window_inference

    def on_tiles(window: torch.Tensor) -> torch.Tensor:
        # MONAI computes in the input's dtype, so the image travels as float holding exact integers
        return predict(window.round().to(torch.uint8)).float()

    with torch.no_grad():
        return sliding_window_inference(x.float(), tuple(size), batch, on_tiles, overlap=overlap, mode="gaussian",
                                        padding_mode="constant", cval=0.0)
