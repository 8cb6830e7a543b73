"""Near duplicates by embedding, confirmed on the pixels.

Three steps, each cheap enough for tens of thousands of images on two CPU cores:

1. Candidates: every image's K nearest neighbours by cosine similarity of its embedding, exact, by
   blocked matrix products (after a PCA to at most PCA_DIMS dimensions, which keeps the search at
   seconds for 60,000 images; candidates are then re-scored in the full space). Images of the
   smaller splits are also searched with their mirrored embedding, so mirrored copies across
   splits are candidates too.
2. A pixel check for every candidate pair: the normalised cross-correlation of 32×32 grayscale
   thumbnails, maximised over the mirror and shifts of up to ±SHIFT px. Correlation discards
   brightness and contrast, the shifts absorb small crops and translations.
3. A calibrated decision: a pair's score is its pixel correlation less REL_WEIGHT × its
   embedding distance relative to its images' distance to their K-th neighbour (a copy is far
   closer than the neighbourhood). The threshold is not a fixed number but a quantile of the
   dataset's own "hard negatives" — each image and its K-th neighbour, a similar-looking but
   (nearly always) different photograph: a duplicate scores more than NULL_QUANTILE of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

K = 10  # neighbours searched per image (and the "neighbourhood" scale: the K-th one's distance)
PCA_DIMS = 256  # search dimensions; candidates are re-scored with the full embedding
BLOCK = 2048  # query rows per matrix product: (2048, N) float32 similarities at a time...
BLOCK_NUMBERS = 1 << 26  # ...or fewer rows, so that one block holds at most 64 Mi similarities (256 MiB)
THUMB = 32  # px side of the grayscale thumbnails the pixel check compares
SHIFT = 2  # px: the pixel check tries every translation up to this far, both ways
NULL_QUANTILE = 0.999  # share of hard negatives whose score a duplicate must exceed
REL_WEIGHT = 0.3  # score = pixel correlation - REL_WEIGHT x relative embedding distance
MIN_SCORE = 0.5  # floor of the calibrated threshold (few images: a quantile of few pairs)


@dataclass
class Candidates:
    """Candidate pairs i < j (global image numbers) with their best embedding similarity."""
    i: np.ndarray  # (P,) int64
    j: np.ndarray  # (P,) int64
    sim: np.ndarray  # (P,) float32 cosine similarity (max over the mirror where searched)
    kth: np.ndarray  # (N,) float32 every image's similarity to its K-th neighbour


def project(emb: np.ndarray, dims: int = PCA_DIMS) -> torch.Tensor:
    """(N, D) unit vectors → (N, ≤ dims) unit vectors in the top principal subspace (directions
    the images actually span: at most N - 1 of them)."""
    x = torch.from_numpy(emb)
    if x.shape[1] <= dims:
        return x
    centred = x - x.mean(0)
    cov = centred.T @ centred / max(len(x) - 1, 1)  # (D, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded eigh of 1280² takes 25-35 s on 2 busy cores, 1 s on one thread
    try:
        vals, vecs = torch.linalg.eigh(cov)  # ascending
    finally:
        torch.set_num_threads(threads)
    top = vecs[:, -dims:][:, vals[-dims:] > 1e-4 * vals[-1]]  # fewer images than dims: only the spanned ones
    return F.normalize(x @ top, dim=1)


def knn(queries: torch.Tensor, base: torch.Tensor, k: int, self_offset: int | None = None,
        advance: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of every query row among `base` rows: (Q, k) similarities and
    indices. `self_offset`: query row q is base row q + self_offset, excluded from its own list."""
    k = min(k, len(base) - (self_offset is not None))
    sims, idx = [], []
    rows = max(16, min(BLOCK, BLOCK_NUMBERS // max(len(base), 1)))  # (rows, N) stays ≤ 256 MiB however large N
    for start in range(0, len(queries), rows):
        s = queries[start:start + rows] @ base.T  # (B, N)
        if self_offset is not None:
            r = torch.arange(len(s))
            s[r, r + start + self_offset] = -2.0
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
        if advance is not None:
            advance(len(s))
    return torch.cat(sims), torch.cat(idx)


def candidates(emb: np.ndarray, mirrored: dict[int, np.ndarray] | None = None, k: int = K,
               advance: Callable[[int], None] | None = None) -> Candidates:
    """Each image's k nearest neighbours (and, for the rows in `mirrored` {global row: mirrored
    embedding}, the mirrored image's k nearest), as unique pairs i < j re-scored in full dimensions."""
    base = project(emb)
    sims, idx = knn(base, base, k, self_offset=0, advance=advance)
    kth = sims[:, -1].numpy()
    rows = [np.repeat(np.arange(len(emb)), idx.shape[1])]
    cols = [idx.flatten().numpy()]
    full = torch.from_numpy(emb)
    mirror_sim: dict[tuple[int, int], float] = {}
    if mirrored:
        which = np.fromiter(mirrored, np.int64)
        m = np.stack([mirrored[g] for g in which.tolist()])
        mbase = project(np.concatenate([emb, m]))  # one projection for both, so they compare
        _, midx = knn(mbase[len(emb):], mbase[:len(emb)], k, advance=advance)
        mi, mj = np.repeat(which, midx.shape[1]), midx.flatten().numpy()
        keep = mi != mj  # a symmetric image is its own mirror
        ms = (torch.from_numpy(m)[np.repeat(np.arange(len(which)), midx.shape[1])[keep]]
              * full[mj[keep]]).sum(1).numpy()
        for a, b, s in zip(mi[keep].tolist(), mj[keep].tolist(), ms.tolist()):
            key = (min(a, b), max(a, b))
            mirror_sim[key] = max(mirror_sim.get(key, -1.0), s)
        rows.append(mi[keep])
        cols.append(mj[keep])
    i, j = np.concatenate(rows), np.concatenate(cols)
    pairs = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], 1), axis=0)
    sim = (full[pairs[:, 0]] * full[pairs[:, 1]]).sum(1).numpy()
    if mirror_sim:
        extra = np.array([mirror_sim.get((a, b), -1.0) for a, b in pairs.tolist()], np.float32)
        sim = np.maximum(sim, extra)
    return Candidates(pairs[:, 0], pairs[:, 1], sim.astype(np.float32), kth)


def thumbnails(x, side: int = THUMB, batch: int = 4096) -> torch.Tensor:
    """(N, side, side) float32 grayscale thumbnails (area-averaged), from uint8 (N, C, H, W) read a
    batch at a time (x may be a ShardedArray on disk)."""
    out = []
    for start in range(0, len(x), batch):
        b = torch.as_tensor(np.asarray(x[start:start + batch])).float()
        gray = (0.299 * b[:, 0] + 0.587 * b[:, 1] + 0.114 * b[:, 2]) if b.shape[1] == 3 else b.mean(1)
        if gray.shape[-2:] != (side, side):
            gray = F.interpolate(gray[:, None], size=(side, side), mode="area")[:, 0]
        out.append(gray)
    return torch.cat(out) if out else torch.zeros(0, side, side)


def pixel_correlation(thumbs: torch.Tensor, i: np.ndarray, j: np.ndarray, shift: int = SHIFT,
                      chunk: int = 4096) -> np.ndarray:
    """(P,) the largest normalised cross-correlation between image i's centre crop (side - 2·shift)²
    and image j's same-size windows at every shift up to ±`shift` px, j plain or mirrored.

    One grouped convolution per chunk gives every window's dot product with the (zero-mean,
    unit-norm) centre; box sums of the window pixels and their squares give each window's norm
    about its mean: no copy of the windows is made."""
    side = thumbs.shape[-1]
    inner = side - 2 * shift
    n = inner * inner
    out = []
    for start in range(0, len(i), chunk):
        a = thumbs[torch.as_tensor(i[start:start + chunk])]
        b = thumbs[torch.as_tensor(j[start:start + chunk])]
        centre = a[:, shift:shift + inner, shift:shift + inner]
        centre = centre - centre.mean((1, 2), keepdim=True)
        centre = centre / centre.flatten(1).norm(dim=1).clamp_min(1e-3)[:, None, None]  # (B, inner, inner)
        best = torch.full((len(a),), -1.0)
        for view in (b, b.flip(-1)):
            dots = F.conv2d(view[None], centre[:, None], groups=len(a))[0]  # (B, 2·shift+1, 2·shift+1)
            sums = F.avg_pool2d(view[:, None], inner, stride=1)[:, 0] * n
            squares = F.avg_pool2d(view[:, None].square(), inner, stride=1)[:, 0] * n
            norms = (squares - sums.square() / n).clamp_min(0).sqrt().clamp_min(1e-3)
            best = torch.maximum(best, (dots / norms).flatten(1).amax(1))
        out.append(best)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def score(ncc: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Duplicate score of a pair: pixel correlation, less REL_WEIGHT × its relative embedding
    distance (measured on CIFAR-10, Lite0 at 64 px: the 600 test images scoring highest cover 230
    of ciFAIR's 286; weights 0.1 / 0.2 / 0.4 cover 223 / 227 / 232)."""
    return ncc - REL_WEIGHT * rel


def calibrate(thumbs: torch.Tensor, emb: np.ndarray, c: Candidates, sample: int = 20000,
              seed: int = 0) -> dict:
    """The score threshold from the dataset's hard negatives: (image, its K-th neighbour) pairs."""
    base = project(emb)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(emb), min(sample, len(emb)), replace=False)
    _, idx = knn(base[rows], base, K + 1)
    kth = idx[:, -1].numpy()  # the K-th neighbour besides the image itself
    keep = kth != rows
    a, b = rows[keep], kth[keep]
    null_ncc = pixel_correlation(thumbs, a, b)
    sim = (torch.from_numpy(emb[a]) * torch.from_numpy(emb[b])).sum(1).numpy()
    null = score(null_ncc, relative_distance(Candidates(a, b, sim, c.kth)))
    threshold = max(MIN_SCORE, float(np.quantile(null, NULL_QUANTILE))) if len(null) else MIN_SCORE
    return {"score_threshold": round(threshold, 4), "rel_weight": REL_WEIGHT, "null_pairs": int(keep.sum()),
            "null_quantile": NULL_QUANTILE, "min_score": MIN_SCORE, "k": K}


def relative_distance(c: Candidates) -> np.ndarray:
    """(P,) each pair's embedding distance (1 - cos) over its images' K-th-neighbour distance (the
    larger of the two neighbourhoods, so a copy in a dense region is not penalised)."""
    scale = np.maximum(1 - c.kth[c.i], 1 - c.kth[c.j])
    return (1 - c.sim) / np.maximum(scale, 1e-6)


def decide(c: Candidates, ncc: np.ndarray, rules: dict) -> np.ndarray:
    """(P,) bool: which candidate pairs are duplicates under the calibrated `rules`."""
    return score(ncc, relative_distance(c)) >= rules["score_threshold"]


def find_near_duplicates(emb: np.ndarray, thumbs: torch.Tensor, mirrored: dict[int, np.ndarray] | None = None,
                         advance: Callable[[int], None] | None = None) -> dict:
    """Candidates, pixel check and calibrated decision for images numbered 0..N-1.
    Returns {"pairs": (P, 2) duplicates i < j, "sim", "ncc", "rel": per pair, "rules": thresholds,
    "candidates": how many pairs were checked}."""
    c = candidates(emb, mirrored, advance=advance)
    ncc = pixel_correlation(thumbs, c.i, c.j)
    rules = calibrate(thumbs, emb, c)
    keep = decide(c, ncc, rules)
    return {"pairs": np.stack([c.i[keep], c.j[keep]], 1), "sim": c.sim[keep], "ncc": ncc[keep],
            "rel": relative_distance(c)[keep], "rules": rules, "candidates": int(len(c.i))}
