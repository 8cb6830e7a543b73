"""Data audit: what is in a dataset before anything trains on it.

Class balance, original image sizes and colour modes (read from file headers, without decoding),
per-channel pixel statistics, unreadable files, exact duplicates (identical decoded pixels) and
near duplicates (standardised grayscale thumbnails compared in two stages), within a split and
across splits (train/test leakage). Everything works on the decoded uint8 arrays in batches, so
the 60,000-image CIFAR-10 archive is audited in well under a minute on two cores.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cvrecipe.data.dataset import IGNORE, ImageDataset, pixel_mean_std
from cvrecipe.data.images import FORMATS

SPLITS = ("train", "val", "test")
# Near duplicates, in two stages (thresholds measured on planted copies of 300-500 images each):
# coarse: 8×8 standardised grayscale thumbnails (an average hash before thresholding) correlate
#   ≥ 0.98; copies re-encoded as JPEG q50-60, rescaled and brightened keep ≥ 0.989 (1st pct).
# fine: the same at up to 32×32 differ by ≤ 0.2 RMS; 95% of JPEG q60 + brightened copies pass
#   (CIFAR-10 and Fashion-MNIST), 84% / 49% of harsher 2×-rescaled q50 copies. Every CIFAR-10 pair
#   found this way is the same photograph; on Fashion-MNIST distinct items of one product type
#   can pass too (the page shows thumbnails to judge by).
# A 64-bit difference hash was tried first and dropped: on dark-background images (Fashion-MNIST)
# copies moved by up to 17 bits while distinct items matched within 6.
COARSE, COARSE_MIN_CORR = 8, 0.98
FINE, FINE_MAX_RMS = 32, 0.2
PAIR_BLOCK = 1024  # rows per block of the all-pairs Hamming search: (1024, N) float32 at a time
MAX_LISTED = 1000  # pairs / groups written into audit.json per kind (counts are always complete)


def split_parts(ds: ImageDataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(s, getattr(ds, s).x, getattr(ds, s).y) for s in SPLITS if getattr(ds, s) is not None]


def class_balance(ds: ImageDataset) -> dict:
    """Per split: images, count per class, and the imbalance ratio (largest / smallest class). For
    masks the counts are pixels (unlabelled pixels counted apart), the unit a segmentation loss sees."""
    out = {}
    for split, _, y in split_parts(ds):
        if y.ndim == 3:
            all_counts = np.bincount(y.ravel(), minlength=256)
            counts, unlabelled = all_counts[:len(ds.classes)], int(all_counts[IGNORE])
        else:
            counts, unlabelled = np.bincount(y, minlength=len(ds.classes)), None
        present = counts[counts > 0]
        out[split] = {"images": int(len(y)), "class_counts": dict(zip(ds.classes, counts.tolist())),
                      "imbalance_ratio": float(present.max() / present.min()) if len(present) else None,
                      "missing_classes": [c for c, n in zip(ds.classes, counts) if n == 0],
                      **({"unit": "pixels", "unlabelled_pixels": unlabelled} if y.ndim == 3 else {})}
    return out


def channel_stats(x: np.ndarray, chunk: int | None = None) -> dict:
    """Per-channel mean and (population) std of (N, C, H, W) uint8 pixels, in [0, 1] units."""
    mean, std = pixel_mean_std(x, chunk, ddof=0)
    return {"mean": mean.round(4).tolist(), "std": std.round(4).tolist()}


def file_header(data: bytes) -> tuple[str, str, str] | None:
    """(WxH, mode, format) from an image file's header, without decoding its pixels; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:  # the formats the decoder takes
                return f"{img.width}x{img.height}", img.mode, img.format or "?"
    except Exception:  # noqa: BLE001 - unreadable files are listed from the decoder's own report
        return None


def folder_files(path: Path, ds: ImageDataset) -> tuple[dict[str, list[str]] | None, dict]:
    """File names aligned with the decoded arrays, and header statistics, for folder:PATH data.

    Re-lists the folder/archive in the order the decoder used (split, class, file), drops the
    files it skipped, and checks the labels line up with the cached arrays; names are None if not.
    """
    from cvrecipe.data.folder import _group

    groups = _group(path)
    skipped = {name for name, _ in ds.skipped}
    names: dict[str, list[str]] | None = {}
    sizes, modes, formats = Counter(), Counter(), Counter()
    for split, _, y in split_parts(ds):
        kept, labels = [], []
        for label, cls in enumerate(ds.classes):
            for rel, data in groups.get(split, {}).get(cls, []):
                header = file_header(data)
                if header is not None:
                    sizes[header[0]] += 1
                    modes[header[1]] += 1
                    formats[header[2]] += 1
                if rel not in skipped:
                    kept.append(rel)
                    labels.append(label)
        if names is not None and labels == y.tolist():
            names[split] = kept
        else:
            names = None  # the folder changed since it was cached: report without names
    headers = {"sizes": dict(sizes.most_common()), "modes": dict(modes.most_common()),
               "formats": dict(formats.most_common())}
    return names, headers


def content_hashes(x: np.ndarray) -> list[bytes]:
    """One 128-bit digest per image of its decoded pixels: equal digests = identical images."""
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in x]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 → (N, 1, H, W) float luminance (ITU-R 601 weights for RGB)."""
    x = x.float()
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(1, keepdim=True)


def fingerprints(x: np.ndarray, side: int, chunk: int = 8192) -> torch.Tensor:
    """(N, side²) grayscale thumbnails (area-averaged to side×side), standardised per image to zero
    mean and unit RMS, so brightness and contrast changes drop out."""
    out = []
    for start in range(0, len(x), chunk):
        small = F.adaptive_avg_pool2d(_gray(torch.from_numpy(x[start:start + chunk])), side).flatten(1)
        small = small - small.mean(1, keepdim=True)
        out.append(small / small.square().mean(1, keepdim=True).sqrt().clamp_min(1.0))  # flat images stay ~0
    return torch.cat(out) if out else torch.zeros(0, side * side)


def near_duplicate_pairs(coarse: torch.Tensor, fine: torch.Tensor, min_corr: float = COARSE_MIN_CORR,
                         max_rms: float = FINE_MAX_RMS) -> np.ndarray:
    """(P, 2) index pairs i < j whose coarse fingerprints correlate ≥ min_corr (all pairs, one matrix
    product per block) and whose fine fingerprints differ by at most max_rms (RMS, in contrast units)."""
    n, dims = coarse.shape
    found = []
    for start in range(0, n, PAIR_BLOCK):
        corr = coarse[start:start + PAIR_BLOCK] @ coarse[start:].T / dims  # (B, N - start)
        rows, cols = torch.nonzero(corr >= min_corr, as_tuple=True)
        keep = cols > rows  # upper triangle only: j > i
        i, j = rows[keep] + start, cols[keep] + start
        for k in range(0, len(i), 1 << 16):  # bounded memory when a dataset has many look-alikes
            a, b = i[k:k + (1 << 16)], j[k:k + (1 << 16)]
            ok = (fine[a] - fine[b]).square().mean(1).sqrt() <= max_rms
            found.append(torch.stack([a[ok], b[ok]], 1))
    return torch.cat(found).numpy() if found else np.zeros((0, 2), np.int64)


class Index:
    """Maps global image numbers (splits concatenated in order) to (split, index, label, file)."""

    def __init__(self, ds: ImageDataset | None, names: dict[str, list[str]] | None,
                 parts: list[tuple[str, np.ndarray, np.ndarray]] | None = None, classes: list[str] | None = None):
        self.parts = split_parts(ds) if ds is not None else parts  # or given: (split, x, y) of several datasets
        self.offsets = np.cumsum([0] + [len(y) for _, _, y in self.parts])
        self.classes = ds.classes if ds is not None else classes
        self.names = names

    def locate(self, g: int) -> tuple[str, int]:
        k = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.parts[k][0], int(g - self.offsets[k])

    def describe(self, g: int) -> dict:
        split, i = self.locate(g)
        y = self.parts[[p[0] for p in self.parts].index(split)][2]
        file = self.names[split][i] if self.names and split in self.names else None
        label = self.classes[int(y[i])] if y.ndim == 1 else "(mask)"  # a segmentation image has no one label
        return {"split": split, "index": i, "label": label, "file": file}

    def number(self, split: str, i: int) -> int:
        """The global number of image `i` of `split` (the inverse of `locate`)."""
        return int(self.offsets[[p[0] for p in self.parts].index(split)] + i)

    def image(self, g: int) -> np.ndarray:
        split, i = self.locate(g)
        return self.parts[[p[0] for p in self.parts].index(split)][1][i]


def exact_duplicate_pairs(hashes: list[bytes], index: Index) -> tuple[np.ndarray, int]:
    """Pairs that link every member of a group of identical images to the group's first member in
    each split (enough to count duplicates and leakage without listing k² pairs), and the group count."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for g, h in enumerate(hashes):
        groups[h].append(g)
    pairs, n_groups = set(), 0
    for members in groups.values():
        if len(members) < 2:
            continue
        n_groups += 1
        firsts = {}
        for g in members:  # members are in global order, so firsts come from the earliest split
            firsts.setdefault(index.locate(g)[0], g)
        for g in members:
            pairs.update((first, g) for first in firsts.values() if first < g)
    return np.array(sorted(pairs), np.int64).reshape(-1, 2), n_groups


def summarize_pairs(pairs: np.ndarray, index: Index, fine: torch.Tensor | None = None) -> dict:
    """Counts per split and per split pair, label conflicts, and the pairs themselves (leakage
    first, then conflicting labels, then the rest; at most MAX_LISTED)."""
    within, across, listed = defaultdict(set), defaultdict(set), []
    counts = Counter()
    for i, j in pairs.tolist():
        a, b = index.describe(i), index.describe(j)
        if a["split"] == b["split"]:
            within[a["split"]].update((i, j))
            counts[a["split"]] += 1
        else:  # i < j, so a is the earlier split: count the later split's images that leak
            across[f"{a['split']}-{b['split']}"].add(j)
            counts[f"{a['split']}-{b['split']}"] += 1
        entry = {"a": a, "b": b}
        if fine is not None:
            entry["rms"] = round(float((fine[i] - fine[j]).square().mean().sqrt()), 3)
        listed.append(entry)
    listed.sort(key=lambda e: (e["a"]["split"] == e["b"]["split"], e["a"]["label"] == e["b"]["label"],
                               e.get("rms", 0.0)))
    return {
        "pairs": int(len(pairs)),
        "within": {s: {"images": len(v), "pairs": counts[s]} for s, v in within.items()},
        "across": {k: {"images": len(v), "pairs": counts[k]} for k, v in across.items()},
        "label_conflicts": sum(e["a"]["label"] != e["b"]["label"] for e in listed),
        "examples": listed[:MAX_LISTED],
    }


def find_duplicates(ds: ImageDataset, names: dict[str, list[str]] | None) -> dict:
    """Exact and near duplicates over all splits together (so across-split leakage shows too)."""
    index = Index(ds, names)
    hashes = [h for _, x, _ in index.parts for h in content_hashes(x)]
    exact, n_groups = exact_duplicate_pairs(hashes, index)
    coarse = torch.cat([fingerprints(x, COARSE) for _, x, _ in index.parts])
    fine = torch.cat([fingerprints(x, min(FINE, x.shape[-1])) for _, x, _ in index.parts])
    near = near_duplicate_pairs(coarse, fine)
    same = np.array([hashes[i] == hashes[j] for i, j in near.tolist()], bool)
    near = near[~same] if len(near) else near  # identical images are already exact duplicates
    return {"index": index,
            "exact": {**summarize_pairs(exact, index), "groups": n_groups},
            "near": {**summarize_pairs(near, index, fine), "min_corr": COARSE_MIN_CORR, "max_rms": FINE_MAX_RMS}}
