"""Batched augmentation on the training device: whole-batch tensor ops, no per-image Python.

All functions take and return (B, C, H, W) tensors of any dtype (uint8 in the training loop)
and draw randomness from an explicit torch.Generator, so a resumed run replays the same draws.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cvrecipe.config import AugmentConfig


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def alternating_flip(x: torch.Tensor, base_flip: torch.Tensor, epoch: int) -> torch.Tensor:
    """Flip image i in even epochs iff base_flip[i], in odd epochs iff not: every image is seen
    both ways within any two consecutive epochs (less redundant than independent coin flips).
    `base_flip` (B,) bool is drawn once per run for the images in this batch."""
    flip = base_flip ^ bool(epoch % 2)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def crop_at(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Pad by `padding` then take the H×W window at offsets (dy, dx) ∈ [0, 2·padding] per image."""
    b, c, h, w = x.shape
    mode = "reflect" if pad_mode == "reflect" else "constant"
    # reflect padding is not implemented for uint8; pad in float and cast back (exact for uint8)
    padded = F.pad(x.float() if mode == "reflect" else x, (padding,) * 4, mode=mode).to(x.dtype)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indexing gives (B, H, W, C); move channels back
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, pad_mode: str = "reflect") -> torch.Tensor:
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(x.device)
    return crop_at(x, padding, dy, dx, pad_mode)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one size×size square per image, centred anywhere (it may be clipped by the border)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (b,), generator=gen, device=gen.device).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])  # (B, H)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])  # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask, 0)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, hflip_ok: bool, gen: torch.Generator,
                  base_flip: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
    """Apply the configured augmentations in a fixed order: crop, flip, cutout.

    `base_flip` (B,) bool: the per-run coins of these images, needed when cfg.flip_mode is "alternate".
    """
    if cfg.crop_padding > 0:
        x = random_crop(x, cfg.crop_padding, gen, cfg.pad_mode)
    if cfg.hflip and hflip_ok:
        if cfg.flip_mode == "alternate":
            if base_flip is None:  # outside the training loop (previews, sanity checks): fresh coins
                base_flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
            x = alternating_flip(x, base_flip, epoch)
        elif cfg.flip_mode == "random":
            x = random_flip(x, gen)
        else:
            raise ValueError(f"augment.flip_mode must be random or alternate, got '{cfg.flip_mode}'")
    if cfg.cutout > 0:
        x = cutout(x, cfg.cutout, gen)
    return x
