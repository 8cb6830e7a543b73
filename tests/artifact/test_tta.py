"""Test-time views: the exact shifted and flipped inputs (against torchvision's transforms), and each
task's way back: class scores averaged, score maps mirrored and moved back before averaging, boxes
mirrored and moved back, then suppressed again."""
import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from cvrecipe.artifact.tta import tta_logits, tta_views
from cvrecipe.models import create_model
from cvrecipe.tasks import get_task


def reflect_crop(x: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """torchvision's reference for a one-pixel shift: reflect-pad by 1, crop back to the size."""
    h, w = x.shape[-2:]
    return torch.stack([TF.crop(TF.pad(img, [1], padding_mode="reflect"), top, left, h, w) for img in x])


def test_tta_views_are_the_exact_shifted_and_flipped_inputs():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    views = tta_views(2)
    assert len(views) == 6 and sum(v.weight for v in views) == pytest.approx(1.0)
    up_left, down_right = reflect_crop(x, 0, 0), reflect_crop(x, 2, 2)
    expected = [x, TF.horizontal_flip(x), up_left, down_right, TF.horizontal_flip(up_left),
                TF.horizontal_flip(down_right)]
    for view, ref in zip(views, expected):
        assert torch.equal(view.apply(x), ref)
    model = create_model("small-cnn", num_classes=4, in_channels=3, input_size=(8, 8)).eval()
    with torch.no_grad():
        manual = sum(w * model(v) for w, v in zip([0.25, 0.25] + [0.125] * 4, expected))
    assert torch.allclose(tta_logits(model, x, 2), manual, atol=1e-6)
    assert [(v.weight, v.mirror, v.shift) for v in tta_views(0)] == [(1.0, False, 0)]
    unmirrored = tta_views(2, mirror=False)  # a model trained without flips
    assert [v.weight for v in unmirrored] == [0.5, 0.25, 0.25]
    assert all(torch.equal(v.apply(x), ref) for v, ref in zip(unmirrored, [x, up_left, down_right]))
    assert [(v.weight, v.mirror) for v in tta_views(1, mirror=False)] == [(1.0, False)]


def test_segmentation_views_are_mapped_back_before_averaging():
    """Each view's score map mirrored back and moved back (torchvision's ops as the reference); a
    per-pixel model, which commutes with flips and shifts, gives its plain map back inside the border."""
    torch.manual_seed(0)
    task = get_task("segmentation")
    model = create_model("unet", 3, 1, (16, 16), outputs="masks").eval()
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        out = [model(v.apply(x)) for v in tta_views(2)]
    back = [out[0], TF.horizontal_flip(out[1]), reflect_crop(out[2], 2, 2), reflect_crop(out[3], 0, 0),
            reflect_crop(TF.horizontal_flip(out[4]), 2, 2), reflect_crop(TF.horizontal_flip(out[5]), 0, 0)]
    reference = sum(w * o for w, o in zip([0.25, 0.25] + [0.125] * 4, back))
    torch.testing.assert_close(tta_logits(model, x, 2, merge=task.merge_views), reference)

    pixelwise = nn.Conv2d(1, 3, 1).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        plain, merged = pixelwise(x), tta_logits(pixelwise, x, 2, merge=task.merge_views)
    torch.testing.assert_close(merged[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])


class BrightestPixel(nn.Module):
    """A stand-in detector: one 5x5 box of class 1 centred on each image's brightest pixel, scored by
    its brightness; the other 99 rows are padding (score 0, class -1), as the detectors answer."""

    def forward(self, x):
        b, _, h, w = x.shape
        flat = x.float().mean(1).flatten(1)
        score, index = flat.max(1)
        cy, cx = (index // w).float() + 0.5, (index % w).float() + 0.5  # the pixel's centre
        rows = torch.zeros(b, 100, 6)
        rows[..., 5] = -1
        rows[:, 0] = torch.stack([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5, score / 255, torch.ones(b)], 1)
        return rows


def test_detection_views_boxes_come_back_to_the_image_and_are_kept_once():
    x = torch.zeros(2, 3, 16, 20, dtype=torch.uint8)
    x[0, :, 6, 4] = 200  # row 6, column 4: box [2, 4, 7, 9]
    x[1, :, 10, 15] = 100  # row 10, column 15: box [13, 8, 18, 13]
    task = get_task("detection")
    for level in (1, 2):
        rows = tta_logits(BrightestPixel(), x, level, merge=task.merge_views)
        assert rows.shape == (2, 100, 6)
        kept = rows[rows[..., 4] > 0]
        # every view's box lands on the same pixel: suppressed into one box per image
        assert len(kept) == 2 and (rows[:, 1:, 5] == -1).all()
        torch.testing.assert_close(rows[:, 0, :4], torch.tensor([[2.0, 4, 7, 9], [13.0, 8, 18, 13]]))
        torch.testing.assert_close(rows[:, 0, 4], torch.tensor([200 / 255, 100 / 255]))
    mirrored_only = task.merge_views([(v, BrightestPixel()(v.apply(x))) for v in tta_views(1)[1:]], (16, 20))
    torch.testing.assert_close(mirrored_only[:, 0, :4], torch.tensor([[2.0, 4, 7, 9], [13.0, 8, 18, 13]]))
