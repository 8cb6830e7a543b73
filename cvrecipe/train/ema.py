"""An exponential moving average of the weights, folded back into the model (Lookahead style)."""
from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    """ema ← decay·ema + (1 − decay)·w for every float tensor in the state dict (BN stats included).

    With `lookahead=True`, `update` also writes the average back into the model, so the fast
    weights restart from the slow ones (Lookahead); otherwise the model is left alone and
    `copy_to` installs the average at the end.
    """

    def __init__(self, model: nn.Module):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, lookahead: bool = False) -> None:
        state = model.state_dict()
        averages = list(self.shadow.values())
        weights = [state[key] for key in self.shadow]
        # one fused kernel launch per op over all tensors: on a GPU the per-tensor launches of a
        # Python loop cost more than the arithmetic for a net this size
        torch._foreach_lerp_(averages, weights, 1 - decay)
        if lookahead:
            torch._foreach_copy_(weights, averages)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for key, avg in self.shadow.items():
            state[key].copy_(avg)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)
