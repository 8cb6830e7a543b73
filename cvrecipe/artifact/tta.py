"""Test-time augmentation: the model's outputs on flipped and 1-pixel-shifted views of each image,
mapped back to the image and merged by the task (tasks/views.py; Task.merge_views: an average of
class scores or of dense maps, for boxes the views' detections pooled and suppressed again)."""
from __future__ import annotations

from typing import Callable

import torch

from cvrecipe.tasks.views import View


def tta_views(level: int, mirror: bool = True) -> list[View]:
    """The views of a TTA level; weights sum to 1.

    level 0: the image. level 1: image and its mirror (½ each). level 2: those two (¼ each) plus
    the image and its mirror shifted one pixel up-left and down-right with reflect padding
    (⅛ each: 6 views in all).
    mirror=False (a model trained without horizontal flips, which has never seen a mirrored image)
    leaves the mirrored views out: level 1 is the image alone, level 2 the image (½) and its two
    shifts (¼ each).
    """
    if level == 0 or (level == 1 and not mirror):
        return [View(1.0)]
    if level == 1:
        return [View(0.5), View(0.5, mirror=True)]
    if not mirror:
        return [View(0.5), View(0.25, shift=1), View(0.25, shift=-1)]
    return [View(0.25), View(0.25, mirror=True), View(0.125, shift=1), View(0.125, shift=-1),
            View(0.125, mirror=True, shift=1), View(0.125, mirror=True, shift=-1)]


def average(outputs: list[tuple[View, torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
    """Weighted mean of outputs that need no mapping back (a classifier's scores)."""
    return sum(view.weight * out for view, out in outputs)


@torch.no_grad()
def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int, mirror: bool = True,
               merge: Callable[[list[tuple[View, torch.Tensor]], tuple[int, int]], torch.Tensor] = average
               ) -> torch.Tensor:
    """The model's outputs on (B, C, H, W) x merged over its TTA views by `merge` (the task's:
    Task.merge_views, which also maps each view's outputs back to the image of size (H, W))."""
    views = tta_views(level, mirror)
    if len(views) == 1:
        return model(x)
    return merge([(view, model(view.apply(x))) for view in views], tuple(x.shape[-2:]))
