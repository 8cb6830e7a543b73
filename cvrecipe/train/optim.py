"""Optimizers and learning-rate schedules (as a per-step multiplier of the peak lr)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cvrecipe.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay applies to conv/linear weights only; biases and norm parameters are exempt,
    since decaying them only fights the normalisation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"train.optimizer must be sgd, adam or adamw, got '{cfg.optimizer}'")


def lr_factor(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimisation step `step` (0-based) of `total_steps`."""
    progress = min(step / max(1, total_steps), 1.0)
    if cfg.schedule == "onecycle":
        # linear rise from 1/25 of peak to peak, then cosine down to ~0 (as torch's OneCycleLR)
        rise = cfg.onecycle_pct
        if progress < rise:
            return 0.04 + 0.96 * progress / rise
        return 0.5 * (1 + math.cos(math.pi * (progress - rise) / (1 - rise)))
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        rest = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))
    raise ValueError(f"train.schedule must be onecycle, cosine or constant, got '{cfg.schedule}'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg, steps_per_epoch))
