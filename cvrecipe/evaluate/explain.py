"""Where does the model look? Grad-CAM heatmaps and the first layer's filters.

Grad-CAM (Selvaraju et al., 2017): take the last feature map A (B, K, h, w) and the gradient of
the class score with respect to it; weight each of the K maps by its mean gradient, sum, keep the
positive part, and upsample to the image: regions that raise the score light up.

The feature map is the output of the last module that produces one larger than 1×1 (for the
convnets here: the ReLU after the last conv + BN, ResNet's last block, a max-pool), not the raw
conv output: before BatchNorm subtracts it, a conv output carries a per-channel offset that is the
same everywhere and paints the whole image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def last_feature_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The leaf module whose output, in execution order, is the last (B, K, h, w) map with h·w > 1."""
    seen: list[nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            seen.append(module)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} produces no spatial feature map: Grad-CAM needs one")
    return seen[-1]


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
             layer: nn.Module | None = None) -> torch.Tensor:
    """Heatmaps (B, H, W) in [0, 1] for uint8 images x (B, C, H, W) and classes `target` (default:
    the predicted class). The model runs in eval mode, so images do not affect each other's maps."""
    was_training = model.training
    model.eval()
    layer = layer or last_feature_layer(model, x)
    saved: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, output: saved.__setitem__("activation", output))
    try:
        with torch.enable_grad():
            logits = model(x)
            activation = saved["activation"]  # the layer's last call (a module may run twice, e.g. ResNet's ReLU)
            activation.register_hook(lambda grad: saved.__setitem__("gradient", grad))
            target = logits.argmax(1) if target is None else target.to(logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, target[:, None]).sum().backward()  # each score depends on its own image only
    finally:
        handle.remove()
        model.train(was_training)
    activation, gradient = saved["activation"].detach(), saved["gradient"].detach()
    weights = gradient.mean((2, 3), keepdim=True)  # (B, K, 1, 1): importance of each map
    cam = F.relu((weights * activation).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu()


def overlay(images: np.ndarray, heatmaps: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """Blend heatmaps (B, H, W) in [0, 1] over uint8 images (B, C, H, W) with matplotlib's 'jet'
    colours. Returns (B, 3, H, W) uint8."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmaps.numpy())[..., :3].transpose(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]
    base = images.astype(np.float32) / 255
    if base.shape[1] == 1:
        base = np.repeat(base, 3, axis=1)
    return np.clip(((1 - alpha) * base + alpha * colours) * 255 + 0.5, 0, 255).astype(np.uint8)


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """The first convolution's kernels as images (K, C, kh, kw) uint8, each stretched to its own
    range; C is 1 or 3 when the layer reads the image directly."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer")
    w = conv.weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):
        w = w.mean(1, keepdim=True)
    lo, hi = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
    return ((w - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8).numpy()
