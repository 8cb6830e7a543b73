"""Sanity checks: all pass on a healthy setup, each fails on the breakage it exists to catch, they
leave the RNG and the training run untouched, and a fail stops `train` with a clear message."""
import copy
import csv
import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvrecipe.tasks import get_task
from cvrecipe.train import sanity
from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.models.head import class_prior, classifier_head
from cvrecipe.models.registry import register
from cvrecipe.train.job import train
from cvrecipe.artifact.checkpoint import load_resume

SCORE = get_task("classification").item_scores  # top-1 right, cross-entropy
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("digits-quick")
    return cfg, load_dataset(cfg.data, seed=cfg.train.seed)


def batches(ds, n_train=1920, n_held=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    train = sanity._draw(ds.train.x, ds.train.y, n_train, gen)
    held = sanity._draw(ds.val.x, ds.val.y, n_held, gen)
    return train, held, gen


def identity_inputs(x, y, gen):
    return x


@pytest.mark.slow
def test_cli_doctor_passes_a_healthy_recipe_and_restores_the_rng(capsys):
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert main(["doctor", "digits-quick"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"(init-loss|overfit|zero-input|label-leak)\s+│ (\w+)", out) == [
        ("init-loss", "pass"), ("overfit", "pass"), ("zero-input", "pass"), ("label-leak", "pass")]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_init_loss_fails_on_mis_scaled_logits(digits):
    cfg, ds = digits
    model = sanity.initial_model(cfg, ds)
    (x, y), _, _ = batches(ds)
    healthy = sanity.check_init_loss(model, x[:256], y[:256], F.cross_entropy, math.log(10), CPU)
    assert healthy.status == "pass" and healthy.values["deviation"] < 0.15
    with torch.no_grad():
        classifier_head(model).weight.mul_(50)  # logits 50× too large: confident nonsense at init
    broken = sanity.check_init_loss(model, x[:256], y[:256], F.cross_entropy, math.log(10), CPU)
    assert broken.status == "fail" and broken.values["loss"] > 2 * math.log(10)


def test_overfit_fails_on_a_frozen_model_and_a_loss_that_ignores_labels(digits, monkeypatch):
    monkeypatch.setattr(sanity, "OVERFIT_STEPS", 40)  # the healthy model needs ~10 here; keeps the test quick
    cfg, ds = digits
    model = sanity.initial_model(cfg, ds)
    (x, y), _, _ = batches(ds)
    frozen = copy.deepcopy(model).requires_grad_(False)
    result = sanity.check_overfit_batch(frozen, x[:32], y[:32], F.cross_entropy, CPU, SCORE)
    assert result.status == "fail" and "no trainable parameters" in result.message

    def wrong_loss(logits, y):  # pushes every image towards class 0, whatever its label
        return F.cross_entropy(logits, torch.zeros_like(y))

    result = sanity.check_overfit_batch(model, x[:32], y[:32], wrong_loss, CPU, SCORE)
    assert result.status == "fail" and result.values["accuracy"] < 0.5


def test_zero_input_fails_when_labels_are_shuffled(digits):
    cfg, ds = digits
    model = sanity.initial_model(cfg, ds)
    (x, y), (hx, hy), gen = batches(ds)
    healthy = sanity.check_zero_input(model, (x, y), (hx, hy), F.cross_entropy, identity_inputs, gen, CPU, SCORE)
    assert healthy.status == "pass"
    shuffle = torch.Generator().manual_seed(5)
    y_bad, hy_bad = y[torch.randperm(len(y), generator=shuffle)], hy[torch.randperm(len(hy), generator=shuffle)]
    broken = sanity.check_zero_input(model, (x, y_bad), (hx, hy_bad), F.cross_entropy, identity_inputs, gen, CPU, SCORE)
    assert broken.status == "fail" and broken.values["accuracy_sigmas"] < healthy.values["accuracy_sigmas"]


def test_label_leak_fails_when_the_pipeline_writes_the_label_into_the_image(digits):
    cfg, ds = digits
    model = sanity.initial_model(cfg, ds)
    (x, y), (hx, hy), gen = batches(ds)
    healthy = sanity.check_label_leak(model, (x, y), (hx, hy), F.cross_entropy, identity_inputs, gen, CPU, SCORE)
    assert healthy.status == "pass"

    def leaky_inputs(images, labels, gen):  # a pipeline bug: the label ends up in the top half
        images = images.clone()
        images[:, :, :4, :] = (labels * 25).to(torch.uint8)[:, None, None, None]
        return images

    broken = sanity.check_label_leak(model, (x, y), (hx, hy), F.cross_entropy, leaky_inputs, gen, CPU, SCORE)
    assert broken.status == "fail" and broken.values["sigmas"] > sanity.LEAK_SIGMAS_FAIL


class _Capture:
    """Callback recording the model training starts from."""

    def on_train_start(self, model, cfg, run_dir):
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in rows]


@pytest.mark.slow
def test_training_is_identical_with_and_without_checks(tmp_path):
    runs = {}
    for flag in ("true", "false"):
        capture = _Capture()
        cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", f"name=sanity-{flag}", "train.epochs=2",
                                           "data.subset=200", f"train.sanity={flag}"])
        runs[flag] = (train(cfg, callbacks=[capture]), capture.initial)
    (with_dir, with_init), (without_dir, without_init) = runs["true"], runs["false"]
    assert [c["status"] for c in json.loads((with_dir / "run.json").read_text())["sanity"]] == ["pass"] * 4
    assert all(torch.equal(with_init[k], without_init[k]) for k in with_init)
    checked = sanity.initial_model(cfg, load_dataset(cfg.data, seed=0)).state_dict()  # what the checks copy
    assert all(torch.equal(checked[k], with_init[k]) for k in with_init)
    assert _metrics(with_dir) == _metrics(without_dir)
    wa, wb = load_resume(with_dir / "last.ckpt")["model"], load_resume(without_dir / "last.ckpt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _HotLogits(nn.Module):
    """A real, trainable model whose initial logits are 40× too large."""

    def __init__(self, num_classes, in_channels, input_size, dropout=0.0, **_):
        super().__init__()
        self.fc = nn.Linear(in_channels * input_size[0] * input_size[1], num_classes)
        with torch.no_grad():
            self.fc.weight.mul_(40)

    def forward(self, x):
        return self.fc(x.flatten(1))


register("test-hot-logits")(_HotLogits)


@pytest.mark.slow
def test_a_failed_check_stops_train_unless_skipped(tmp_path, capsys):
    args = ["digits-quick", f"runs_dir={tmp_path}", "name=hot", "model.name=test-hot-logits", "train.epochs=1"]
    assert main(["train", *args]) == 2
    printed = capsys.readouterr()
    out = printed.out + printed.err  # the checks' table on stdout, the error line on stderr
    assert "sanity check(s) failed" in out and "init-loss" in out and "--no-sanity" in out
    assert not (tmp_path / "hot").exists()  # nothing started, no half-made run folder
    assert main(["train", *args, "--no-sanity"]) == 0
    assert (tmp_path / "hot" / "best.safetensors").is_file()


def test_bias_prior_sets_log_prior_and_the_expected_init_loss(digits):
    cfg, ds = digits
    keep = np.flatnonzero((ds.train.y != 0) | (np.arange(len(ds.train.y)) % 5 == 0))  # class 0 rare
    skewed = copy.copy(ds)
    skewed.train = ds.train.take(keep)
    prior_cfg = load_config("digits-quick", ["model.init_bias_prior=true"])
    model = sanity.initial_model(prior_cfg, skewed)
    prior = class_prior(skewed.train.y, 10)
    np.testing.assert_allclose(classifier_head(model).bias.detach().numpy(), np.log(prior), rtol=1e-6)
    x, y = torch.from_numpy(skewed.train.x[:512]), torch.from_numpy(skewed.train.y[:512])
    expected = sanity._expected_init_loss(prior_cfg, skewed, y, 10)
    assert expected == pytest.approx(float(-np.log(prior[y.numpy()]).mean()))
    assert sanity.check_init_loss(model, x, y, F.cross_entropy, expected, CPU).status == "pass"
