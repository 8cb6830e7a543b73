"""Optimizers, parameter groups and learning-rate schedules (as a per-step multiplier of the peak lr)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cvrecipe.config import Config, ScheduleConfig
from cvrecipe.models.head import classifier_head

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm*, InstanceNorm*, ...


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """The default grouping, by module type: the parameters of normalisation layers (lr ×
    optim.norm_lr_scale, 64 in the speedrun recipes), the classifier head (lr × optim.head_lr_scale),
    other biases (lr × optim.bias_lr_scale; schedule.bias_end_epochs may end their schedule early),
    and the rest. Weight decay applies to conv/linear weights only: decaying biases and
    normalisation parameters only fights the normalisation. "kind" names each group."""
    head = classifier_head(model) if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups = {"weights": [], "biases": [], "norm": [], "head_weights": [], "head_biases": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_ids:
            groups["norm"].append(p)
        elif id(p) in head_ids:
            groups["head_weights" if p.ndim > 1 else "head_biases"].append(p)
        else:
            groups["weights" if p.ndim > 1 else "biases"].append(p)
    o = cfg.optim
    scales = {"weights": 1.0, "biases": o.bias_lr_scale, "norm": o.norm_lr_scale, "head_weights": o.head_lr_scale,
              "head_biases": o.head_lr_scale}
    return [{"params": params, "lr_scale": scales[kind], "decay": kind in ("weights", "head_weights"), "kind": kind}
            for kind, params in groups.items()]


def build_optimizer(model: nn.Module, cfg: Config, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """`groups`: dicts with "params", "lr_scale" (× optim.lr) and "decay" (bool: apply weight decay);
    default `param_groups(model, cfg)`. Units follow `optim.units`:

    - "batch": lr and weight_decay are what torch's optimizer takes for the batch-mean loss.
    - "per1024": the speedrun convention. lr is per 1024 examples of summed loss, normalised by
      the momentum's gain 1/(1 − momentum), so it does not change with batch size or momentum;
      weight_decay is the fraction of each weight removed per 1024 examples at the peak lr,
      applied in proportion to the schedule and independent of the group's lr.
    """
    o = cfg.optim
    groups = [g for g in (groups if groups is not None else param_groups(model, cfg)) if g["params"]]
    if o.units == "per1024":
        # torch SGD on the mean loss: step = lr_t·(g + wd·w). Matching the speedrun scripts' summed-loss
        # update gives lr_t = lr·B/(1024·(1 + 1/(1 − m))) and wd·lr_t = weight_decay·B/(1024·(…)).
        kilostep = 1024 * (1 + 1 / (1 - o.momentum))
        base_lr = o.lr * cfg.train.batch_size / kilostep
        wd_of = lambda scale: o.weight_decay / (o.lr * scale)  # noqa: E731
    else:
        base_lr = o.lr
        wd_of = lambda scale: o.weight_decay  # noqa: E731
    torch_groups = [{"params": g["params"], "lr": base_lr * g["lr_scale"], "kind": g.get("kind", "other"),
                     "weight_decay": wd_of(g["lr_scale"]) if g["decay"] else 0.0} for g in groups]
    if o.name == "muon":
        return _muon(torch_groups, cfg)
    if o.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=base_lr, momentum=o.momentum, nesterov=o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(torch_groups, lr=base_lr, betas=(o.momentum, 0.999))
    return torch.optim.AdamW(torch_groups, lr=base_lr, betas=(o.momentum, 0.999))


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimisation step `step` (0-based) of `total_steps`."""
    progress = min(step / max(1, total_steps), 1.0)
    if cfg.name == "onecycle":
        # linear rise from 1/25 of peak to peak, then cosine down to ~0 (as torch's OneCycleLR)
        rise = cfg.peak_at
        if progress < rise:
            return 0.04 + 0.96 * progress / rise
        return 0.5 * (1 + math.cos(math.pi * (progress - rise) / (1 - rise)))
    if cfg.name == "triangular":
        # linear from ends[0] up to the peak, then linear down to ends[1] (airbench)
        start, end = cfg.ends
        rise = cfg.peak_at  # 0: no rise, the schedule starts at the peak
        if progress < rise:
            return start + (1 - start) * progress / rise
        return 1 + (end - 1) * (progress - rise) / (1 - rise)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    rest = (step - warmup) / max(1, total_steps - warmup)  # cosine
    return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """schedule.name over the run for every group; with schedule.bias_end_epochs the "biases" group
    instead decays linearly from its peak to 0 by that epoch."""
    total = cfg.train.epochs * steps_per_epoch
    main = lambda step: lr_factor(step, total, cfg.schedule, steps_per_epoch)  # noqa: E731
    factors = [main] * len(optimizer.param_groups)
    if cfg.schedule.bias_end_epochs is not None:
        end = max(1, round(cfg.schedule.bias_end_epochs * steps_per_epoch))
        bias = lambda step: max(0.0, 1 - step / end)  # noqa: E731
        factors = [bias if g.get("kind") == "biases" else main for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _muon(torch_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """Conv filters (4-D weights) get orthogonalised Muon updates at `optim.muon_lr`; everything else
    keeps its group's Nesterov-SGD settings, inside the same optimizer so one scheduler drives both."""
    from cvrecipe.train.muon import Muon

    o = cfg.optim
    groups = []
    for g in torch_groups:
        filters = [p for p in g["params"] if p.ndim == 4]
        rest = [p for p in g["params"] if p.ndim != 4]
        if filters:
            groups.append({"params": filters, "lr": o.muon_lr, "momentum": o.muon_momentum, "kind": "filters",
                           "weight_decay": 0.0, "orthogonalize": True, "ns_steps": o.muon_ns_steps,
                           "normalize": o.muon_normalize})
        if rest:
            groups.append({**g, "params": rest, "momentum": o.momentum, "orthogonalize": False})
    return Muon(groups, lr=o.muon_lr, momentum=o.muon_momentum)
