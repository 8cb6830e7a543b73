"""Batched augmentation of image/mask pairs on the training device, for segmentation.

Every geometric change is applied to the image and its mask together: random crops, a random zoom
(augment.scale) and an elastic deformation (augment.elastic_sigma: random displacements on a coarse
grid, interpolated bicubically, as in the U-Net paper) are one sampling grid per image, read with
bilinear interpolation from the image and nearest-neighbour from the mask, so class indices are
never blended and the unlabelled value (IGNORE) stays what it is. Flips and 90° rotations are exact
index permutations of both. Without zoom and deformation the crop is an exact integer crop.

Inputs and outputs: images (B, C, H, W) uint8 and masks (B, H, W) uint8; randomness comes from an
explicit torch.Generator, so a resumed run replays the same draws.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cvrecipe.config import AugmentConfig


def _uniform(n: int, gen: torch.Generator, device: torch.device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=gen.device) * (high - low) + low).to(device)


def crop_pairs(x: torch.Tensor, y: torch.Tensor, size: tuple[int, int], gen: torch.Generator):
    """Exact random crops of `size` (h, w) at the same place in image and mask; smaller sides are
    kept whole."""
    b, _, height, width = x.shape
    h, w = min(size[0], height), min(size[1], width)
    top = torch.randint(0, height - h + 1, (b,), generator=gen, device=gen.device).to(x.device)
    left = torch.randint(0, width - w + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + top[:, None])[:, :, None]  # (B, h, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + left[:, None])[:, None, :]  # (B, 1, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    images = x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
    return images, y[batch, rows, cols].contiguous()


def sampling_grid(b: int, height: int, width: int, size: tuple[int, int], scale: tuple[float, float],
                  elastic_sigma: float, elastic_grid: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, h, w, 2) source coordinates in grid_sample's [-1, 1] units (align_corners=True) for output
    crops of `size`: a random zoom s ∈ scale (s > 1 magnifies: the crop covers size / s source
    pixels), a random centre keeping that region inside the image where it fits, and elastic
    displacements (pixels, std elastic_sigma) drawn on an elastic_grid × elastic_grid lattice."""
    h, w = size
    s = _uniform(b, gen, device, *scale)[:, None, None]  # (B, 1, 1)
    half_y, half_x = (h - 1) / 2 / s, (w - 1) / 2 / s  # half extent of the source region, pixels
    u, v = _uniform(b, gen, device)[:, None, None], _uniform(b, gen, device)[:, None, None]
    # the centre ranges over [half, side - 1 - half]; when the region is larger than the image it is centred
    cy = torch.where(2 * half_y <= height - 1, half_y + u * (height - 1 - 2 * half_y),
                     torch.full_like(u, (height - 1) / 2))
    cx = torch.where(2 * half_x <= width - 1, half_x + v * (width - 1 - 2 * half_x),
                     torch.full_like(v, (width - 1) / 2))
    iy = torch.arange(h, device=device, dtype=torch.float32)[None, :, None] - (h - 1) / 2  # (1, h, 1)
    ix = torch.arange(w, device=device, dtype=torch.float32)[None, None, :] - (w - 1) / 2  # (1, 1, w)
    src_y, src_x = (cy + iy / s).expand(b, h, w), (cx + ix / s).expand(b, h, w)  # source pixel coordinates
    if elastic_sigma > 0:
        coarse = torch.randn(b, 2, elastic_grid, elastic_grid, generator=gen, device=gen.device).to(device)
        shift = F.interpolate(coarse * elastic_sigma, size=(h, w), mode="bicubic", align_corners=True)
        src_y, src_x = src_y + shift[:, 0], src_x + shift[:, 1]
    return torch.stack([2 * src_x / max(width - 1, 1) - 1, 2 * src_y / max(height - 1, 1) - 1], dim=-1)


def warp_pairs(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample images bilinearly and masks by nearest neighbour at `grid` (reflected at the borders,
    the same way for both)."""
    image = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    mask = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=True)
    return image.round().clamp(0, 255).to(torch.uint8), mask[:, 0].round().to(torch.uint8)


def flip_pairs(x: torch.Tensor, y: torch.Tensor, dim: int, gen: torch.Generator):
    """Mirror each pair along `dim` (-1: left-right, -2: up-down) with probability 1/2."""
    coin = _uniform(x.shape[0], gen, x.device) < 0.5
    return (torch.where(coin[:, None, None, None], x.flip(dim), x),
            torch.where(coin[:, None, None], y.flip(dim), y))


def rotate_pairs(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Rotate each pair by k·90°, k uniform in 0..3 (0 or 2 only when images are not square)."""
    square = x.shape[-1] == x.shape[-2]
    k = torch.randint(0, 4, (x.shape[0],), generator=gen, device=gen.device).to(x.device)
    if not square:
        k = k - k % 2
    x, y = x.clone(), y.clone()
    for turns in (1, 2, 3):
        pick = k == turns
        if pick.any():
            x[pick] = x[pick].rot90(turns, (-2, -1))
            y[pick] = y[pick].rot90(turns, (-2, -1))
    return x, y


def augment_pairs(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, hflip_ok: bool,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured augmentations, in a fixed order: crop (with zoom and elastic deformation),
    left-right flip, up-down flip, 90° rotation."""
    height, width = x.shape[-2:]
    size = (min(cfg.crop_size, height), min(cfg.crop_size, width)) if cfg.crop_size else (height, width)
    if tuple(cfg.scale) != (1.0, 1.0) or cfg.elastic_sigma > 0:
        grid = sampling_grid(x.shape[0], height, width, size, tuple(cfg.scale), cfg.elastic_sigma, cfg.elastic_grid,
                             gen, x.device)
        x, y = warp_pairs(x, y, grid)
    elif size != (height, width):
        x, y = crop_pairs(x, y, size, gen)
    if cfg.hflip and hflip_ok:
        x, y = flip_pairs(x, y, -1, gen)
    if cfg.vflip:
        x, y = flip_pairs(x, y, -2, gen)
    if cfg.rot90:
        x, y = rotate_pairs(x, y, gen)
    return x, y
