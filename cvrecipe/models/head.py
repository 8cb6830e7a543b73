"""The classifier head: finding a network's last layer and starting its bias at the class prior."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last nn.Linear in `model` (in module order): the layer that produces the logits."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to treat as its classifier head")
    return linears[-1]


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) class frequencies of `labels`; a class never seen gets one pseudo-count so log() stays finite."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.where(counts > 0, counts, 1.0)
    return counts / counts.sum()


@torch.no_grad()
def set_bias_to_prior(model: nn.Module, labels: np.ndarray, num_classes: int) -> None:
    """bias = log(prior): with near-zero weights the initial softmax is the class prior, so the
    loss at init is the prior's entropy instead of ln(K), and early steps are not spent learning
    the class frequencies. Draws no random numbers (training stays seeded as before)."""
    head = classifier_head(model)
    if head.bias is None or head.out_features != num_classes:
        raise ValueError(f"cannot set the class-prior bias: the last linear layer has "
                         f"{head.out_features} outputs{' and no bias' if head.bias is None else ''}, "
                         f"expected {num_classes} with a bias")
    head.bias.copy_(torch.from_numpy(np.log(class_prior(labels, num_classes))).to(head.bias))
