"""Paired augmentation keeps image and mask aligned: on a synthetic pattern whose mask is a function
of the image, the augmented mask is still that function of the augmented image; exact for crops,
flips and 90° turns, and wherever interpolation left a pure pixel for zoom and elastic warps."""
import dataclasses

import numpy as np
import pytest
import torch

from cvrecipe.config import AugmentConfig
from cvrecipe.data import IGNORE
from cvrecipe.data.augment_pairs import augment_pairs, flip_pairs, rotate_pairs

LEVELS = torch.tensor([20, 120, 220, 250])  # image level of classes 0, 1, 2 and of unlabelled pixels


def pattern(b: int = 6, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of random blocks at four gray levels (no two neighbours guaranteed alike) and the mask
    that is a function of them: level → class, the top level → IGNORE."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 4, (b, size // 8, size // 8), generator=gen)
    codes = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, H, W) in 0..3
    x = LEVELS[codes].to(torch.uint8)[:, None]
    y = torch.where(codes == 3, IGNORE, codes).to(torch.uint8)
    return x, y


def mask_of(x: torch.Tensor) -> torch.Tensor:
    """The mask the pattern's image implies, and which pixels are pure (exactly one level)."""
    values = x[:, 0].long()
    code = (values[..., None] == LEVELS).float().argmax(-1)
    pure = (values[..., None] == LEVELS).any(-1)
    return torch.where(code == 3, IGNORE, code).to(torch.uint8), pure


@pytest.mark.parametrize("kw", [{"crop_size": 40}, {"hflip": True}, {"vflip": True}, {"rot90": True},
                                {"crop_size": 32, "hflip": True, "vflip": True, "rot90": True}])
def test_exact_augmentations_keep_the_mask_a_function_of_the_image(kw):
    x, y = pattern()
    cfg = dataclasses.replace(AugmentConfig(), **kw)
    for seed in range(3):
        xa, ya = augment_pairs(x, y, cfg, hflip_ok=True, gen=torch.Generator().manual_seed(seed))
        implied, pure = mask_of(xa)
        assert pure.all()  # no interpolation: every pixel is still one of the levels
        assert torch.equal(ya, implied)
        if "crop_size" in kw:
            assert xa.shape[-1] == kw["crop_size"] and ya.shape[-1] == kw["crop_size"]


@pytest.mark.parametrize("kw", [{"scale": [0.7, 1.4]}, {"elastic_sigma": 4.0}, {"crop_size": 48, "scale": [0.8, 1.25],
                                                                              "elastic_sigma": 6.0, "rot90": True}])
def test_warps_keep_the_mask_aligned_and_the_ignore_value(kw):
    x, y = pattern(size=96)
    cfg = dataclasses.replace(AugmentConfig(), **kw)
    xa, ya = augment_pairs(x, y, cfg, hflip_ok=True, gen=torch.Generator().manual_seed(0))
    assert xa.dtype == torch.uint8 and ya.dtype == torch.uint8 and ya.shape == xa[:, 0].shape
    assert set(torch.unique(ya).tolist()) <= {0, 1, 2, IGNORE}  # nearest: never a blend of class indices
    assert (ya == IGNORE).any()  # the unlabelled value survives as itself
    implied, pure = mask_of(xa)
    assert pure.float().mean() > 0.6  # most pixels lie inside blocks, so the check below has teeth
    agree = (implied == ya)[pure].float().mean().item()
    assert agree > 0.97, f"image and mask moved apart: only {agree:.3f} of pure pixels agree"
    assert not torch.equal(xa, x[..., :xa.shape[-2], :xa.shape[-1]])  # something did move


def test_a_misaligned_pipeline_fails_the_alignment_check():
    """The check above catches a mask that is not moved with its image."""
    x, y = pattern()
    xa, _ = flip_pairs(x, y, -1, torch.Generator().manual_seed(1))
    implied, _ = mask_of(xa)
    assert not torch.equal(implied, y)


def test_flips_and_turns_match_torch_per_image():
    x, y = pattern(b=8)
    gen = torch.Generator().manual_seed(5)
    xr, yr = rotate_pairs(x, y, gen)
    for i in range(len(x)):
        k = next(k for k in range(4) if torch.equal(xr[i], x[i].rot90(k, (-2, -1))))
        assert torch.equal(yr[i], y[i].rot90(k, (-2, -1)))
    xf, yf = flip_pairs(x, y, -2, torch.Generator().manual_seed(6))
    for i in range(len(x)):
        flipped = torch.equal(xf[i], x[i].flip(-2))
        assert torch.equal(yf[i], y[i].flip(-2) if flipped else y[i])


def test_same_generator_same_draws():
    x, y = pattern()
    cfg = AugmentConfig(crop_size=32, hflip=True, rot90=True, scale=[0.8, 1.2], elastic_sigma=3.0)
    a = augment_pairs(x, y, cfg, True, torch.Generator().manual_seed(9))
    b = augment_pairs(x, y, cfg, True, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(augment_pairs(x, y, AugmentConfig(), True, torch.Generator())[0].numpy(), x.numpy())
