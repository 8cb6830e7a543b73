"""Muon: momentum SGD whose update for each weight matrix is orthogonalised (Newton–Schulz).

For a conv weight (O, I, kh, kw) the update is reshaped to (O, I·kh·kw), replaced by the nearest
(semi-)orthogonal matrix — approximately U·Vᵀ from its SVD, computed with a few Newton–Schulz
iterations that run well in bf16 on GPUs — and scaled so its size does not depend on the
matrix's aspect ratio. Groups with `orthogonalize=False` (biases, norms, the head) take plain
Nesterov-SGD steps, as torch.optim.SGD would, so one optimizer and one scheduler serve the whole net.
With `normalize`, each filter bank is first rescaled to Frobenius norm sqrt(rows), so the weights
keep their size and lr is a relative step (airbench94_muon's variant).
"""
from __future__ import annotations

import torch

# Quintic Newton–Schulz coefficients chosen to push all singular values towards 1 in ~5 steps
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U·Vᵀ for a 2-D matrix g = U·S·Vᵀ (singular values end up in roughly [0.7, 1.2])."""
    a, b, c = NS_COEFFS
    x = g.float() / (g.norm() + eps)  # spectral norm ≤ Frobenius norm ≤ 1, inside the iteration's basin
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, orthogonalize: bool = True, normalize: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, orthogonalize=orthogonalize, normalize=normalize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if not group["orthogonalize"]:
                _sgd_step(group, self.state)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError(f"Muon only takes matrices/conv kernels; got a parameter of shape {tuple(p.shape)}")
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
                rows, cols = update.shape[0], update[0].numel()
                scale = max(1.0, rows / cols) ** 0.5  # keeps per-entry update size independent of shape
                if group["normalize"]:  # the filter bank back to norm sqrt(rows): the step is relative to it
                    p.mul_(rows**0.5 / p.norm().clamp_min(1e-12))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled
                p.add_(update, alpha=-group["lr"] * scale)
        return loss


def _sgd_step(group: dict, state: dict) -> None:
    """torch.optim.SGD's update (coupled weight decay, no dampening), Nesterov when asked."""
    for p in group["params"]:
        if p.grad is None:
            continue
        d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
        buf = state[p].setdefault("momentum", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(d)
        step = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        p.add_(step, alpha=-group["lr"])
