"""Test-time views: the exact shifted and flipped inputs (against torchvision's transforms)."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cvrecipe.artifact.tta import tta_logits, tta_views
from cvrecipe.models import create_model


def test_tta_views_are_the_exact_shifted_and_flipped_inputs():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    views = tta_views(x, 2)
    assert len(views) == 6 and sum(w for w, _ in views) == pytest.approx(1.0)
    padded = torch.stack([TF.pad(img, [1], padding_mode="reflect") for img in x])
    up_left = torch.stack([TF.crop(img, 0, 0, 8, 8) for img in padded])
    down_right = torch.stack([TF.crop(img, 2, 2, 8, 8) for img in padded])
    expected = [x, TF.horizontal_flip(x), up_left, down_right, TF.horizontal_flip(up_left),
                TF.horizontal_flip(down_right)]
    for (_, view), ref in zip(views, expected):
        assert torch.equal(view, ref)
    model = create_model("small-cnn", num_classes=4, in_channels=3, input_size=(8, 8)).eval()
    with torch.no_grad():
        manual = sum(w * model(v) for w, v in zip([0.25, 0.25] + [0.125] * 4, expected))
    assert torch.allclose(tta_logits(model, x, 2), manual, atol=1e-6)
    assert torch.equal(tta_views(x, 0)[0][1], x)
    unmirrored = tta_views(x, 2, mirror=False)  # a model trained without flips
    assert [w for w, _ in unmirrored] == [0.5, 0.25, 0.25]
    assert all(torch.equal(view, ref) for (_, view), ref in zip(unmirrored, [x, up_left, down_right]))
    assert [(w, torch.equal(v, x)) for w, v in tta_views(x, 1, mirror=False)] == [(1.0, True)]


