"""Segmentation networks: logits (B, num_classes, H, W) for images (B, C, H, W).

    unet          the U-Net (Ronneberger et al., 2015) with 'same' convolutions: `depth` down steps,
                  `width` channels in the first stage, doubled per step; normalisation configurable
    unet-encoder  a registered classifier's convolutional stages as the encoder (the pretrained
                  EfficientNet-Lite0 included), with a U-Net decoder over its feature pyramid

Both run at any input size: a side that is not a multiple of the network's total stride is padded
(reflected) to the next multiple and the logits are cropped back, so a whole image and a tile give
the same numbers for the same pixels away from the borders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvrecipe.models.registry import _factory, register

NORMS = ("batch", "instance", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    bias = norm == "none"
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True))


def _head(cin: int, num_classes: int) -> nn.Conv2d:
    """1×1 conv to logits; zero bias and weights of std 0.2/√cin (0.05 at 16 channels), so the
    initial softmax is near uniform and the loss at init near that of uniform outputs, as the sanity
    check expects (std 0.1 at 16 channels was 21% above it on the membranes). Much smaller weights
    (std 0.01) slowed learning of the minority classes several-fold on synthetic shapes."""
    head = nn.Conv2d(cin, num_classes, 1)
    nn.init.trunc_normal_(head.weight, std=0.2 / cin ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """x reflected at its bottom and right edges up to sides divisible by `multiple`; and (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    return x, (h, w)


class UNet(nn.Module):
    """Encoder: `depth` × (double conv → max-pool 2); bottom double conv; decoder: `depth` ×
    (transposed conv 2×2 up → concatenate the encoder's map of that size → double conv); 1×1 conv."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 4, width: int = 32, norm: str = "batch",
                 dropout: float = 0.0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unet: norm={norm!r}; choose one of {', '.join(NORMS)}")
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.stride = 2 ** depth
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(double_conv(cin, w, norm))
            cin = w
        self.bottom = double_conv(widths[-2], widths[-1], norm)
        self.dropout = nn.Dropout2d(dropout)  # on the bottom map, as in the paper's end of the contracting path
        self.up = nn.ModuleList(nn.ConvTranspose2d(w_in, w_out, 2, stride=2)
                                for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]))
        self.decode = nn.ModuleList(double_conv(2 * w, w, norm) for w in widths[-2::-1])
        self.head = _head(widths[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.stride)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottom(x))
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


@register("unet", outputs="masks")
def unet(num_classes: int, in_channels: int, input_size: tuple[int, int], depth: int = 4, width: int = 32,
         norm: str = "batch", dropout: float = 0.0) -> nn.Module:
    """The U-Net: depth 4 and width 64 is the paper's (31M parameters); width 32 has 7.8M, width 16
    1.9M. `norm`: batch | instance | group | none. `dropout`: channel dropout on the bottom map."""
    return UNet(in_channels, num_classes, depth, width, norm, dropout)


# ---- an encoder from a registered classifier -----------------------------------------------------

def efficientnet_pyramid(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """EfficientNet(-Lite)'s feature maps at strides 2, 4, 8, 16 and 32: the stem, then the last
    block at each stride (the library's extract_features, keeping what the decoder needs)."""
    params = net._global_params
    x = net._swish(net._bn0(net._conv_stem(x)))
    maps = []
    for idx, block in enumerate(net._blocks):
        rate = params.drop_connect_rate * idx / len(net._blocks) if params.drop_connect_rate else None
        y = block(x, drop_connect_rate=rate)
        if y.shape[-1] != x.shape[-1]:  # this block halves the resolution: x was the last at its stride
            maps.append(x)
        x = y
    maps.append(net._swish(net._bn1(net._conv_head(x))))
    return maps


def sequential_pyramid(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """A plain nn.Sequential classifier (small-cnn, seed-cnn): the map before each max-pool, and
    the last map before global pooling or flattening."""
    maps = []
    for layer in net:
        if isinstance(layer, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)):
            if not maps or maps[-1].shape != x.shape:
                maps.append(x)
            if not isinstance(layer, nn.MaxPool2d):
                break
        x = layer(x)
    return maps


class EncoderUNet(nn.Module):
    """A classifier's stages as the encoder (its feature pyramid, strides 2, 4, ... relative to the
    input) and a U-Net decoder: per level from the deepest, upsample ×2 (bilinear), concatenate the
    encoder's map of that size, double conv; then up to the input size and a 1×1 conv."""

    def __init__(self, classifier: nn.Module, in_channels: int, num_classes: int, input_size: tuple[int, int],
                 decoder_width: int = 16, norm: str = "batch"):
        super().__init__()
        self.encoder = getattr(classifier, "backbone", classifier)
        self.preprocess = getattr(classifier, "preprocess", None)  # pretrained: its mean/std become the model's
        if self.preprocess is not None:
            self.preprocess = {**self.preprocess, "size": None}  # no resize: the network sees native pixels
        with torch.no_grad():  # the pyramid's shapes, in eval mode so BatchNorm statistics stay untouched
            was = self.encoder.training
            self.encoder.eval()
            shapes = [m.shape for m in self.pyramid(torch.zeros(1, in_channels, *input_size))]
            self.encoder.train(was)
        self.stride = input_size[-1] // shapes[-1][-1]
        channels = [s[1] for s in shapes]
        self.decode = nn.ModuleList()
        cin = channels[-1]
        widths = [decoder_width * 2 ** i for i in range(len(channels) - 1)][::-1]
        for skip, w in zip(channels[-2::-1], widths):
            self.decode.append(double_conv(cin + skip, w, norm))
            cin = w
        self.final = double_conv(cin + in_channels, decoder_width, norm)
        self.head = _head(decoder_width, num_classes)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self.encoder, "_blocks"):
            return efficientnet_pyramid(self.encoder, x)
        if isinstance(self.encoder, nn.Sequential):
            return sequential_pyramid(self.encoder, x)
        raise ValueError(f"unet-encoder: cannot take a feature pyramid from {type(self.encoder).__name__}; "
                         f"supported: EfficientNet(-Lite) and nn.Sequential classifiers")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.stride)
        maps = self.pyramid(x)
        y = maps[-1]
        for block, skip in zip(self.decode, maps[-2::-1]):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.final(torch.cat([y, x], dim=1)))[..., :h, :w]


@register("unet-encoder", outputs="masks")
def unet_encoder(num_classes: int, in_channels: int, input_size: tuple[int, int], encoder: str = "efficientnet-lite0",
                 decoder_width: int = 16, norm: str = "batch", dropout: float = 0.0, **encoder_kwargs) -> nn.Module:
    """The encoder is the registered classifier `encoder` (efficientnet-lite0: ImageNet weights, RGB
    input; small-cnn, seed-cnn: from scratch), built with `encoder_kwargs` (e.g. pretrained=false);
    the decoder has `decoder_width` channels at full resolution, doubled per level."""
    kwargs = dict(encoder_kwargs)
    if encoder == "efficientnet-lite0":
        kwargs.setdefault("resize", max(input_size))  # TF-'same' padding is computed for this size
    classifier = _factory(encoder)(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size),
                                   dropout=dropout, **kwargs)
    return EncoderUNet(classifier, in_channels, num_classes, tuple(input_size), decoder_width, norm)
