"""Batched augmentation against torchvision's per-image transforms."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cvrecipe.config import AugmentConfig
from cvrecipe.data.augment import alternating_flip, augment_batch, crop_at, cutout, random_flip


@pytest.mark.parametrize("pad_mode, tv_mode", [("reflect", "reflect"), ("constant", "constant")])
def test_crop_matches_torchvision(pad_mode, tv_mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=gen)
    dy = torch.tensor([0, 1, 2, 3, 4, 2])
    dx = torch.tensor([4, 3, 2, 1, 0, 0])
    out = crop_at(x, 2, dy, dx, pad_mode)
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [2], padding_mode=tv_mode), int(dy[i]), int(dx[i]), 10, 12)
        assert torch.equal(out[i], ref)


def test_flip_is_either_identity_or_mirror_and_both_occur():
    x = torch.arange(64 * 2 * 4 * 5, dtype=torch.float32).reshape(64, 2, 4, 5)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, TF.horizontal_flip(i)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_cutout_zeroes_one_square_per_image():
    x = torch.full((32, 1, 20, 20), 7, dtype=torch.uint8)
    out = cutout(x, 6, torch.Generator().manual_seed(2))
    zeros = (out == 0).flatten(1).sum(1)
    assert (zeros <= 36).all() and (zeros >= 9).all()  # a 6x6 square, at worst clipped to 3x3 at a corner
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img == 0, as_tuple=True)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert area == len(rows)  # the zeros form one solid rectangle


def test_augment_is_reproducible_and_respects_hflip_ok():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(hflip=True, crop_padding=1, cutout=2)
    a = augment_batch(x, cfg, True, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    only_flip = AugmentConfig(hflip=True)
    assert torch.equal(augment_batch(x, only_flip, False, torch.Generator().manual_seed(3)), x)


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_epochs():
    x = torch.arange(16 * 1 * 2 * 3, dtype=torch.float32).reshape(16, 1, 2, 3)
    base = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    for epoch in range(4):
        a, b = alternating_flip(x, base, epoch), alternating_flip(x, base, epoch + 1)
        flipped_a = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(a, x)])
        flipped_b = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(b, x)])
        assert torch.equal(flipped_a ^ flipped_b, torch.ones(16, dtype=torch.bool))
