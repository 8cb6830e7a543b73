"""Optimizers, parameter groups, schedules and weight averaging, against direct computations and torch's own."""
import pytest
import torch
from torch import nn

from cvrecipe.config import load_config
from cvrecipe.train.ema import WeightEMA
from cvrecipe.train.muon import Muon, orthogonalize
from cvrecipe.train.optim import build_optimizer, lr_factor


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


def small_net() -> nn.Module:
    """Parameters: conv.weight (decay), conv.bias (bias), norm.weight/norm.bias (normalisation layer)."""
    return nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "norm": nn.BatchNorm2d(4)})


def test_per1024_units_match_the_speedrun_formulas():
    """lr per 1024 examples of summed loss, normalised by momentum gain; decay independent of lr."""
    cfg = load_config(None, ["optim.name=sgd", "optim.units=per1024", "optim.lr=11.5", "optim.momentum=0.85",
                             "optim.weight_decay=0.0153", "train.batch_size=1024", "optim.norm_lr_scale=64"])
    opt = build_optimizer(small_net(), cfg)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    weights, biases, norm = opt.param_groups  # (empty head groups are dropped)
    assert weights["lr"] == pytest.approx(11.5 * 1024 / kilostep)  # ≈ 1.5 for the batch-mean loss
    assert norm["lr"] == pytest.approx(64 * weights["lr"])
    # the per-step decay fraction lr·wd is weight_decay·B/kilostep, whatever the lr
    assert weights["lr"] * weights["weight_decay"] == pytest.approx(0.0153 * 1024 / kilostep)
    assert biases["weight_decay"] == 0 and norm["weight_decay"] == 0
    # half the batch: half the torch lr (same lr per example)
    cfg.train.batch_size = 512
    assert build_optimizer(small_net(), cfg).param_groups[0]["lr"] == pytest.approx(weights["lr"] / 2)


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "speedrun-net"])
def test_parameter_groups_follow_module_types_not_names(name):
    """Normalisation layers' parameters (named bn1, 1.weight, norm1.bias, ... in these models) get
    optim.norm_lr_scale and no decay; the last linear layer gets optim.head_lr_scale; other biases
    no decay; every trainable parameter is in exactly one group."""
    from cvrecipe.models import create_model

    cfg = load_config(None, ["optim.norm_lr_scale=64", "optim.head_lr_scale=0.5", "optim.lr=0.1"])
    model = create_model(name, num_classes=10, in_channels=3, input_size=(32, 32))
    groups = build_optimizer(model, cfg).param_groups
    owner = {id(p): (type(m), m) for m in model.modules() for p in m.parameters(recurse=False)}
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = 0
    for g in groups:
        for p in g["params"]:
            seen += 1
            kind, module = owner[id(p)]
            if issubclass(kind, nn.modules.batchnorm._NormBase):
                assert g["lr"] == pytest.approx(6.4) and g["weight_decay"] == 0
            elif module is head:
                assert g["lr"] == pytest.approx(0.05) and (g["weight_decay"] > 0) == (p.ndim > 1)
            else:
                assert g["lr"] == pytest.approx(0.1) and (g["weight_decay"] > 0) == (p.ndim > 1)
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
    assert any(issubclass(owner[id(p)][0], nn.modules.batchnorm._NormBase) for g in groups for p in g["params"])


def test_triangular_schedule_endpoints_and_peak():
    cfg = load_config(None, ["schedule.name=triangular", "schedule.peak_at=0.25", "schedule.ends=[0.2, 0.07]"])
    schedule = cfg.schedule
    assert lr_factor(0, 100, schedule, 10) == pytest.approx(0.2)
    assert lr_factor(25, 100, schedule, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, schedule, 10) == pytest.approx(0.07)
    assert lr_factor(12, 100, schedule, 10) == pytest.approx(0.2 + 0.8 * 12 / 25)


def test_muon_sgd_groups_step_exactly_like_torch_sgd():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = Muon([{"params": a.parameters(), "orthogonalize": False}], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        x = torch.randn(8, 5)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_muon_recipe_puts_conv_filters_under_muon():
    cfg = load_config("cifar10-speedrun-muon")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(net, cfg)
    muon = [g for g in opt.param_groups if g["orthogonalize"]]
    assert [p.shape for g in muon for p in g["params"]] == [torch.Size([4, 3, 3, 3])]
    assert muon[0]["lr"] == cfg.optim.muon_lr


def test_muon_normalize_rescales_each_filter_bank_before_its_orthogonal_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 5)
    before = w.detach().clone()
    opt = Muon([{"params": [w], "normalize": True, "ns_steps": 3}], lr=0.1, momentum=0.0, nesterov=False)
    w.grad = torch.randn_like(w)
    opt.step()
    rescaled = before * (8 ** 0.5 / before.norm())  # Frobenius norm sqrt(out channels) = sqrt(8)
    expected = rescaled - 0.1 * orthogonalize(w.grad.reshape(8, 36), steps=3).view_as(w)
    torch.testing.assert_close(w.detach(), expected)


def test_bias_end_epochs_ends_the_bias_schedule_early_and_leaves_the_others():
    """schedule.bias_end_epochs: the biases group (outside norm layers and the head) decays linearly
    to zero by that epoch and stays there; every other group follows schedule.name."""
    cfg = load_config(None, ["schedule.name=triangular", "schedule.peak_at=0", "schedule.ends=[1, 0]",
                             "schedule.bias_end_epochs=2", "train.epochs=8", "optim.bias_lr_scale=3"])
    from cvrecipe.train.optim import build_scheduler

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(net, cfg)
    kinds = [g["kind"] for g in opt.param_groups]
    peak = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert peak["biases"] == pytest.approx(3 * peak["weights"])
    scheduler = build_scheduler(opt, cfg, steps_per_epoch=10)
    seen = []
    for _ in range(80):
        seen.append({k: g["lr"] for k, g in zip(kinds, opt.param_groups)})
        opt.step(), scheduler.step()
    assert seen[10]["biases"] == pytest.approx(peak["biases"] * 0.5)  # halfway to epoch 2
    assert all(s["biases"] == 0 for s in seen[20:])
    assert seen[40]["weights"] == pytest.approx(peak["weights"] * 0.5)  # linear from the peak over 80 steps
