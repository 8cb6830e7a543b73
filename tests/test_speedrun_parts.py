"""Each speed trick on tiny tensors, against a direct computation."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cvrecipe.data.augment import alternating_flip
from cvrecipe.evaluate.tta import tta_logits, tta_views
from cvrecipe.models import create_model
from cvrecipe.models.speedrun import IdentityInitConv, image_patches, init_whitening
from cvrecipe.train.batchnorm import recalibrate_batchnorm
from cvrecipe.train.ema import WeightEMA
from cvrecipe.train.muon import Muon, orthogonalize


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


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_epochs():
    x = torch.arange(16 * 1 * 2 * 3, dtype=torch.float32).reshape(16, 1, 2, 3)
    base = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    for epoch in range(4):
        a, b = alternating_flip(x, base, epoch), alternating_flip(x, base, epoch + 1)
        flipped_a = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(a, x)])
        flipped_b = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(b, x)])
        assert torch.equal(flipped_a ^ flipped_b, torch.ones(16, dtype=torch.bool))


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


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_muon_update_is_orthogonal_within_tolerance(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Newton–Schulz aims at ~[0.7, 1.2], not exactly 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cosine > 0.95


def test_muon_step_moves_weights_by_an_orthogonal_update():
    w = torch.nn.Parameter(torch.zeros(8, 4, 3, 3))
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False)
    w.grad = torch.randn_like(w)
    opt.step()
    update = (-w.detach() / 0.1).reshape(8, 36)
    assert torch.allclose(update, orthogonalize(w.grad.reshape(8, 36)), atol=1e-5)


def test_weight_ema_math_and_lookahead():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, decay=0.9)
    assert torch.allclose(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1))
    assert torch.allclose(model.weight, start + 1)  # plain EMA leaves the model alone
    ema.update(model, decay=0.5, lookahead=True)
    expected = 0.5 * (0.9 * start + 0.1 * (start + 1)) + 0.5 * (start + 1)
    assert torch.allclose(model.weight, expected) and torch.allclose(ema.shadow["weight"], expected)


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


def _speedrun_model(size: int = 12):
    return create_model("speedrun-net", num_classes=10, in_channels=3, input_size=(size, size),
                        mean=[0.5] * 3, std=[0.25] * 3, widths=[8, 16, 16])


def test_batchnorm_recalibration_is_the_batch_statistics_of_the_sample():
    """Every BN's running mean/var become the mean and unbiased variance of its own input over the
    sampled images (one batch here), as captured from a training-mode forward pass of that sample."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 12, 12), generator=gen, dtype=torch.uint8)
    model, reference = _speedrun_model(), _speedrun_model()
    reference.load_state_dict(model.state_dict())
    norms = lambda m: [n for n in m.modules() if isinstance(n, torch.nn.BatchNorm2d)]  # noqa: E731
    for norm in norms(model):  # stale statistics that the recalibration must replace, not blend with
        norm.running_mean.fill_(3.0), norm.running_var.fill_(7.0)
    pick = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:30]  # the sample it draws
    inputs = []
    for norm in norms(reference):
        norm.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        reference.train()(images[pick])

    model.eval()
    recalibrate_batchnorm(model, images, 30, 64, torch.Generator().manual_seed(1))
    assert not model.training  # mode kept
    assert len(inputs) == len(norms(model)) == 6
    for norm, x in zip(norms(model), inputs):
        torch.testing.assert_close(norm.running_mean, x.mean((0, 2, 3)))
        torch.testing.assert_close(norm.running_var, x.var((0, 2, 3), unbiased=True))


def test_batchnorm_recalibration_averages_over_batches_and_follows_the_sample():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 12), generator=gen, dtype=torch.uint8)
    model = _speedrun_model()
    first = model.net[2].norm1

    def stats(count, batch, seed):
        recalibrate_batchnorm(model, images, count, batch, torch.Generator().manual_seed(seed))
        return first.running_mean.clone(), first.running_var.clone()

    # the first BN's input does not depend on the batch's split, so its mean over 4 batches of 10 is
    # the mean over all 40 images; its variance is the average of the 4 per-batch variances
    mean_all, var_all = stats(40, 40, 0)
    mean_4, var_4 = stats(40, 10, 0)
    torch.testing.assert_close(mean_4, mean_all)
    assert not torch.allclose(var_4, var_all)
    assert torch.equal(stats(10, 10, 5)[0], stats(10, 10, 5)[0])  # seeded: the same sample
    assert not torch.allclose(stats(10, 10, 5)[0], stats(10, 10, 6)[0])  # another seed, another sample
    with pytest.raises(ValueError, match="bn_recalibrate"):
        stats(0, 10, 0)
