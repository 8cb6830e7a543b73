"""Variable-length boxes per image, stored flat: one (M, 6) array plus (N + 1,) offsets.

Image i's boxes are rows offsets[i]:offsets[i + 1] of `flat`, each row
[x1, y1, x2, y2, class, image] (float32; pixels in the cached image's frame; class and image index
are small integers, exact in float32 below 2**24). The image column lets a batch's boxes travel as
one (M, 6) tensor on the device (the form box-aware augmentation and YOLO-style losses use) and be
split back per image. Two plain arrays go into the uint8 image cache beside the images
(`boxes_to_cache`), so loading a detection set is as fast as loading a classification one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cvrecipe.data.box_targets import take  # noqa: F401  (a batch's boxes; lives beside the targets type)
from cvrecipe.data.boxes import BoxImage
from cvrecipe.data.cache import load_arrays, save_arrays
from cvrecipe.data.images import decode_images

COLUMNS = 6  # x1, y1, x2, y2, class, image


def flatten(boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (n_i, 4) boxes and (n_i,) labels → (M, 6) float32 rows and (N + 1,) int64 offsets."""
    counts = np.asarray([len(b) for b in boxes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = np.zeros((int(offsets[-1]), COLUMNS), np.float32)
    if len(flat):
        flat[:, :4] = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes])
        flat[:, 4] = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
        flat[:, 5] = np.repeat(np.arange(len(boxes)), counts)
    return flat, offsets


def unflatten(flat: np.ndarray, offsets: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inverse of `flatten`: per-image (n_i, 4) float32 boxes and (n_i,) int64 labels."""
    parts = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return [p[:, :4].copy() for p in parts], [p[:, 4].astype(np.int64) for p in parts]


def collate(flat: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch's (m, 6) box tensor → per-image lists of (n_i, 4) float boxes and (n_i,) int64 labels
    (what torchvision's detectors take as targets). No host sync beyond one bincount."""
    image = flat[:, 5].long()
    counts = torch.bincount(image, minlength=batch_size).tolist()
    order = torch.argsort(image, stable=True)
    parts = flat[order].split(counts)
    return [p[:, :4] for p in parts], [p[:, 4].long() for p in parts]


def to_targets(flat: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """torchvision detection targets: [{"boxes": (n, 4), "labels": (n,)}] per image."""
    boxes, labels = collate(flat, batch_size)
    return [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


# ---- the uint8 image cache ----------------------------------------------------------------------

def scale_boxes(items: list[BoxImage], size: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes rescaled from each image's own size to the cached (H, W) = `size` frame."""
    height, width = size
    scaled = [item.boxes * np.asarray([width / item.width, height / item.height] * 2, np.float32) for item in items]
    return scaled, [item.labels for item in items]


def boxes_to_cache(entry: Path, read, splits: dict[str, list[BoxImage]], classes: list[str],
                   size: tuple[int, int], channels: int = 3) -> dict[str, list[tuple[str, str]]]:
    """Decode every image of `splits` to (channels, H, W) uint8 at `size` and store it with its boxes
    (rescaled to that frame) as `{split}_x`, `{split}_boxes` (M, 6), `{split}_offsets` (N + 1,).
    `read(files) → {file: bytes}` fetches image bytes. Returns {split: [(file, reason)]} of the images
    that did not decode (left out, boxes and all)."""
    arrays, skipped = {}, {}
    for split, items in splits.items():
        data = read([item.file for item in items])
        x, good, bad = decode_images([(item.file, data[item.file]) for item in items], channels, size)
        kept = [items[i] for i in good]
        flat, offsets = flatten(*scale_boxes(kept, size))
        arrays.update({f"{split}_x": x, f"{split}_boxes": flat, f"{split}_offsets": offsets})
        skipped[split] = bad
    save_arrays(entry, arrays, {"classes": classes, "size": list(size), "skipped": skipped})
    return skipped


def boxes_from_cache(entry: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict] | None:
    """{split: (images (N, C, H, W) uint8, flat (M, 6), offsets (N + 1,))} and the entry's meta."""
    loaded = load_arrays(entry)
    if loaded is None:
        return None
    arrays, meta = loaded
    splits = {k[:-2]: (arrays[k], arrays[k[:-2] + "_boxes"], arrays[k[:-2] + "_offsets"])
              for k in arrays if k.endswith("_x")}
    return splits, meta


# ---- on the training device ---------------------------------------------------------------------

class DeviceBoxes:
    """The boxes of N images as tensors (on any device): flat (M, 6) rows [x1, y1, x2, y2, class,
    image] and offsets (N + 1,). Indexed like a batch of targets (an index tensor or a slice gives the
    boxes of those images, their image column re-numbered), so the training feed gathers and slices
    it as it does a label tensor."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_arrays(cls, flat: np.ndarray, offsets: np.ndarray, device: torch.device | str = "cpu") -> "DeviceBoxes":
        return cls(torch.from_numpy(np.asarray(flat, np.float32)).to(device),
                   torch.from_numpy(np.asarray(offsets, np.int64)).to(device))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def __getitem__(self, index) -> "DeviceBoxes":
        if isinstance(index, slice):
            index = torch.arange(len(self), device=self.offsets.device)[index]
        rows = torch.as_tensor(index, device=self.offsets.device).long().reshape(-1)
        counts = self.offsets[rows + 1] - self.offsets[rows]
        image = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts)  # (m,)
        starts = torch.repeat_interleave(self.offsets[rows], counts)
        within = torch.arange(len(image), device=rows.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        flat = self.flat[starts + within].clone()
        flat[:, 5] = image.to(flat.dtype)
        return DeviceBoxes(flat, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))

    def to(self, device, non_blocking: bool = False) -> "DeviceBoxes":
        return DeviceBoxes(self.flat.to(device, non_blocking=non_blocking),
                           self.offsets.to(device, non_blocking=non_blocking))

    def with_rows(self, flat: torch.Tensor) -> "DeviceBoxes":
        """The same images with new box rows (after augmentation moved, clipped or dropped some)."""
        counts = torch.bincount(flat[:, 5].long(), minlength=len(self))
        order = torch.argsort(flat[:, 5], stable=True)
        return DeviceBoxes(flat[order], torch.cat([counts.new_zeros(1), counts.cumsum(0)]))

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """torchvision's detection targets: [{"boxes": (n, 4), "labels": (n,)}] per image."""
        return to_targets(self.flat, len(self))

    def per_image(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return collate(self.flat, len(self))
