"""Optimizers and learning-rate schedules (as a per-step multiplier of the peak lr)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cvrecipe.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The default grouping. Weight decay applies to conv/linear weights only; biases and norm
    parameters are exempt, since decaying them only fights the normalisation. Norm-layer biases may
    learn faster (`train.bias_lr_scale`, 64 in the speedrun recipes)."""
    decay, biases, norm_biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim > 1:
            decay.append(p)
        elif "norm" in name:
            norm_biases.append(p)
        else:
            biases.append(p)
    return [{"params": decay, "lr_scale": 1.0, "decay": True},
            {"params": biases, "lr_scale": 1.0, "decay": False},
            {"params": norm_biases, "lr_scale": cfg.bias_lr_scale, "decay": False}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """`groups`: dicts with "params", "lr_scale" (× train.lr) and "decay" (bool: apply weight decay);
    default `param_groups(model, cfg)`. Units follow `train.units`:

    - "batch": lr and weight_decay are what torch's optimizer takes for the batch-mean loss.
    - "per1024": the speedrun convention. lr is per 1024 examples of summed loss, normalised by
      the momentum's gain 1/(1 − momentum), so it does not change with batch size or momentum;
      weight_decay is the fraction of each weight removed per 1024 examples at the peak lr,
      applied in proportion to the schedule and independent of the group's lr.
    """
    groups = [g for g in (groups if groups is not None else param_groups(model, cfg)) if g["params"]]
    if cfg.units == "per1024":
        # torch SGD on the mean loss: step = lr_t·(g + wd·w). Matching the speedrun scripts' summed-loss
        # update gives lr_t = lr·B/(1024·(1 + 1/(1 − m))) and wd·lr_t = weight_decay·B/(1024·(…)).
        kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
        base_lr = cfg.lr * cfg.batch_size / kilostep
        wd_of = lambda scale: cfg.weight_decay / (cfg.lr * scale)  # noqa: E731
    elif cfg.units == "batch":
        base_lr = cfg.lr
        wd_of = lambda scale: cfg.weight_decay  # noqa: E731
    else:
        raise ValueError(f"train.units must be batch or per1024, got '{cfg.units}'")
    torch_groups = [{"params": g["params"], "lr": base_lr * g["lr_scale"],
                     "weight_decay": wd_of(g["lr_scale"]) if g["decay"] else 0.0} for g in groups]
    if cfg.optimizer == "muon":
        return _muon(torch_groups, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(torch_groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(torch_groups, lr=base_lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=base_lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"train.optimizer must be sgd, adam, adamw or muon, got '{cfg.optimizer}'")


def lr_factor(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimisation step `step` (0-based) of `total_steps`."""
    progress = min(step / max(1, total_steps), 1.0)
    if cfg.schedule == "onecycle":
        # linear rise from 1/25 of peak to peak, then cosine down to ~0 (as torch's OneCycleLR)
        rise = cfg.onecycle_pct
        if progress < rise:
            return 0.04 + 0.96 * progress / rise
        return 0.5 * (1 + math.cos(math.pi * (progress - rise) / (1 - rise)))
    if cfg.schedule == "triangular":
        # linear from triangle_ends[0] up to the peak, then linear down to triangle_ends[1] (airbench)
        start, end = cfg.triangle_ends
        rise = cfg.onecycle_pct
        if progress < rise:
            return start + (1 - start) * progress / rise
        return 1 + (end - 1) * (progress - rise) / (1 - rise)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        rest = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))
    raise ValueError(f"train.schedule must be onecycle, triangular, cosine or constant, got '{cfg.schedule}'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg, steps_per_epoch))


def _muon(torch_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Conv filters (4-D weights) get orthogonalised Muon updates at `muon_lr`; everything else keeps
    its group's Nesterov-SGD settings, inside the same optimizer so one scheduler drives both."""
    from cvrecipe.train.muon import Muon

    groups = []
    for g in torch_groups:
        filters = [p for p in g["params"] if p.ndim == 4]
        rest = [p for p in g["params"] if p.ndim != 4]
        if filters:
            groups.append({"params": filters, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum,
                           "weight_decay": 0.0, "orthogonalize": True})
        if rest:
            groups.append({**g, "params": rest, "momentum": cfg.momentum, "orthogonalize": False})
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum)
