"""Small convolutional networks: the classic Keras seed CNN and a fast CNN for 28×28 grayscale."""
from __future__ import annotations

from torch import nn

from cvrecipe.models.registry import register


def _flat_features(net: nn.Module, in_channels: int, input_size: tuple[int, int]) -> int:
    import torch

    with torch.no_grad():
        return net(torch.zeros(1, in_channels, *input_size)).flatten(1).shape[1]


@register("seed-cnn")
def seed_cnn(num_classes: int, in_channels: int, input_size: tuple[int, int], dropout: float = 0.0) -> nn.Module:
    """The three-conv network of the classic Keras CIFAR-10 example.

    Conv 32/64/128 3×3 'valid' + ReLU + MaxPool 2, Flatten, Dense 64 + ReLU, Dense classes.
    For 32×32 inputs: 32→30→15→13→6→4→2, so the flatten has 128·2·2 = 512 features.
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
    )
    n = _flat_features(features, in_channels, input_size)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(n, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, num_classes))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("small-cnn")
def small_cnn(num_classes: int, in_channels: int, input_size: tuple[int, int], width: int = 32,
              dropout: float = 0.1) -> nn.Module:
    """A fast CNN for 28×28 grayscale: two conv-conv-pool stages, one conv, global pooling.

    Widths w, 2w, 4w (default 32/64/128); about 0.14M parameters at w=32. Global average
    pooling makes it work at any input size.
    """
    w = width
    return nn.Sequential(
        *_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes),
    )
