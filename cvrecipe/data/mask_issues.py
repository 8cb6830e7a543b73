"""Likely label errors in segmentation masks: images ranked by how much their given mask disagrees
with an out-of-sample prediction.

    features   every image through the ImageNet-pretrained EfficientNet-Lite0 (offline) at SIZE px;
               its stride-8 and stride-16 feature maps (40 + 112 channels) and the image's own
               colour, resized to a GRID × GRID probe grid: (N, GRID², 155) per-pixel features
    probe      a K-fold per-pixel logistic-regression probe (label_issues.py: the K probes fitted
               jointly), folds by image: every pixel is predicted by a probe that never saw its
               image. Fitted on at most FIT_PIXELS labelled pixels per image, predicted everywhere
    cleanlab   cleanlab.segmentation: each image's label quality score (softmin over its pixels'
               self-confidence: a few confidently contradicted pixels pull it down) ranks the
               images; confident learning (find_label_issues) marks the pixels likely mislabelled,
               and an image is flagged when at least MIN_ISSUE_SHARE of its pixels are, and
               TYPICAL_TIMES the median image's share.

The grid is coarse (GRID = 32: a 512-px mask is judged in 16 × 16-px cells), so thin structures and
one-pixel boundary errors are not what this finds; a shifted, erased, added or relabelled object is.
Memory: the per-pixel features take N × GRID² × 155 × 2 bytes (float16): 0.3 MB per image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cvrecipe.data import label_issues as L
from cvrecipe.data.dataset import IGNORE

SIZE = 128  # px side Lite0 sees: stride-8 maps of 16 × 16 (a 512-px ISBI image embeds in ~25 ms)
GRID = 32  # probe grid side: labels, predictions and cleanlab's scores live at GRID × GRID
FIT_PIXELS = 128  # labelled pixels per image the probe trains on (sampled; all pixels are predicted)
# an image is flagged when cleanlab marks at least MIN_ISSUE_SHARE of its grid's pixels and at least
# TYPICAL_TIMES the median image's share: the probe's own errors set the floor (on the ISBI membranes,
# thin structures on a coarse grid, it marks ~11 % of the median image; on generated 48-px shapes ~1.3 %)
MIN_ISSUE_SHARE = 0.05
TYPICAL_TIMES = 2.0
BATCH = 32  # images per Lite0 forward pass


def feature_extractor() -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, C, H, W) uint8 → (B, GRID², 155) float per-pixel features: Lite0's stride-8 and -16 maps
    (ImageNet weights) and the colour, each resized to GRID × GRID."""
    from cvrecipe.models.detectors import Lite0Features

    body = Lite0Features(pretrained=True).eval()

    @torch.inference_mode()
    def features(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(127.5).sub(1)  # Lite0's [-1, 1] input
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        maps = body(F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False))
        parts = [maps["0"], maps["1"], x]  # strides 8 and 16, and the pixels
        grid = [F.interpolate(p, size=(GRID, GRID), mode="bilinear", align_corners=False) for p in parts]
        return torch.cat(grid, 1).flatten(2).transpose(1, 2)  # (B, GRID², 155)

    return features


def grid_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 masks → (N, GRID, GRID): the pixel at each grid cell's centre, where the bilinear
    features are sampled too (IGNORE stays IGNORE)."""
    t = torch.from_numpy(np.ascontiguousarray(masks))[:, None].float()
    return F.interpolate(t, size=(GRID, GRID), mode="nearest-exact")[:, 0].numpy().astype(np.uint8)


def oof_mask_probabilities(feats: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = L.FOLDS,
                           seed: int = 0, tick: Callable[[], None] | None = None) -> np.ndarray:
    """(N, K, GRID, GRID) out-of-fold probabilities from per-pixel features (N, GRID², D) and grid
    labels (N, GRID, GRID); folds are drawn by image."""
    n, pixels, d = feats.shape
    rng = np.random.default_rng(seed)
    image_fold = rng.permutation(n) % folds
    flat_labels = labels.reshape(n, pixels)
    fit_rows = []
    for i in range(n):  # a sample of each image's labelled pixels trains the probes
        labelled = np.flatnonzero(flat_labels[i] != IGNORE)
        fit_rows.append(i * pixels + rng.choice(labelled, min(FIT_PIXELS, len(labelled)), replace=False))
    fit_rows = np.concatenate(fit_rows)
    fit = feats.reshape(n * pixels, d)[fit_rows].astype(np.float32)
    # each feature to zero mean and unit variance: the 3 colour channels would otherwise be dwarfed by
    # Lite0's 152 and their weights held down by the L2 penalty
    mean, scale = fit.mean(0), np.maximum(fit.std(0), 1e-6)
    w, b = L.fit_fold_probes((fit - mean) / scale, flat_labels.reshape(-1)[fit_rows].astype(np.int64),
                             image_fold[fit_rows // pixels], folds, num_classes, tick=tick)
    probs = np.empty((n, pixels, num_classes), np.float64)
    for i in range(n):  # each image's pixels through its own fold's probe
        x = ((feats[i].astype(np.float32) - mean) / scale).astype(np.float32)
        probs[i] = L.held_out_probabilities(x, np.full(pixels, image_fold[i]), w, b, num_classes)
    return probs.transpose(0, 2, 1).reshape(n, num_classes, GRID, GRID)


def mask_issues(labels: np.ndarray, probs: np.ndarray) -> dict:
    """cleanlab.segmentation over grid labels (N, GRID, GRID) and out-of-sample probabilities
    (N, K, GRID, GRID): {"rank": images, most likely mislabelled first; "quality": (N,) softmin
    label quality in [0, 1]; "issue_share": (N,) share of pixels confident learning marks;
    "disagreement": (N,) share of labelled pixels whose given class is not the predicted one;
    "flagged": (N,) bool; "flag_share": the marked share from which an image is flagged;
    "predicted": (N, GRID, GRID) uint8 argmax}."""
    from cleanlab.segmentation.filter import find_label_issues
    from cleanlab.segmentation.rank import get_label_quality_scores

    predicted = probs.argmax(1).astype(np.uint8)
    unlabelled = labels == IGNORE
    given = np.where(unlabelled, predicted, labels).astype(np.int64)  # cleanlab has no ignore value: agree there
    quality, _ = get_label_quality_scores(given, probs, method="softmin", verbose=False)
    issues = find_label_issues(given, probs, downsample=1, n_jobs=1, verbose=False)  # (N, GRID, GRID) bool
    share = issues.reshape(len(labels), -1).mean(1)
    labelled = np.maximum((~unlabelled).reshape(len(labels), -1).sum(1), 1)
    disagreement = ((predicted != labels) & ~unlabelled).reshape(len(labels), -1).sum(1) / labelled
    flag_share = max(MIN_ISSUE_SHARE, TYPICAL_TIMES * float(np.median(share)))
    return {"rank": np.argsort(quality, kind="stable"), "quality": quality, "issue_share": share,
            "disagreement": disagreement, "flagged": share >= flag_share, "flag_share": flag_share,
            "predicted": predicted}


def probe_parts(parts: list[tuple[str, np.ndarray, np.ndarray]], num_classes: int,
                advance: Callable[[int], None] | None = None, tick: Callable[[], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Features and the K-fold probe over the (split, images (N, C, H, W), masks (N, H, W)) parts,
    splits concatenated in order (the audit's global image numbers): (grid labels (N, GRID, GRID),
    out-of-sample probabilities (N, K, GRID, GRID)). `advance(n)` after each embedded batch, `tick()`
    per probe iteration."""
    from cvrecipe.data.embed import batches

    features = feature_extractor()
    feats = []
    for _, x, _ in parts:
        for b in batches(x, BATCH):
            feats.append(features(b).to(torch.float16).numpy())
            if advance is not None:
                advance(len(b))
    labels = np.concatenate([grid_masks(y) for _, _, y in parts])
    return labels, oof_mask_probabilities(np.concatenate(feats), labels, num_classes, tick=tick)
