"""Test-time views of a batch of images, and the way back to the image's own frame.

A view is the image moved by `shift` pixels down and right (+1) or up and left (-1), the edge it
uncovers filled by reflection, and then mirrored left-right when `mirror`. artifact/tta.py makes
the views and runs the model on each; the task's `merge_views` maps each view's outputs back
(nothing to undo for a class score, a dense map flipped and moved back, boxes mirrored and moved
back) before merging them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def shifted(x: torch.Tensor, shift: int) -> torch.Tensor:
    """(..., H, W) moved by `shift` ∈ {-1, 0, 1} pixels down and right, reflect-padded: out[i, j] =
    x[i - shift, j - shift] inside, the uncovered row and column mirrored from their neighbours."""
    if shift == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(x.dtype)
    return padded[..., 1 - shift:h + 1 - shift, 1 - shift:w + 1 - shift]


@dataclass(frozen=True)
class View:
    weight: float  # its share of an average over views (the weights of a set of views sum to 1)
    mirror: bool = False
    shift: int = 0  # pixels the content moved down and right, before any mirroring

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view of (B, C, H, W) images."""
        x = shifted(x, self.shift)
        return x.flip(-1) if self.mirror else x

    def undo_dense(self, out: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) outputs on the view → on the image: mirrored back, then moved back (the row
        and column the shift pushed out of the view are filled by reflection)."""
        return shifted(out.flip(-1) if self.mirror else out, -self.shift)

    def undo_boxes(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(..., 4) x1, y1, x2, y2 in the view's pixels → in the image's, clipped to it."""
        if self.mirror:
            boxes = torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)
        boxes = boxes - self.shift
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        return torch.minimum(boxes.clamp(min=0), limits)
