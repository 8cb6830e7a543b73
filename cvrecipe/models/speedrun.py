"""The fast CIFAR-10 network in the airbench94 style, built from switchable parts.

Shape for 32×32 RGB input (widths 64/256/256):
  whiten 2×2 conv (frozen) (B, 24, 31, 31) → GELU
  → group(64)  conv3×3 → maxpool2 → BN → GELU → conv3×3 → BN → GELU   (B, 64, 15, 15)
  → group(256)                                                          (B, 256, 7, 7)
  → group(256)                                                          (B, 256, 3, 3)
  → maxpool3 (B, 256, 1, 1) → linear (no bias) → × logit_scale
About 1.97M parameters at the default widths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvrecipe.models.registry import ImageModel, register


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale is fixed at 1 (only the shift is learned), with tunable momentum.

    `momentum` here is the running-statistics keep-rate convention of the speedrun recipes
    (0.6 = keep 60% of the old estimate); torch's own argument is 1 − that.
    """

    def __init__(self, channels: int, momentum: float = 0.6, eps: float = 1e-12, affine_weight: bool = False):
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = affine_weight


class IdentityInitConv(nn.Conv2d):
    """3×3 'same' conv whose first in_channels filters start as the identity (Dirac) map, so a
    fresh network passes its input through and training starts from a well-conditioned signal."""

    def __init__(self, cin: int, cout: int, identity_init: bool = True):
        self.identity_init = identity_init
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.identity_init:
            nn.init.dirac_(self.weight.data[: self.in_channels])


class _MaxPoolRecomputingIndices(torch.autograd.Function):
    """Non-overlapping max-pool whose backward finds the argmax again from the saved input instead
    of keeping int64 indices from the forward pass: for this net at batch 1024 that is 230 MB less
    held between forward and backward (a quarter of all saved activations), for one extra pooling
    pass per layer in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.size = size
        return F.max_pool2d(x, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x, ctx.size, return_indices=True)
        # the kernel autograd itself uses for max_pool2d: each window's gradient to its (first) maximum
        k = [ctx.size, ctx.size]
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, k, k, [0, 0], [1, 1], False, indices), None


class LeanMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d(size) (stride = size, no padding) that, when training on a CPU, keeps no indices
    for its backward pass: there activations are host memory. On a GPU it is plain max-pooling,
    whose backward kernel needs no second pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu":
            return _MaxPoolRecomputingIndices.apply(x, self.kernel_size)
        return super().forward(x)


class ConvGroup(nn.Module):
    """conv → pool → BN → GELU, then `convs - 1` more conv → BN → GELU at the pooled size
    (2 in airbench94; a third adds depth where it is cheap, after the pool)."""

    def __init__(self, cin: int, cout: int, bn_momentum: float, bn_affine_weight: bool, identity_init: bool,
                 convs: int = 2):
        super().__init__()
        self.conv1 = IdentityInitConv(cin, cout, identity_init)
        self.pool = LeanMaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(cout, bn_momentum, affine_weight=bn_affine_weight)
        for i in range(2, convs + 1):  # conv2/norm2 (, conv3/norm3 ...): the names checkpoints hold
            setattr(self, f"conv{i}", IdentityInitConv(cout, cout, identity_init))
            setattr(self, f"norm{i}", FrozenScaleBatchNorm(cout, bn_momentum, affine_weight=bn_affine_weight))
        self.convs = convs
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        for i in range(2, self.convs + 1):
            x = self.act(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x)))
        return x


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class SpeedrunNet(nn.Sequential):
    """nn.Sequential plus two hooks the training loop calls: the data-dependent initialisation
    before step 0, and on_epoch_start."""

    whiten_bias_epochs: int | None = None

    def init_from_data(self, model: ImageModel, images: torch.Tensor) -> None:
        init_whitening(model, images)

    def on_epoch_start(self, epoch: int) -> None:
        """The whitening layer's bias trains during the first `whiten_bias_epochs` epochs only
        (None: throughout); then it is frozen, as in airbench94, where it settles early."""
        if self.whiten_bias_epochs is not None:
            self[0].bias.requires_grad_(epoch < self.whiten_bias_epochs)


@register("speedrun-net")
def speedrun_net(num_classes: int, in_channels: int, input_size: tuple[int, int], widths=(64, 256, 256),
                 whiten_kernel: int = 2, bn_momentum: float = 0.6, bn_affine_weight: bool = False,
                 identity_init: bool = True, logit_scale: float = 1 / 9, dropout: float = 0.0,
                 whiten_bias_epochs: int | None = None, whiten_padding: int = 0,
                 convs_per_group: int = 2, head_init_std: float | None = None) -> nn.Module:
    """`whiten_padding` pads the input by repeating its edge pixels before the whitening conv, so a
    k×k whitening keeps more of the image's size (28×28 Fashion-MNIST with k=3, padding 1: 28×28
    maps, which pool to 14, 7, 3, against 26, 13, 6, 3 unpadded). `head_init_std` rescales the
    head's initial weights to that standard deviation (airbench94_muon: 1, with logit_scale 1/width)."""
    whiten_width = 2 * in_channels * whiten_kernel**2  # eigenvector filters and their negatives
    whiten = nn.Conv2d(in_channels, whiten_width, whiten_kernel, padding=whiten_padding,
                       padding_mode="replicate" if whiten_padding else "zeros", bias=True)
    whiten.weight.requires_grad = False  # frozen; set from data by init_whitening()
    groups, cin = [], whiten_width
    for width in widths:
        groups.append(ConvGroup(cin, width, bn_momentum, bn_affine_weight, identity_init, convs_per_group))
        cin = width
    head = nn.Linear(cin, num_classes, bias=False)
    if head_init_std is not None:
        with torch.no_grad():
            head.weight.mul_(head_init_std / head.weight.std())
    net = SpeedrunNet(whiten, nn.GELU(), *groups, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                      head, Scale(logit_scale))
    net.whiten_bias_epochs = whiten_bias_epochs
    return net


def image_patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """All size×size patches (stride 1) of (N, C, H, W) images as (N·(H-size+1)·(W-size+1), C·size·size)."""
    n, c = x.shape[:2]
    p = x.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H', W', size, size)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)


@torch.no_grad()
def init_whitening(model: ImageModel, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the frozen first conv to whiten 2×2 patches of `images` (uint8 (N, C, H, W), a few thousand).

    Filters are the eigenvectors of the (uncentred) patch covariance scaled by 1/sqrt(λ + eps), so
    the first half of the output channels has covariance ≈ identity on these images; the second
    half holds the negated filters, which lets the following GELU keep both signs.
    """
    whiten = model.net[0]
    k = whiten.kernel_size[0]
    c = images.shape[1]
    cov = torch.zeros(c * k * k, c * k * k, dtype=torch.float64, device=whiten.weight.device)
    count = 0
    # on a CPU by chunks (all 4.8M patches in float64 would be 460 MB of host memory); on a GPU in one go
    chunk = 500 if whiten.weight.device.type == "cpu" else len(images)
    for start in range(0, len(images), chunk):
        x = model.normalize(images[start:start + chunk].to(whiten.weight.device)).float()
        patches = image_patches(x, k).double()  # (P, C·k·k)
        cov += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / count)  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)  # largest variance first
    filters = filters.reshape(-1, c, k, k).to(whiten.weight.dtype)
    whiten.weight.copy_(torch.cat([filters, -filters]))
    whiten.bias.zero_()
