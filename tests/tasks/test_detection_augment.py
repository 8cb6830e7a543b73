"""Detection's training augmentation (augment.hflip, augment.scale, augment.crop_padding): boxes move,
clip and drop as torchvision.transforms.v2 moves tv_tensors.BoundingBoxes, and stay on what they
marked when drawn into the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cvrecipe.config import AugmentConfig, ConfigError, load_config
from cvrecipe.data.augment_boxes import zoom_windows
from cvrecipe.data.ragged import DeviceBoxes
from cvrecipe.tasks import get_task
from cvrecipe.tasks.detection import MIN_BOX_SIDE, MIN_BOX_VISIBLE

H = W = 64


def planted(gen: torch.Generator, batch: int, per_image: int) -> DeviceBoxes:
    """per_image boxes in each of `batch` images, 4-40 px a side, some near the borders."""
    n = batch * per_image
    size = 4 + torch.rand(n, 2, generator=gen) * 36
    corner = torch.rand(n, 2, generator=gen) * (torch.tensor([W, H]) - size)
    flat = torch.cat([corner, corner + size, torch.randint(0, 3, (n, 1), generator=gen).float(),
                      torch.arange(batch).repeat_interleave(per_image)[:, None].float()], dim=1)
    return DeviceBoxes(flat, torch.arange(0, n + 1, per_image))


def policy(**kw) -> AugmentConfig:
    return AugmentConfig(**{"hflip": False, "scale": [0.6, 1.8], "crop_padding": 6, **kw})


def test_zoomed_and_shifted_boxes_match_torchvision_resized_crop_and_sanitize():
    task = get_task("detection")
    gen = torch.Generator().manual_seed(0)
    batch = 8
    boxes = planted(gen, batch, 4)
    x = torch.randint(0, 255, (batch, 3, H, W), dtype=torch.uint8, generator=gen)
    seed = 11
    out, moved = task.augment(x, boxes, policy(), True, torch.Generator().manual_seed(seed))
    windows = zoom_windows(batch, H, W, torch.Generator().manual_seed(seed), (0.6, 1.8), 6)  # the same draws
    zoom = H / windows[:, 2]
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert ((zoom >= 0.6 - 0.02) & (zoom <= 1.8 + 0.05)).all() and (zoom > 1.2).any() and (zoom < 0.9).any()
    sanitize = v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIDE, labels_getter=None)
    dropped = 0
    for i in range(batch):
        top, left, height, width = (int(v) for v in windows[i])
        mine = boxes.flat[boxes.flat[:, 5] == i]
        reference = TF.resized_crop(tv_tensors.BoundingBoxes(mine[:, :4], format="XYXY", canvas_size=(H, W)),
                                    top, left, height, width, [H, W])  # mapped and clipped to the output
        ref = reference.as_subclass(torch.Tensor)
        big = torch.minimum(ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]) >= MIN_BOX_SIDE
        torch.testing.assert_close(sanitize(reference).as_subclass(torch.Tensor), ref[big])  # torchvision's rule
        # and the visibility rule: at least MIN_BOX_VISIBLE of the box's mapped area inside the image
        full = (mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1]) * (W / width) * (H / height)
        area = (ref[:, 2] - ref[:, 0]) * (ref[:, 3] - ref[:, 1])
        want = ref[big & (area >= MIN_BOX_VISIBLE * full)]
        got = moved[i:i + 1].flat
        torch.testing.assert_close(got[:, :4], want, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(got[:, 5].numpy(), 0)  # re-numbered within the one-image batch
        dropped += len(mine) - len(got)
    assert dropped > 0  # the case exercised dropping, not only moving and clipping


def test_boxes_drawn_into_the_image_come_out_where_the_boxes_say():
    """Each box painted as a filled rectangle into its own extra channel of the image; after the
    augmentation (flips, zoom, shift) each painted region's bounding box is the moved box to 1.5 px."""
    task = get_task("detection")
    gen = torch.Generator().manual_seed(3)
    batch, per_image = 6, 3
    boxes = planted(gen, batch, per_image)
    boxes = DeviceBoxes(torch.cat([boxes.flat[:, :4].round(), boxes.flat[:, 4:]], 1), boxes.offsets)
    layers = torch.zeros(batch, per_image, H, W, dtype=torch.uint8)
    for row, (x1, y1, x2, y2, _, image) in enumerate(boxes.flat.long().tolist()):
        layers[image, row % per_image, y1:y2, x1:x2] = 255
    # the box's class column carries its layer index through the augmentation
    tagged = DeviceBoxes(torch.cat([boxes.flat[:, :4], (torch.arange(len(boxes.flat)) % per_image)[:, None].float(),
                                    boxes.flat[:, 5:]], 1), boxes.offsets)
    checked = 0
    for seed in range(3):
        out, moved = task.augment(layers, tagged, policy(hflip=True), True, torch.Generator().manual_seed(seed))
        for image, layer in ((i, k) for i in range(batch) for k in range(per_image)):
            painted = out[image, layer] > 127
            box = moved.flat[(moved.flat[:, 5] == image) & (moved.flat[:, 4] == layer), :4]
            if len(box) == 0:
                continue  # dropped: too small or mostly outside
            ys, xs = torch.nonzero(painted, as_tuple=True)
            seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (box[0] - seen).abs().max() <= 1.5, (seed, image, layer, box[0].tolist(), seen.tolist())
            checked += 1
    assert checked >= 30


def test_no_zoom_no_shift_leaves_images_and_boxes_alone():
    task = get_task("detection")
    gen = torch.Generator().manual_seed(1)
    boxes = planted(gen, 2, 3)
    x = torch.randint(0, 255, (2, 3, H, W), dtype=torch.uint8, generator=gen)
    out, moved = task.augment(x, boxes, AugmentConfig(), True, gen)
    assert torch.equal(out, x) and torch.equal(moved.flat, boxes.flat)


def test_a_detection_recipe_takes_scale_and_crop_padding_and_refuses_cutout():
    cfg = load_config("detect-synth", ["augment.scale=[0.5, 1.5]", "augment.crop_padding=8"])
    assert cfg.augment.scale == [0.5, 1.5] and cfg.augment.crop_padding == 8
    with pytest.raises(ConfigError, match=r"augment\.cutout=4.*augment\.scale"):
        load_config("detect-synth", ["augment.cutout=4"])
