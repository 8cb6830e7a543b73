"""Masks as pictures: colour overlays on images, and masks as palette PNGs (the pixel values are the
class indices, the palette their colours, so any viewer shows colours and any reader gets indices)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cvrecipe.data.dataset import IGNORE
from cvrecipe.data.masks import default_colour


def class_colours(num_classes: int, colours: list[list[int]] | None = None) -> np.ndarray:
    """(K, 3) uint8 RGB per class: the given colours, else defaults."""
    given = list(colours or [])
    return np.array([given[i] if i < len(given) else default_colour(i) for i in range(num_classes)], np.uint8)


def colour_mask(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (3, H, W) uint8 RGB; IGNORE pixels white."""
    table = np.full((256, 3), 255, np.uint8)
    table[:len(colours)] = colours
    return table[mask].transpose(2, 0, 1)


def overlay_mask(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.45,
                 skip: int | None = None) -> np.ndarray:
    """Blend class colours over a uint8 image (C, H, W), C in {1, 3} → (3, H, W) uint8. IGNORE pixels
    and those of class `skip` (e.g. the background) keep the image's own colour."""
    base = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
    paint = colour_mask(mask, colours).astype(np.float32)
    keep = (mask == IGNORE) | (mask == skip if skip is not None else False)
    mixed = (1 - alpha) * base.astype(np.float32) + alpha * paint
    return np.where(keep[None], base, np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


def mask_png(mask: np.ndarray, colours: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) uint8 class-index mask in palette mode: values = class indices."""
    img = Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(colours)] = colours
    palette[IGNORE] = 255
    img.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rgb_png(image: np.ndarray) -> bytes:
    """PNG bytes of a (C, H, W) uint8 image, C in {1, 3}."""
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
