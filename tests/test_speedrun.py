"""The speedrun recipe's switches as the training loop uses them: optimizer units, schedule, Muon's
SGD groups, EMA/alternating flip through resume, training without a val split, TTA at evaluation,
and a short run of the recipe itself that learns."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cvrecipe.config import TrainConfig, load_config
from cvrecipe.data import load_dataset
from cvrecipe.evaluate.predict import predict_logits
from cvrecipe.evaluate.tta import tta_logits
from cvrecipe.runs import evaluate
from cvrecipe.train.checkpoint import load_model
from cvrecipe.train.loop import fit
from cvrecipe.train.muon import Muon
from cvrecipe.train.optim import build_optimizer, lr_factor

from conftest import SHARED_DATA, make_image_folder

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


def small_net() -> nn.Module:
    """Parameters: conv.weight (decay), conv.bias (bias), norm.weight/norm.bias (norm biases)."""
    return nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "norm": nn.BatchNorm2d(4)})


def test_per1024_units_match_the_speedrun_formulas():
    """lr per 1024 examples of summed loss, normalised by momentum gain; decay independent of lr."""
    cfg = TrainConfig(optimizer="sgd", units="per1024", lr=11.5, momentum=0.85, weight_decay=0.0153,
                      batch_size=1024, bias_lr_scale=64)
    opt = build_optimizer(small_net(), cfg)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    weights, biases, norm_biases = opt.param_groups
    assert weights["lr"] == pytest.approx(11.5 * 1024 / kilostep)  # ≈ 1.5 for the batch-mean loss
    assert norm_biases["lr"] == pytest.approx(64 * weights["lr"])
    # the per-step decay fraction lr·wd is weight_decay·B/kilostep, whatever the lr
    assert weights["lr"] * weights["weight_decay"] == pytest.approx(0.0153 * 1024 / kilostep)
    assert biases["weight_decay"] == 0 and norm_biases["weight_decay"] == 0
    # half the batch: half the torch lr (same lr per example)
    half = build_optimizer(small_net(), TrainConfig(**{**cfg.__dict__, "batch_size": 512}))
    assert half.param_groups[0]["lr"] == pytest.approx(weights["lr"] / 2)


def test_cpu_recipe_is_the_speedrun_in_smaller_batches_over_the_same_images():
    """cifar10-speedrun-cpu changes the batch and only what counts in steps, so that every setting
    still spans as many images as in cifar10-speedrun, and trains one epoch longer."""
    base, cpu = load_config("cifar10-speedrun"), load_config("cifar10-speedrun-cpu")
    ratio = base.train.batch_size / cpu.train.batch_size
    assert ratio == 4
    assert cpu.train.ema_every * cpu.train.batch_size == base.train.ema_every * base.train.batch_size
    # running statistics keep k of the old per step: k_cpu^ratio = k_base per 1024 images
    keep_base, keep_cpu = base.model.kwargs["bn_momentum"], cpu.model.kwargs["bn_momentum"]
    assert keep_cpu ** ratio == pytest.approx(keep_base, abs=0.005)
    # and nothing else moved (lr and weight decay are per 1024 examples already)
    assert cpu.train.epochs == base.train.epochs + 1
    for section, changed in (("train", {"batch_size", "ema_every", "epochs"}), ("augment", set()), ("eval", set()), ("data", set())):
        a, b = getattr(base, section).__dict__, getattr(cpu, section).__dict__
        assert {k for k in a if a[k] != b[k]} == changed, section
    assert {k for k in base.model.kwargs if base.model.kwargs[k] != cpu.model.kwargs[k]} == {"bn_momentum"}


def test_triangular_schedule_endpoints_and_peak():
    cfg = TrainConfig(schedule="triangular", onecycle_pct=0.25, triangle_ends=[0.2, 0.07])
    assert lr_factor(0, 100, cfg, 10) == pytest.approx(0.2)
    assert lr_factor(25, 100, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg, 10) == pytest.approx(0.07)
    assert lr_factor(12, 100, cfg, 10) == pytest.approx(0.2 + 0.8 * 12 / 25)


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
    cfg = load_config("cifar10-speedrun-muon").train
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(net, cfg)
    muon = [g for g in opt.param_groups if g["orthogonalize"]]
    assert [p.shape for g in muon for p in g["params"]] == [torch.Size([4, 3, 3, 3])]
    assert muon[0]["lr"] == cfg.muon_lr


def _tiny_speedrun(tmp_path, overrides=()):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 10}, size=16)
    return load_config("cifar10-speedrun", [f"data.name=folder:{data}", "model.kwargs.widths=[8, 16, 16]",
                                            "train.batch_size=32", "train.epochs=4", "train.ema_every=1",
                                            "train.log_every=1", "train.deterministic=true", "train.checkpoint_every_s=0",
                                            *overrides])


def test_resume_with_ema_and_alternating_flip_is_exact(tmp_path):
    """EMA state and the per-run flip coins survive a stop/resume: same weights as one go."""
    cfg = _tiny_speedrun(tmp_path)
    ds = load_dataset(cfg.data, seed=0)
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    fit(cfg, ds, full)
    with pytest.raises(KeyboardInterrupt):  # stopped during epoch 3's bookkeeping: last.ckpt holds 2
        fit(cfg, ds, part, callbacks=[StopAt(3)])
    assert torch.load(part / "last.ckpt", weights_only=True)["epoch"] == 2
    fit(cfg, ds, part, resume=True)
    a, b = load_file(full / "best.safetensors"), load_file(part / "best.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


class StopAt:
    """A callback that interrupts training at the end of epoch `epoch`, before its checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, row, model):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_whitening_bias_trains_for_its_epochs_then_stays(tmp_path):
    cfg = _tiny_speedrun(tmp_path, ["train.epochs=3", "train.ema=none", "model.kwargs.whiten_bias_epochs=1"])
    ds = load_dataset(cfg.data, seed=0)
    biases, convs = [], []

    class Record:
        def on_epoch_end(self, row, model):
            biases.append(model.net[0].bias.detach().clone())
            convs.append(model.net[2].conv1.weight.detach().clone())

    fit(cfg, ds, tmp_path / "run", callbacks=[Record()])
    assert biases[0].abs().sum() > 0  # initialised at zero, trained during epoch 1
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])
    assert not torch.equal(convs[1], convs[2])  # while the rest of the network went on training


def test_checkpoints_can_be_spaced_out_in_time(tmp_path):
    """checkpoint_every_s longer than the run: nothing is written until the last epoch, which is."""
    cfg = _tiny_speedrun(tmp_path, ["train.epochs=3", "train.checkpoint_every_s=3600"])
    ds = load_dataset(cfg.data, seed=0)
    run_dir = tmp_path / "run"
    seen = []

    class Look:
        def on_epoch_end(self, row, model):
            seen.append(((run_dir / "last.ckpt").exists(), (run_dir / "best.safetensors").exists()))

    fit(cfg, ds, run_dir, callbacks=[Look()])
    assert seen == [(False, False)] * 3  # on_epoch_end runs before that epoch's writes
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 3
    assert load_file(run_dir / "best.safetensors")

    every_epoch = tmp_path / "every"
    seen.clear()
    run_dir = every_epoch
    fit(_tiny_speedrun(tmp_path, ["train.epochs=3"]), ds, run_dir, callbacks=[Look()])
    assert seen == [(False, False), (True, True), (True, True)]


def test_no_val_split_trains_on_everything_and_keeps_the_last_weights(tmp_path):
    cfg = _tiny_speedrun(tmp_path, ["train.epochs=2", "train.ema=ema"])
    ds = load_dataset(cfg.data, seed=0)
    assert len(ds.val) == 0 and len(ds.train) == 120
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = fit(cfg, ds, run_dir)
    assert all(math.isnan(row["val_acc"]) for row in history)
    saved = load_file(run_dir / "best.safetensors")
    resume = torch.load(run_dir / "last.ckpt", weights_only=True)
    for key, value in resume["ema"].items():  # the saved model is the weight average
        torch.testing.assert_close(saved[key], value.cpu(), msg=key)
    with pytest.raises(ValueError, match="val_fraction"):
        fit(_tiny_speedrun(tmp_path, ["train.early_stopping=true"]), ds, tmp_path / "run")


def test_bn_recalibration_touches_only_the_saved_weights(tmp_path):
    """With train.bn_recalibrate the saved average has BatchNorm statistics recomputed for its own
    weights: the same as recalibrating the plain run's saved average with the run's sample; the
    weights themselves, and the training state in last.ckpt, are as without it."""
    from cvrecipe.train.batchnorm import recalibrate_batchnorm
    from cvrecipe.train.loop import epoch_generator

    ds = load_dataset(_tiny_speedrun(tmp_path).data, seed=0)
    runs = {}
    for count in (0, 64):
        run_dir = tmp_path / f"run{count}"
        run_dir.mkdir()
        fit(_tiny_speedrun(tmp_path, ["train.epochs=2", f"train.bn_recalibrate={count}"]), ds, run_dir)
        runs[count] = (load_file(run_dir / "best.safetensors"), torch.load(run_dir / "last.ckpt", weights_only=True))
    (plain, plain_ckpt), (recal, recal_ckpt) = runs[0], runs[64]
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.allclose(plain[k], recal[k]) for k in stats)
    for key in set(plain) - set(stats) - {k for k in plain if k.endswith("num_batches_tracked")}:
        torch.testing.assert_close(plain[key], recal[key], msg=key)
    for key, value in plain_ckpt["model"].items():
        torch.testing.assert_close(value, recal_ckpt["model"][key], msg=key)

    model = load_model(tmp_path / "run0")  # the plain run's average, recalibrated here as the run did it
    recalibrate_batchnorm(model, torch.from_numpy(ds.train.x), 64, 32, epoch_generator(0, -2, torch.device("cpu")),
                          torch.bfloat16, torch.channels_last)
    for key in stats:
        torch.testing.assert_close(model.state_dict()[key], recal[key], msg=key)
    with pytest.raises(ValueError, match="bn_recalibrate"):
        fit(_tiny_speedrun(tmp_path, ["train.bn_recalibrate=-1"]), ds, tmp_path / "run0")


@pytest.mark.parametrize("hflip", [True, False])
def test_evaluation_uses_the_recipes_tta(tmp_path, hflip):
    """TTA 2 as the recipe asks; a model trained without flips is not shown mirrored views."""
    cfg = _tiny_speedrun(tmp_path, ["train.epochs=1", f"runs_dir={tmp_path / 'runs'}", "train.sanity=false",
                                    f"augment.hflip={str(hflip).lower()}"])
    from cvrecipe.runs import _evaluate, train

    run_dir = train(cfg)
    result, logits = _evaluate(run_dir)
    assert result["tta"] == 2
    model = load_model(run_dir)
    ds = load_dataset(cfg.data, seed=0)
    x = torch.from_numpy(ds.test.x)
    with torch.no_grad():
        model.eval()
        expected = tta_logits(model, x, 2, mirror=hflip)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(expected, tta_logits(model, x, 2, mirror=not hflip))
    assert result["accuracy"] == pytest.approx((expected.argmax(1) == torch.from_numpy(ds.test.y)).float().mean().item())
    torch.testing.assert_close(predict_logits(model, x, 7, tta=2, tta_mirror=hflip), expected)


@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"needs the CIFAR-10 JPEG archive at {CIFAR_JPEG}")
def test_speedrun_recipe_learns_on_a_cifar_subset(tmp_path):
    """The real recipe (whitening from data, per-1024 units, Lookahead, alternating flip) on 2,000
    CIFAR-10 images for 4 epochs at batch 128: well above the 10% of chance on 1,000 test images."""
    cfg = load_config("cifar10-speedrun", [f"data.name=folder:{CIFAR_JPEG}", "data.subset=2000",
                                           "train.epochs=4", "train.batch_size=128"])
    ds = load_dataset(cfg.data, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fit(cfg, ds, run_dir)
    model = load_model(run_dir)
    logits = predict_logits(model, ds.test.x[:1000], 500, tta=2)
    accuracy = (logits.argmax(1) == torch.from_numpy(ds.test.y[:1000])).float().mean().item()
    assert accuracy > 0.3
