"""Box-aware augmentation on the training device: images and their boxes move together, batched.

Images are (B, C, H, W) tensors of any dtype (uint8 in the training loop); boxes travel as one
(M, 6) float tensor of rows [x1, y1, x2, y2, class, image] in pixels (data/ragged.py), so a batch
holds any number of boxes per image with no Python loop over images. Randomness comes from an
explicit torch.Generator, as in data/augment.py.

- `hflip`: mirror chosen images left-right; their boxes' x become W − x.
- `zoom_windows` (the training loop's scale/translate, Detection.augment): per image a zoom factor
  and a shift in whole pixels; `crop_images` / `crop_boxes` then apply any windows.
- `random_resized_crop`: per image a window of random area (`scale`, as a fraction of the image,
  above 1 zooms out) and aspect (`ratio`), placed at random (translation), resampled to the output
  size (bilinear for images; `mode="nearest"` for masks). Boxes are mapped to the window's frame,
  clipped to the image, and dropped when their shorter clipped side is under `min_size` pixels or
  less than `min_visible` of their area stays inside the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hflip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror images where `flip` (B,) bool is set; boxes (M, 6) follow."""
    width = x.shape[-1]
    flip = flip.to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mine = flip[boxes[:, 5].long()][:, None]  # (M, 1): the box's image is flipped
    mirrored = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return x, torch.cat([torch.where(mine, mirrored, boxes[:, :4]), boxes[:, 4:]], dim=1)


def random_flip(x: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image (and its boxes) with probability 1/2."""
    return hflip(x, boxes, torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5)


def random_windows(batch: int, height: int, width: int, gen: torch.Generator, scale=(0.3, 1.0),
                   ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(B, 4) windows [top, left, height, width] in input pixels: area scale·H·W with `scale` drawn
    uniformly, aspect (w/h) log-uniform in `ratio`, position uniform over where the window fits
    (or, when it is larger than the image, over where it covers the image)."""
    draws = torch.rand(batch, 4, generator=gen, device=gen.device).double()
    area = (scale[0] + (scale[1] - scale[0]) * draws[:, 0]) * height * width
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[:, 1])
    win_w, win_h = (area * aspect).sqrt(), (area / aspect).sqrt()
    top = torch.minimum(height - win_h, torch.zeros_like(win_h)) + (height - win_h).abs() * draws[:, 2]
    left = torch.minimum(width - win_w, torch.zeros_like(win_w)) + (width - win_w).abs() * draws[:, 3]
    return torch.stack([top, left, win_h, win_w], dim=1).float()


def zoom_windows(batch: int, height: int, width: int, gen: torch.Generator, zoom=(1.0, 1.0),
                 shift: float = 0.0) -> torch.Tensor:
    """(B, 4) windows [top, left, height, width] in whole input pixels: a zoom factor per image drawn
    uniformly in `zoom` (2 shows half the image's side, enlarged; 0.5 shrinks the image onto a zero
    border twice its size; the aspect is kept), the window placed uniformly where it fits (or, zoomed
    out, where it covers the image), then moved by up to `shift` pixels each way (a translation)."""
    draws = torch.rand(batch, 5, generator=gen, device=gen.device).double()
    factor = zoom[0] + (zoom[1] - zoom[0]) * draws[:, 0]
    win_h, win_w = (height / factor).round().clamp(min=1), (width / factor).round().clamp(min=1)
    top = torch.minimum(height - win_h, torch.zeros_like(win_h)) + (height - win_h).abs() * draws[:, 1]
    left = torch.minimum(width - win_w, torch.zeros_like(win_w)) + (width - win_w).abs() * draws[:, 2]
    top, left = top + shift * (2 * draws[:, 3] - 1), left + shift * (2 * draws[:, 4] - 1)
    return torch.stack([top.round(), left.round(), win_h, win_w], dim=1).float()


def crop_images(x: torch.Tensor, windows: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                fill: float = 0.0) -> torch.Tensor:
    """Resample each image's window (B, 4) [top, left, height, width] to `size` (H', W'); outside the
    image is `fill`. One grid_sample for the batch; the dtype comes back as it went in."""
    batch, _, height, width = x.shape
    windows = windows.to(x.device, torch.float32)
    top, left, win_h, win_w = windows.unbind(1)
    theta = torch.zeros(batch, 2, 3, device=x.device)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges at ±1)
    theta[:, 0, 0] = win_w / width
    theta[:, 0, 2] = (2 * left + win_w) / width - 1
    theta[:, 1, 1] = win_h / height
    theta[:, 1, 2] = (2 * top + win_h) / height - 1
    grid = F.affine_grid(theta, [batch, x.shape[1], *size], align_corners=False)
    source = x.float() - fill
    out = F.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    if x.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def crop_boxes(boxes: torch.Tensor, windows: torch.Tensor, size: tuple[int, int], min_size: float = 2.0,
               min_visible: float = 0.0) -> torch.Tensor:
    """Boxes (M, 6) mapped into their image's window (B, 4) resampled to `size` (H', W'), clipped to
    it; a box is dropped when its shorter clipped side is under `min_size` pixels or its clipped
    area is under `min_visible` of its mapped area. Returns the kept rows, (M', 6)."""
    out_h, out_w = size
    win = windows.to(boxes.device, boxes.dtype)[boxes[:, 5].long()]  # (M, 4) each box's window
    sx, sy = out_w / win[:, 3], out_h / win[:, 2]
    mapped = torch.stack([(boxes[:, 0] - win[:, 1]) * sx, (boxes[:, 1] - win[:, 0]) * sy,
                          (boxes[:, 2] - win[:, 1]) * sx, (boxes[:, 3] - win[:, 0]) * sy], dim=1)
    limits = torch.tensor([out_w, out_h, out_w, out_h], dtype=boxes.dtype, device=boxes.device)
    clipped = torch.minimum(mapped.clamp(min=0), limits)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (mapped[:, 2] - mapped[:, 0]) * (mapped[:, 3] - mapped[:, 1])
    keep = (torch.minimum(w, h) >= min_size) & (w * h >= min_visible * area)
    return torch.cat([clipped, boxes[:, 4:]], dim=1)[keep]


def random_resized_crop(x: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator, scale=(0.3, 1.0),
                        ratio=(3 / 4, 4 / 3), min_size: float = 2.0, min_visible: float = 0.25,
                        size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and translate each image and its boxes (module docstring); output size `size`
    (default: the input's)."""
    size = size or tuple(x.shape[-2:])
    windows = random_windows(x.shape[0], x.shape[-2], x.shape[-1], gen, scale, ratio)
    return crop_images(x, windows, size), crop_boxes(boxes, windows, size, min_size, min_visible)
