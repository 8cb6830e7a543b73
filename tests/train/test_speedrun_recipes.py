"""The speedrun recipes as the training loop runs them: the CPU variant's invariants, EMA and the
alternating flip through resume, the whitening bias's epochs, checkpoints spaced in time, training
without a val split, and a short run of the recipe itself that learns."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.train.loop import fit

from conftest import SHARED_DATA, tiny_speedrun

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


def test_cpu_recipe_is_the_speedrun_in_smaller_batches_over_the_same_images():
    """cifar10-speedrun-cpu changes the batch and only what counts in steps, so that every setting
    still spans as many images as in cifar10-speedrun, and trains one epoch longer."""
    base, cpu = load_config("cifar10-speedrun"), load_config("cifar10-speedrun-cpu")
    ratio = base.train.batch_size / cpu.train.batch_size
    assert ratio == 4
    assert cpu.average.every * cpu.train.batch_size == base.average.every * base.train.batch_size
    # running statistics keep k of the old per step: k_cpu^ratio = k_base per 1024 images
    keep_base, keep_cpu = base.model.kwargs["bn_momentum"], cpu.model.kwargs["bn_momentum"]
    assert keep_cpu ** ratio == pytest.approx(keep_base, abs=0.005)
    # and nothing else moved (lr and weight decay are per 1024 examples already)
    assert cpu.train.epochs == base.train.epochs + 1
    for section, changed in (("train", {"batch_size", "epochs"}), ("average", {"every"}), ("optim", set()),
                             ("schedule", set()), ("augment", set()), ("eval", set()), ("data", set())):
        a, b = getattr(base, section).__dict__, getattr(cpu, section).__dict__
        assert {k for k in a if a[k] != b[k]} == changed, section
    assert {k for k in base.model.kwargs if base.model.kwargs[k] != cpu.model.kwargs[k]} == {"bn_momentum"}


def test_resume_with_ema_and_alternating_flip_is_exact(tmp_path):
    """EMA state and the per-run flip coins survive a stop/resume: same weights as one go."""
    cfg = tiny_speedrun(tmp_path)
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
    cfg = tiny_speedrun(tmp_path, ["train.epochs=3", "average.name=none", "model.kwargs.whiten_bias_epochs=1"])
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
    cfg = tiny_speedrun(tmp_path, ["train.epochs=3", "checkpoint.every_s=3600"])
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
    fit(tiny_speedrun(tmp_path, ["train.epochs=3"]), ds, run_dir, callbacks=[Look()])
    assert seen == [(False, False), (True, True), (True, True)]


def test_no_val_split_trains_on_everything_and_keeps_the_last_weights(tmp_path):
    cfg = tiny_speedrun(tmp_path, ["train.epochs=2", "average.name=ema"])
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
        fit(tiny_speedrun(tmp_path, ["stop.early=true"]), ds, tmp_path / "run")


@pytest.mark.slow
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
