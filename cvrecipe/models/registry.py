"""One registry, one `create_model`: every model is wrapped with its own preprocessing.

An `ImageModel` takes uint8 (B, C, H, W) images straight from the data cache and does the
rescale-and-normalise itself, so training, evaluation, export and serving all share one
preprocessing path and can never disagree about it. Its `meta` (task, classes, input size,
mean/std, constructor arguments) travels into checkpoints and exports.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED: dict[str, Callable[..., nn.Module]] = {}  # fixed preprocessing and RGB input: listed apart
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}  # "timm" → fn(arch, num_classes, ...) for "timm:arch"
# model name → what its outputs are: "labels" (B, K) logits, "masks" (B, K, H, W) logits, "boxes" (a loss
# dict in train mode, (B, 100, 6) detections in eval mode). A task names the kind of model it trains.
_OUTPUTS: dict[str, str] = {}
LABELS = "labels"


def register(name: str, pretrained: bool = False, outputs: str = LABELS):
    """Decorator: `@register("seed-cnn")` on a function (num_classes, in_channels, **kw) → nn.Module.
    `pretrained=True`: the network loads pretrained weights and brings its own preprocessing.
    `outputs`: what its outputs are (see _OUTPUTS)."""
    def wrap(fn):
        (_PRETRAINED if pretrained else _REGISTRY)[name] = fn
        _OUTPUTS[name] = outputs
        return fn
    return wrap


def model_outputs(name: str) -> str:
    """What a registered model outputs (library families `prefix:arch` are classifiers: labels)."""
    return _OUTPUTS.get(name, LABELS)


def register_prefix(prefix: str):
    """Decorator for a family of library models named `prefix:arch`: fn(arch, num_classes, in_channels, **kw)."""
    def wrap(fn):
        _PREFIXES[prefix] = fn
        return fn
    return wrap


def list_models(outputs: str = LABELS) -> list[str]:
    """Models with `outputs` trained from scratch: any channel count, the dataset's own mean/std."""
    return sorted(name for name in _REGISTRY if _OUTPUTS[name] == outputs)


def list_pretrained() -> list[str]:
    """Pretrained backbones (RGB, their own preprocessing), then the library families as `prefix:<arch>`."""
    return sorted(_PRETRAINED) + [f"{prefix}:<arch>" for prefix in sorted(_PREFIXES)]


def _factory(name: str) -> Callable[..., nn.Module]:
    prefix, sep, arch = name.partition(":")
    if sep and prefix in _PREFIXES:
        return lambda **kw: _PREFIXES[prefix](arch, **kw)
    factory = _REGISTRY.get(name) or _PRETRAINED.get(name)
    if factory is None:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(list_models() + list_pretrained())}")
    return factory


class Normalize(nn.Module):
    """uint8 [0, 255] or float [0, 1] → (x - mean) / std, per channel; mean/std saved with the weights."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std


class ImageModel(nn.Module):
    """Normalize → network → outputs: logits (B, num_classes) for classification, (B, num_classes,
    H, W) for segmentation. `meta` travels into checkpoints; meta["task"] says what the outputs mean,
    meta["tile"] (segmentation) how images larger than the input size are run (artifact/tiling.py)."""

    def __init__(self, net: nn.Module, meta: dict):
        super().__init__()
        channels = meta["in_channels"]
        self.normalize = Normalize(meta.get("mean") or [0.0] * channels, meta.get("std") or [1.0] * channels)
        self.net = net
        self.meta = meta

    def forward(self, x: torch.Tensor, *targets) -> torch.Tensor:
        """`targets`: what a network trains on besides images (a detector's boxes in train mode)."""
        return self.net(self.normalize(x), *targets)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: tuple[int, int] = (32, 32),
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
    outputs: str = LABELS,
    **kwargs,
) -> ImageModel:
    """Build a registered model wrapped with its preprocessing metadata.

    mean/std are in [0, 1] pixel units (None = no standardisation, pixels only rescaled to [0, 1]).
    A pretrained network brings its own (`net.preprocess`), which replaces them: its weights only
    make sense with the statistics it was trained with.
    """
    if model_outputs(name) != outputs:
        raise ValueError(f"model {name} outputs {model_outputs(name)}; this run needs a model that outputs {outputs}: "
                         f"{', '.join(list_models(outputs))}")
    net = _factory(name)(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **kwargs)
    backbone = getattr(net, "preprocess", None)  # {size, mean, std, interpolation} or None
    if backbone is not None:
        mean, std = backbone["mean"], backbone["std"]
    meta = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": list(input_size),
        "mean": mean,
        "std": std,
        "class_names": class_names or [str(i) for i in range(num_classes)],
        "kwargs": kwargs,
        **({"backbone": backbone} if backbone is not None else {}),  # input_size stays what callers send
    }
    return ImageModel(net, meta)


def model_from_meta(meta: dict | str) -> ImageModel:
    meta = json.loads(meta) if isinstance(meta, str) else meta
    kwargs = dict(meta["kwargs"])
    if "backbone" in meta:
        kwargs["pretrained"] = False  # the checkpoint holds the weights; the original file is not needed
    model = create_model(meta["name"], meta["num_classes"], meta["in_channels"], tuple(meta["input_size"]),
                         meta["mean"], meta["std"], meta["class_names"], model_outputs(meta["name"]), **kwargs)
    model.meta["kwargs"] = meta["kwargs"]  # keep the record as trained
    model.meta.update({k: v for k, v in meta.items() if k not in model.meta})  # e.g. "tile": how to run it
    return model
