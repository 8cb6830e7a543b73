"""Fine-tuning strategies for pretrained backbones: which parameters train when, and how fast.

    linear     the backbone stays frozen (eval mode: BatchNorm statistics untouched); only the
               new head trains. With finetune.feature_cache the backbone runs once (probe.py).
    full       everything trains from the first step; the backbone at backbone_lr_scale × lr,
               earlier layers slower still by layer_decay per layer. freeze_layers keeps the
               first layers frozen throughout: on a CPU their backward pass, at the highest
               resolution, is much of a step's cost, and layer decay barely moves them anyway.
    two-stage  linear for freeze_epochs (the new head learns without random gradients wrecking
               the pretrained features), then full; each stage has its own lr schedule, so the
               backbone starts with a fresh warm-up instead of mid-decay.
    lora       the backbone stays frozen (eval mode) and low-rank adapters on its 1×1 convs train
               with the head, at the head's lr (lora.py, through peft); checkpoints hold the merged
               weights. freeze_layers keeps the first layers without adapters.

The optimizer holds every parameter from the start: a frozen parameter has no gradient, and
torch's optimizers skip those, so unfreezing needs no new optimizer and resume stays exact.
"""
from __future__ import annotations

import torch
from torch import nn

from cvrecipe.config import Config, FinetuneConfig
from cvrecipe.train.optim import build_scheduler, lr_factor


class Finetune:
    """The strategy for one model. `active` is False for strategy "none": the loop's defaults apply."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, epochs: int):
        self.cfg, self.epochs = cfg, epochs
        self.active = cfg.strategy != "none"
        self.net = getattr(model, "net", model)
        if self.active and not hasattr(self.net, "freeze"):
            raise ValueError(f"finetune.strategy={cfg.strategy} needs a pretrained model (see `cvrecipe models`)")
        self.adapters = []
        if cfg.strategy == "lora":
            from cvrecipe.train.lora import add_adapters

            self.adapters = add_adapters(self.net, cfg.lora_rank, cfg.lora_alpha, cfg.freeze_layers)

    @property
    def feature_cache(self) -> bool:
        return self.cfg.feature_cache

    def frozen_at(self, epoch: int) -> bool:
        """Is the backbone frozen during (0-based) `epoch`?"""
        if self.cfg.strategy == "two-stage":
            return epoch < self.cfg.freeze_epochs
        return self.cfg.strategy in ("linear", "lora")

    def on_epoch_start(self, epoch: int) -> None:
        if self.active:
            self.net.bn_eval = self.cfg.bn_eval
            self.net.freeze(None if self.frozen_at(epoch) else self.cfg.freeze_layers)
            for p in self.adapters:  # inside the frozen backbone, only LoRA's A and B learn
                p.requires_grad_(True)

    def param_groups(self) -> list[dict] | None:
        """Head first (so the logged lr is the head's), then each backbone layer from output to
        input, its lr_scale = backbone_lr_scale · layer_decay^(layers after it). None = the defaults."""
        if not self.active:
            return None
        groups = _split_decay(self.net.head.parameters(), 1.0)
        if self.cfg.strategy == "linear":
            return groups
        if self.cfg.strategy == "lora":
            return groups + _split_decay(self.adapters, 1.0)
        layers = self.net.backbone_layers()
        seen = {id(p) for layer in layers for p in layer.parameters()}
        rest = [p for p in self.net.backbone.parameters() if id(p) not in seen]  # parameters outside the listed layers
        for depth, layer in enumerate(reversed(layers)):
            groups += _split_decay(layer.parameters(), self.cfg.backbone_lr_scale * self.cfg.layer_decay ** depth)
        groups += _split_decay(rest, self.cfg.backbone_lr_scale)
        return [g for g in groups if g["params"]]

    def scheduler(self, optimizer: torch.optim.Optimizer, run_cfg: Config, steps_per_epoch: int):
        """The configured schedule over the whole run; for two-stage, once over each stage."""
        if self.cfg.strategy != "two-stage":
            return build_scheduler(optimizer, run_cfg, steps_per_epoch)
        schedule = run_cfg.schedule
        first = self.cfg.freeze_epochs * steps_per_epoch
        second = (self.epochs - self.cfg.freeze_epochs) * steps_per_epoch

        def factor(step: int) -> float:
            if step < first:
                return lr_factor(step, first, schedule, steps_per_epoch)
            return lr_factor(step - first, second, schedule, steps_per_epoch)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def deployable(self, model: nn.Module) -> nn.Module:
        """What a checkpoint holds: the model itself, or for LoRA a copy with the adapters merged in."""
        if not self.adapters:
            return model
        from cvrecipe.train.lora import merged

        return merged(model)


def _split_decay(params, lr_scale: float) -> list[dict]:
    """Weight decay on conv/linear weights only, as optim.param_groups does."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1], "lr_scale": lr_scale, "decay": True},
            {"params": [p for p in params if p.ndim <= 1], "lr_scale": lr_scale, "decay": False}]
