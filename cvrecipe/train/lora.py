"""LoRA fine-tuning through the `peft` library: low-rank adapters on the backbone's pointwise convs.

Each adapted conv computes W·x + (alpha/r)·B(A(x)) with W frozen, A (r × in) and B (out × r) trained
and B starting at zero, so training starts exactly from the pretrained network. Only the 1×1 convs
with groups=1 are adapted: they hold most of an EfficientNet/MobileNet's weights, and peft cannot
merge adapters into grouped (depthwise) convs. The rest of the backbone is frozen, BatchNorm included.

Checkpoints hold the merged weights (W + (alpha/r)·B·A), so they are the plain architecture:
evaluation, export and serving load them without peft. Resume files (last.ckpt) keep the adapters.
"""
from __future__ import annotations

import copy

from torch import nn


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("finetune.strategy=lora needs the peft library: pip install 'cvrecipe[lora]' "
                          f"(import failed: {e})") from e
    return peft


def pointwise_convs(net: nn.Module, skip_layers: int = 0) -> list[str]:
    """Names (relative to `net.backbone`) of the 1×1, groups=1 convs outside the first `skip_layers`
    of `net.backbone_layers()` (those stay frozen, and the backward pass stops before them)."""
    skipped = {id(m) for layer in net.backbone_layers()[:skip_layers] for m in layer.modules()}
    return [name for name, m in net.backbone.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.padding == (0, 0)
            and not isinstance(getattr(m, "static_padding", None), nn.ZeroPad2d) and id(m) not in skipped]


def _plain(conv: nn.Conv2d) -> nn.Conv2d:
    """The same 1×1 conv as a plain nn.Conv2d sharing its parameters. peft builds each adapter by
    instantiating the adapted layer's class, which the EfficientNet package's static-padding conv
    does not allow; a 1×1 conv pads nothing, so the plain one computes the same."""
    if type(conv) is nn.Conv2d:
        return conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, 0, conv.dilation, conv.groups,
                      conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


def add_adapters(net: nn.Module, rank: int, alpha: float, skip_layers: int = 0) -> list[nn.Parameter]:
    """Insert LoRA adapters into `net.backbone` in place; returns the adapter parameters.
    The caller freezes everything else."""
    peft = _peft()
    targets = pointwise_convs(net, skip_layers)
    if not targets:
        raise ValueError(f"finetune.strategy=lora found no 1x1 convs to adapt past the first {skip_layers} "
                         f"backbone layers (finetune.freeze_layers)")
    for name in targets:
        net.backbone.set_submodule(name, _plain(net.backbone.get_submodule(name)))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    peft.inject_adapter_in_model(config, net.backbone)
    return [p for name, p in net.backbone.named_parameters() if "lora_" in name]


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its conv and the peft wrappers removed:
    the same function (up to float rounding), the original architecture and state-dict keys."""
    if not has_adapters(model):
        return model
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    wrappers = [(name, m) for name, m in out.named_modules() if isinstance(m, LoraLayer)]
    for name, wrapper in wrappers:
        wrapper.merge()
        out.set_submodule(name, wrapper.get_base_layer())
    return out
