"""The data report's sections for image/mask pairs (segmentation): masks over images, and a batch
of pairs as the model sees them after the recipe's paired augmentation."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cvrecipe import pages
from cvrecipe.config import Config
from cvrecipe.data import ImageDataset, load_dataset
from cvrecipe.data.augment_pairs import augment_pairs
from cvrecipe.data.mask_images import class_colours, overlay_mask

SAMPLES = 8  # training images shown with their masks
MODEL_VIEW = 8  # pairs shown as the model sees them
SHOWN_SIDE = 160  # pixels per thumbnail side


def _thumb(image: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 shrunk (nearest, by an integer step) to about SHOWN_SIDE pixels a side."""
    step = max(1, max(image.shape[1:]) // SHOWN_SIDE)
    return image[:, ::step, ::step]


def _pairs_png(images: np.ndarray, masks: np.ndarray, colours: np.ndarray) -> bytes:
    """Rows of (image, mask over image) thumbnails."""
    tiles = []
    for image, mask in zip(images, masks):
        plain = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
        tiles += [_thumb(plain), _thumb(overlay_mask(image, mask, colours))]
    return pages.array_png(pages.tile(np.stack(tiles), 8, gap=3))


def samples(ds: ImageDataset) -> str:
    colours = class_colours(len(ds.classes), ds.colours)
    pick = np.sort(np.random.default_rng(0).choice(len(ds.train), min(SAMPLES, len(ds.train)), replace=False))
    legend = ", ".join(f"{name} rgb{tuple(c)}" for name, c in zip(ds.classes, colours.tolist()))
    png = _pairs_png(ds.train.x[pick], ds.train.y[pick], colours)
    return ("<h2>Masks over images</h2><p class='note'>random training images, each beside its mask drawn over it "
            f"({pages.esc(legend)}; unlabelled pixels keep the image's colour)</p>"
            + pages.img(png, "masks over images", cls="plot"))


def model_view(cfg: Config, name: str, n: int = MODEL_VIEW) -> dict:
    """Training pairs through the recipe's paired augmentation, twice (the two draws differ)."""
    data_cfg = dataclasses.replace(cfg.data, name=name)
    ds = load_dataset(data_cfg, seed=cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    idx = torch.randperm(len(ds.train), generator=gen)[:n].numpy()
    x, y = torch.from_numpy(ds.train.x[idx]), torch.from_numpy(ds.train.y[idx])
    draws = [augment_pairs(x, y, cfg.augment, ds.hflip_ok, gen) for _ in range(2)]
    return {"image_shape": list(ds.image_shape), "augment": dataclasses.asdict(cfg.augment), "classes": ds.classes,
            "colours": ds.colours, "draws": [(a.numpy(), b.numpy()) for a, b in draws]}


def model_view_section(view: dict) -> str:
    colours = class_colours(len(view["classes"]), view["colours"])
    augment = ", ".join(f"{k}={v}" for k, v in view["augment"].items())
    html = ("<h2>What the model sees</h2><p class='note'>training pairs after the recipe's augmentation, applied to "
            f"image and mask together ({pages.esc(augment)}); two draws of the same images</p>")
    for i, (x, y) in enumerate(view["draws"]):
        html += f"<h3>draw {i + 1}: {x.shape[-1]}×{x.shape[-2]} pixels</h3>" + pages.img(
            _pairs_png(x, y, colours), f"augmented pairs, draw {i + 1}", cls="plot")
    return html
