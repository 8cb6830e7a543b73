"""Box-aware augmentation: boxes follow their images, checked against torchvision.transforms.v2
(tv_tensors.BoundingBoxes) and by drawing each box into a mask that is augmented with the image."""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cvrecipe.data.augment_boxes import crop_boxes, crop_images, hflip, random_flip, random_resized_crop, random_windows

H, W = 48, 64


def random_boxes(gen: torch.Generator, batch: int, per_image: int) -> torch.Tensor:
    """(batch · per_image, 6) boxes at least 6 px a side, inside (H, W)."""
    n = batch * per_image
    x1 = torch.rand(n, generator=gen) * (W - 8)
    y1 = torch.rand(n, generator=gen) * (H - 8)
    x2 = x1 + 6 + torch.rand(n, generator=gen) * (W - x1 - 6)
    y2 = y1 + 6 + torch.rand(n, generator=gen) * (H - y1 - 6)
    labels = torch.randint(0, 5, (n,), generator=gen).float()
    image = torch.arange(batch).repeat_interleave(per_image).float()
    return torch.stack([x1, y1, x2, y2, labels, image], dim=1)


def reference(boxes: torch.Tensor, image: int) -> tv_tensors.BoundingBoxes:
    mine = boxes[boxes[:, 5] == image, :4]
    return tv_tensors.BoundingBoxes(mine, format="XYXY", canvas_size=(H, W))


def test_flip_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (4, 3, H, W), dtype=torch.uint8, generator=gen)
    boxes = random_boxes(gen, 4, 3)
    flip = torch.tensor([True, False, True, False])
    out, out_boxes = hflip(x, boxes, flip)
    for i in range(4):
        want_img = TF.horizontal_flip(x[i]) if flip[i] else x[i]
        want = TF.horizontal_flip(reference(boxes, i)) if flip[i] else reference(boxes, i)
        assert torch.equal(out[i], want_img)
        torch.testing.assert_close(out_boxes[out_boxes[:, 5] == i, :4], want.as_subclass(torch.Tensor))
    assert torch.equal(out_boxes[:, 4:], boxes[:, 4:])  # classes and image indices untouched
    again, _ = random_flip(x, boxes, torch.Generator().manual_seed(1))
    assert again.shape == x.shape


def test_resized_crop_boxes_match_torchvision_including_clipping_and_dropping():
    """Integer windows, some reaching past the image edges' boxes: v2.resized_crop then
    SanitizeBoundingBoxes(min_size) is the reference for the mapped, clipped and dropped boxes."""
    gen = torch.Generator().manual_seed(2)
    batch, out_size, min_size = 6, (40, 40), 3.0
    boxes = random_boxes(gen, batch, 5)
    tops = torch.randint(0, H // 2, (batch,), generator=gen)
    lefts = torch.randint(0, W // 2, (batch,), generator=gen)
    heights = torch.randint(12, H // 2 + 1, (batch,), generator=gen)
    widths = torch.randint(12, W // 2 + 1, (batch,), generator=gen)
    windows = torch.stack([tops, lefts, heights, widths], 1).float()
    mine = crop_boxes(boxes, windows, out_size, min_size=min_size, min_visible=0.0)
    sanitize = v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=None)
    dropped = 0
    for i in range(batch):
        want = TF.resized_crop(reference(boxes, i), int(tops[i]), int(lefts[i]), int(heights[i]), int(widths[i]),
                               list(out_size))
        kept = sanitize(want)
        dropped += len(want) - len(kept)
        torch.testing.assert_close(mine[mine[:, 5] == i, :4], kept.as_subclass(torch.Tensor), atol=1e-4, rtol=0)
    assert dropped > 0  # the case exercised dropping, not only clipping


def test_boxes_stay_on_what_they_marked_drawn_as_masks():
    """Each box is drawn as a filled rectangle into its own mask channel; the image-plus-masks stack
    goes through the same random windows (nearest sampling); each mask's bounding box must be the
    transformed box, to within one output pixel."""
    gen = torch.Generator().manual_seed(4)
    batch, per_image = 4, 3
    boxes = random_boxes(gen, batch, per_image).round()  # whole pixels: the drawn mask is the box
    masks = torch.zeros(batch, per_image, H, W, dtype=torch.uint8)
    for row, (x1, y1, x2, y2, _, image) in enumerate(boxes.long().tolist()):
        masks[image, row % per_image, y1:y2, x1:x2] = 255
    images = torch.randint(0, 255, (batch, 3, H, W), dtype=torch.uint8, generator=gen)
    stacked = torch.cat([images, masks], dim=1)
    windows = random_windows(batch, H, W, gen, scale=(0.4, 1.0))
    out = crop_images(stacked, windows, (H, W), mode="nearest")
    moved = crop_boxes(boxes, windows, (H, W), min_size=4.0, min_visible=0.0)
    checked = 0
    for row in range(len(boxes)):
        image, channel = int(boxes[row, 5]), row % per_image
        drawn = out[image, 3 + channel] > 0
        match = moved[moved[:, 5] == image]
        if not drawn.any():
            continue
        ys, xs = torch.nonzero(drawn, as_tuple=True)
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        if min(seen[2] - seen[0], seen[3] - seen[1]) < 5:
            continue  # a sliver at the border: dropped by min_size, nothing to compare
        close = (match[:, :4] - seen).abs().amax(1)
        assert close.min() <= 1.0, f"box {row} drawn at {seen.tolist()}, boxes say {match[:, :4].tolist()}"
        checked += 1
    assert checked >= 8


def test_random_resized_crop_drops_mostly_hidden_boxes():
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(1, 3, 100, 100, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10, 30, 30, 1, 0], [90, 10, 130, 30, 2, 0]])  # the second is 25 % inside 100 px
    windows = torch.tensor([[0.0, 0, 100, 100]])  # identity: only clipping acts
    assert len(crop_boxes(boxes, windows, (100, 100), min_visible=0.2)) == 2
    assert len(crop_boxes(boxes, windows, (100, 100), min_visible=0.3)) == 1
    images, moved = random_resized_crop(x, boxes, gen, scale=(0.5, 0.5), ratio=(1, 1))
    assert images.shape == x.shape and images.dtype == torch.uint8 and moved.shape[1] == 6
