"""A trained run's penultimate features as an embedder for the data audit (`data inspect --embed
RUN`): the audit lives in the data layer and takes any Embedder; this one needs the run's model."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import head_layer
from cvrecipe.data.embed import Embedder


def run_embedder(run: str | Path) -> Embedder:
    """A trained classifier's penultimate features (its head layer's input); images are resized
    to the run's input size when they differ."""
    model = load_model(Path(run))
    head = head_layer(model)
    if head is None:
        raise ValueError(f"{run}: the model has no linear head whose input could serve as features")
    size = tuple(model.meta["input_size"])
    channels = model.meta["in_channels"]
    captured: list[torch.Tensor] = []
    head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].flatten(1).float()))

    def features(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != channels:
            x = x.expand(-1, 3, -1, -1) if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
        captured.clear()
        model(x.float().div(255))
        return captured[0]

    return Embedder(f"run:{run}", features)
