"""The speedrun network's parts on tiny tensors, against a direct computation."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cvrecipe.models import create_model
from cvrecipe.models.speedrun import IdentityInitConv, image_patches, init_whitening


def test_whitening_makes_patch_covariance_identity():
    gen = torch.Generator().manual_seed(0)
    # strongly correlated channels and neighbouring pixels: a smooth colour image
    base = torch.rand(200, 1, 12, 12, generator=gen)
    smooth = F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = (torch.cat([smooth, 0.8 * smooth + 0.2 * torch.rand(200, 1, 12, 12, generator=gen),
                         torch.rand(200, 1, 12, 12, generator=gen)], 1) * 255).to(torch.uint8)
    model = create_model("speedrun-net", num_classes=10, in_channels=3, input_size=(12, 12),
                         mean=[0.5] * 3, std=[0.25] * 3)
    init_whitening(model, images, eps=1e-8)
    whiten = model.net[0]
    with torch.no_grad():
        out = F.conv2d(model.normalize(images), whiten.weight[:12])  # first half: (N, 12, 11, 11)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-3)
    assert torch.equal(whiten.weight[12:], -whiten.weight[:12]) and not whiten.weight.requires_grad


def test_padded_whitening_keeps_the_image_size_and_repeats_edge_pixels():
    model = create_model("speedrun-net", num_classes=10, in_channels=1, input_size=(28, 28),
                         whiten_kernel=3, whiten_padding=1)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    init_whitening(model, images)
    whiten = model.net[0]
    x = model.normalize(images)
    with torch.no_grad():
        ours = whiten(x)
        ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), whiten.weight, whiten.bias)
    assert ours.shape == (8, 18, 28, 28) and torch.allclose(ours, ref, atol=1e-5)
    assert model(images).shape == (8, 10)


def test_a_third_conv_per_group_adds_layers_and_keeps_the_two_conv_names():
    two = create_model("speedrun-net", num_classes=10, in_channels=1, input_size=(28, 28))
    three = create_model("speedrun-net", num_classes=10, in_channels=1, input_size=(28, 28), convs_per_group=3)
    keys2, keys3 = set(two.state_dict()), set(three.state_dict())
    assert keys2 < keys3  # checkpoints of the 2-conv net keep their parameter names
    added = {k.split(".")[2] for k in keys3 - keys2}
    assert added == {"conv3", "norm3"}
    assert three(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)).shape == (2, 10)


def test_image_patches_match_unfold():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    ours = image_patches(x, 2)
    ref = F.unfold(x, 2).transpose(1, 2).reshape(-1, 12)  # unfold orders (C, kh, kw) the same way
    assert torch.equal(ours, ref)


def test_identity_init_conv_passes_input_through():
    conv = IdentityInitConv(4, 8)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(conv(x)[:, :4], x, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_max_pool_matches_max_pool_and_keeps_no_indices(dtype):
    from cvrecipe.models.speedrun import LeanMaxPool2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 15, 15, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    x[:, :, :2, :2] = 5.0  # a tie in the first window: the gradient goes to one maximum only, as in torch's
    grad = torch.randn(4, 8, 7, 7, generator=gen).to(dtype)
    lean_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        lean = LeanMaxPool2d(2)(lean_x)
    ref = torch.nn.MaxPool2d(2)(ref_x)
    assert torch.equal(lean, ref)
    lean.backward(grad)
    ref.backward(grad)
    assert torch.equal(lean_x.grad, ref_x.grad)
    assert torch.int64 not in saved  # only the input is kept; indices are found again in backward
    with torch.no_grad():  # evaluation and export take the plain pooling path
        assert torch.equal(LeanMaxPool2d(2).eval()(x), ref.detach())


def test_head_init_std_rescales_only_the_heads_start():
    torch.manual_seed(0)
    net = create_model("speedrun-net", num_classes=10, in_channels=3, input_size=(16, 16), widths=[8, 16, 16],
                       head_init_std=1.0).net
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.weight.std().item() == pytest.approx(1.0, rel=1e-5)
