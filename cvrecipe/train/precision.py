"""Half-precision weights (train.half_weights): the network kept in fp16/bf16, BatchNorm in fp32.

Autocast keeps fp32 weights and casts them (and activations) op by op; airbench instead keeps
weights and activations in half precision, with BatchNorm's parameters and statistics in fp32,
so no op pays for a cast. Small updates to half weights can round away (an fp16 weight of 1.0
moves in steps of ~1e-3), so by default the optimizer updates fp32 master copies and writes them
back after each step (optim.master_weights); a recipe measured not to need them can turn them off.
"""
from __future__ import annotations

import torch
from torch import nn

from cvrecipe.train.optim import NORM_LAYERS


@torch.no_grad()
def to_half_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the network's floating-point parameters and buffers to `dtype` in place (the Parameter
    objects stay, so an optimizer built afterwards sees them), normalisation layers' to fp32, and
    cast the network's input to `dtype` (the input normalisation before it stays fp32: exact for uint8)."""
    net = getattr(model, "net", model)
    for module in net.modules():
        target = torch.float32 if isinstance(module, NORM_LAYERS) else dtype
        for param in module.parameters(recurse=False):
            param.data = param.data.to(target)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(target)
    net.register_forward_pre_hook(lambda _module, args: (args[0].to(dtype), *args[1:]))


class MasterWeights:
    """fp32 copies of a model's half-precision parameters for the optimizer to update.

    `optimizer_params()` gives the fp32 parameters to build the optimizer on (fp32 ones are used as
    they are); after backward, `to_master()` moves the gradients over; after the step, `to_model()`
    writes the updated weights back into the model."""

    def __init__(self, model: nn.Module):
        self.pairs = [(p, p.detach().float().clone().requires_grad_(p.requires_grad) if p.dtype != torch.float32
                       else p) for p in model.parameters()]
        self.master = {id(p): m for p, m in self.pairs}

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """`groups` (of model parameters) with each parameter replaced by its master copy."""
        return [{**g, "params": [self.master[id(p)] for p in g["params"]]} for g in groups]

    @torch.no_grad()
    def to_master(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                m.requires_grad_(p.requires_grad)

    @torch.no_grad()
    def to_model(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach().clone() for p, m in self.pairs if m is not p]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        for (p, m), saved in zip([pair for pair in self.pairs if pair[1] is not pair[0]], tensors):
            m.copy_(saved)
