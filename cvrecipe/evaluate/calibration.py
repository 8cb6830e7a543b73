"""Calibration: do predicted probabilities mean what they say?

Expected calibration error (ECE) over equal-width confidence bins, the per-bin numbers behind a
reliability diagram, and temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on
validation logits by minimising the NLL of softmax(logits / T). T leaves every prediction's
argmax, hence the accuracy, unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BINS = 15  # confidence bins of width 1/15, as in Guo et al.


def reliability(logits: torch.Tensor, y: torch.Tensor, bins: int = BINS) -> dict:
    """Per confidence bin (right-closed (lo, hi], the first also holds 0): image count, mean
    confidence, accuracy; plus the ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b|."""
    probs = logits.float().softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence.double(), edges[1:-1], right=False)  # (N,) bin index in [0, bins)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    safe = count.clamp_min(1)
    gap = (acc_sum / safe - conf_sum / safe).abs()
    ece = float((count / max(len(y), 1) * gap).sum())
    return {"ece": ece, "bins": bins, "edges": edges.tolist(), "count": count.long().tolist(),
            "confidence": (conf_sum / safe).tolist(), "accuracy": (acc_sum / safe).tolist()}


def nll(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> float:
    return F.cross_entropy(logits.float() / temperature, y).item()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, steps: int = 100) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), y); optimised over log T with L-BFGS."""
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_summary(logits: torch.Tensor, y: torch.Tensor, temperature: float | None) -> dict:
    """ECE and NLL before and (when a temperature is given) after temperature scaling."""
    before = reliability(logits, y)
    out = {"ece": before["ece"], "nll": nll(logits, y), "reliability": before}
    if temperature is not None:
        after = reliability(logits / temperature, y)
        out.update({"temperature": temperature, "ece_scaled": after["ece"],
                    "nll_scaled": nll(logits, y, temperature), "reliability_scaled": after})
    return out


def held_out_temperature(fit: tuple[torch.Tensor, torch.Tensor], check: tuple[torch.Tensor, torch.Tensor],
                         fitted_on: str, measured_on: str) -> dict:
    """A temperature fitted on `fit` (logits (N, K), labels (N,)) and its effect measured on `check`,
    images it was not fitted on: ECE (15 bins) and NLL before and after."""
    temperature = fit_temperature(*fit)
    logits, y = check
    return {"temperature": temperature, "fitted_on": fitted_on, "fit_images": len(fit[1]),
            "measured_on": measured_on, "measured_images": len(y), "bins": BINS,
            "ece_before": reliability(logits, y)["ece"], "ece_after": reliability(logits / temperature, y)["ece"],
            "nll_before": nll(logits, y), "nll_after": nll(logits, y, temperature)}


def halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of range(n) into two halves (indices): one to fit on, one to measure on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n // 2], order[n // 2:]
