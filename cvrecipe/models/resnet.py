"""ResNet-18 for small images: torchvision's network with a 3×3 stride-1 stem and no max-pool."""
from __future__ import annotations

from torch import nn

from cvrecipe.models.registry import register


@register("resnet18")
def resnet18(num_classes: int, in_channels: int, input_size: tuple[int, int], dropout: float = 0.0) -> nn.Module:
    """11.2M parameters. On 32×32 inputs the feature maps are 32/16/8/4 (ImageNet's stem would
    shrink them to 8/4/2/1 and waste the network)."""
    from torchvision.models import resnet18 as tv_resnet18  # imported on use: ~160 MB of host memory

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))
    return net
