"""Test-time augmentation: average the logits of flipped and 1-pixel-shifted views of each image."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def tta_views(x: torch.Tensor, level: int, mirror: bool = True) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs for (B, C, H, W) images; weights sum to 1.

    level 0: the image. level 1: image and its mirror (½ each). level 2: those two (¼ each) plus
    the image and its mirror shifted one pixel up-left and down-right with reflect padding
    (⅛ each: 6 views in all).
    mirror=False (a model trained without horizontal flips, which has never seen a mirrored image)
    leaves the mirrored views out: level 1 is the image alone, level 2 the image (½) and its two
    shifts (¼ each).
    """
    if level == 0 or (level == 1 and not mirror):
        return [(1.0, x)]
    if level == 1:
        return [(0.5, x), (0.5, x.flip(-1))]
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(x.dtype)
    up_left, down_right = padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]
    if not mirror:
        return [(0.5, x), (0.25, up_left), (0.25, down_right)]
    shifted = [up_left, down_right, up_left.flip(-1), down_right.flip(-1)]
    return [(0.25, x), (0.25, x.flip(-1))] + [(0.125, v) for v in shifted]


def weighted_sum(weighted: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return sum(weight * out for weight, out in weighted)


@torch.no_grad()
def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int, mirror: bool = True,
               merge: Callable[[list[tuple[float, torch.Tensor]]], torch.Tensor] = weighted_sum) -> torch.Tensor:
    """The model's outputs on x merged over its TTA views by `merge` (the task's: Task.merge_views)."""
    return merge([(weight, model(view)) for weight, view in tta_views(x, level, mirror)])
