"""Likely label errors: out-of-sample predicted probabilities, then confident learning (cleanlab).

The probabilities come from a K-fold linear probe — multinomial logistic regression — on the
image embeddings: every image is predicted by a probe that never saw it. The K probes are fitted
together as one (D, K·C) weight matrix: one matrix product per step gives every fold's logits for
every image, and each image's loss counts only in the folds that train on it. That is the same
objective as K separate sklearn LogisticRegression fits (tests/data compare the two), at the
price of one fit. cleanlab then finds the images whose given label disagrees with what the
out-of-sample probabilities and the estimated class-conditional noise rates expect.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

FOLDS = 5
C = 1.0  # inverse L2 strength, sklearn's convention: loss = C · Σ cross-entropy + ½‖W‖²
MAX_ITER = 100  # L-BFGS iterations
SMALL = 1 << 20  # features below this many numbers are fitted on one thread: thread hand-offs cost more than
# the arithmetic (a 240×12 fit took 35 s on 2 busy cores with two threads, under 1 s with one)


def fold_ids(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold of each image, stratified: each class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return out


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, and one scale for all features so that their average variance is 1: L-BFGS
    converges in fewer steps, and the weak directions are not blown up to the strong ones' size
    (which, on principal components, would whiten the noise)."""
    x = x - x.mean(0)
    return (x / max(float(np.sqrt(x.var(0).mean())), 1e-12)).astype(np.float32)


def oof_probabilities(x: np.ndarray, labels: np.ndarray, folds: int = FOLDS, c: float = C,
                      max_iter: int = MAX_ITER, seed: int = 0, fold: np.ndarray | None = None,
                      num_classes: int | None = None, tick: Callable[[], None] | None = None) -> np.ndarray:
    """(N, C) out-of-fold softmax probabilities of a logistic-regression probe on features `x`
    (N, D), the folds fitted jointly (see the module docstring). `tick()` is called per iteration."""
    k = num_classes or int(labels.max()) + 1
    fold = fold_ids(labels, folds, seed) if fold is None else fold
    w, b = fit_fold_probes(x, labels, fold, folds, k, c, max_iter, tick)
    return held_out_probabilities(x, fold, w, b, k)


def fit_fold_probes(x: np.ndarray, labels: np.ndarray, fold: np.ndarray, folds: int, k: int, c: float = C,
                    max_iter: int = MAX_ITER, tick: Callable[[], None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K probes fitted jointly on rows `x` (N, D) with `labels` (N,) in folds `fold` (N,): row n
    trains every probe but its fold's. Returns weights (D, folds·k) and biases (folds·k,)."""
    n, d = x.shape
    xt, y, f = torch.from_numpy(x), torch.from_numpy(labels).long(), torch.from_numpy(fold)
    w = torch.zeros(d, folds * k, requires_grad=True)
    b = torch.zeros(folds * k, requires_grad=True)
    trains = (f[:, None] != torch.arange(folds)[None, :]).float()  # (N, folds): 1 where fold trains on the row
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (xt @ w + b).view(n, folds, k)
        ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(n, folds), reduction="none")  # (N, folds)
        loss = c * (ce * trains).sum() + 0.5 * w.square().sum()
        loss.backward()
        if tick is not None:
            tick()
        return loss

    threads = torch.get_num_threads()
    if x.size < SMALL:
        torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), b.detach()


@torch.no_grad()
def held_out_probabilities(x: np.ndarray, fold: np.ndarray, w: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    """(N, k) softmax probabilities of each row `x` (N, D) from the probe of its own fold (`fold`,
    (N,)): the one that never trained on that fold."""
    n = len(x)
    logits = (torch.from_numpy(x) @ w + b).view(n, -1, k)[torch.arange(n), torch.from_numpy(fold)]
    return F.softmax(logits, 1).numpy().astype(np.float64)


def label_issues(labels: np.ndarray, probs: np.ndarray) -> dict:
    """cleanlab's confident learning over (N,) labels and (N, C) out-of-sample probabilities:
    {"flagged": indices cleanlab judges mislabelled, most likely first; "rank": every index,
    flagged ones first (by label quality), then the rest by label quality; "quality": (N,) score in
    [0, 1], low = likely wrong; "suggested": (N,) most probable class}."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    rest = np.setdiff1d(np.argsort(quality, kind="stable"), flagged, assume_unique=True)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return {"flagged": np.asarray(flagged, np.int64), "rank": np.concatenate([flagged, rest]).astype(np.int64),
            "quality": quality, "suggested": probs.argmax(1)}
