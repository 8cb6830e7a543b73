"""The training loop: batches in the epoch's order, early stopping, process settings held for one
run, NaN handling, and a run killed with SIGKILL that resumes bit-identical."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.config import AugmentConfig, load_config
from cvrecipe.data.augment import crop_at
from cvrecipe.models.registry import register
from cvrecipe.tasks import get_task
from cvrecipe.train.job import train
from cvrecipe.train.feed import DeviceArrays, Feed
from cvrecipe.train.loop import TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_early_stopping_stops_and_keeps_best(tmp_path):
    # lr=1e-9: the weights barely move and the val loss by less than min_delta, so patience 2 stops after epoch 3
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=20", "optim.lr=1e-9",
                                       "train.sanity=false", "stop.early=true", "stop.patience=2",
                                       "checkpoint.monitor=val_loss", "checkpoint.mode=min", "stop.min_delta=0.05"])
    run_dir = train(cfg)
    assert len(read_metrics(run_dir)) == 3
    train(cfg, resume_dir=run_dir)  # resuming a run that stopped early does not train on
    assert len(read_metrics(run_dir)) == 3


def test_a_run_of_few_optimizer_steps_says_so(tmp_path, capsys):
    """digits-quick's 8 epochs of ~20 steps pass quietly; 2 epochs at batch 256 (~5 steps each) are
    named, with the way out."""
    train(load_config("digits-quick", [f"runs_dir={tmp_path}", "train.sanity=false"]))
    assert "optimizer steps in all" not in capsys.readouterr().out
    train(load_config("digits-quick", [f"runs_dir={tmp_path}", "train.sanity=false", "train.epochs=2",
                                       "train.batch_size=256"]))
    out = " ".join(capsys.readouterr().out.split())
    assert "train: 2 epochs x 5 steps of 256 images" in out and "= 10 optimizer steps in all, under 100" in out
    assert "a smaller train.batch_size or more train.epochs" in out


class _SettingsSeen:
    """A training callback that records torch's process-wide settings while the run trains."""

    def on_train_start(self, model, cfg, run_dir):
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.threads = torch.get_num_threads()


def test_deterministic_kernels_and_thread_count_hold_for_the_run_only(tmp_path):
    threads = torch.get_num_threads()
    seen = _SettingsSeen()
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=1", "train.sanity=false",
                                       "train.deterministic=true", f"train.num_threads={threads + 1}"])
    train(cfg, callbacks=[seen])
    assert seen.deterministic and seen.threads == threads + 1
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads


class _NanAfter(nn.Module):
    """A real model that starts producing NaN after `steps` training forward passes."""

    def __init__(self, num_classes, in_channels, input_size, steps=5, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(in_channels * input_size[0] * input_size[1], num_classes)
        self.steps = steps
        self.calls = 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                out = out * float("nan")
        return out


register("test-nan-after")(_NanAfter)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    # digits: 1,437 train images → 1,293 after val → 20 steps per epoch at batch 64; NaN in epoch 2
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "model.name=test-nan-after",
                                       "model.kwargs={steps: 30}", "train.epochs=5", "train.log_every=5",
                                       "train.sanity=false"])  # the overfit check would catch it first
    with pytest.raises(TrainingDiverged, match=r"nan during epoch 2.*last good checkpoint \(end of epoch 1\) is kept"):
        train(cfg)
    ckpt = load_resume(tmp_path / "digits-quick" / "last.ckpt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _train_cmd(run_dir_parent, extra=()):
    return [sys.executable, "-m", "cvrecipe", "train", "digits-quick", f"runs_dir={run_dir_parent}", "name=r",
            "train.epochs=30", "train.num_threads=1", "--deterministic", "model.dropout=0.2", *extra]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight), check=True, env=env, capture_output=True, cwd=ROOT, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "r" / "last.ckpt"
    deadline = time.time() + 240
    # killed as soon as the first checkpoint exists, with 29 epochs to go: still running however fast the machine
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_resume(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_resume(ckpt)["epoch"] < 30

    subprocess.run([sys.executable, "-m", "cvrecipe", "train", "--resume", str(killed / "r")], check=True,
                   env=env, capture_output=True, cwd=ROOT, timeout=300)
    a, b = read_metrics(straight / "r"), read_metrics(killed / "r")
    timing = {"epoch_time_s", "images_per_s"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in a] == \
           [{k: v for k, v in row.items() if k not in timing} for row in b]
    wa, wb = load_resume(straight / "r" / "last.ckpt")["model"], load_resume(killed / "r" / "last.ckpt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_epoch_batches_in_chunks_follow_the_order_and_augment_each_image_from_itself():
    """What the training loop feeds: batches in the epoch's order, whether augmented one at a time
    (CPU) or several at once (GPU), each image a crop/mirror of its own source."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.arange(100)
    base_flip = torch.rand(100, generator=gen) < 0.5

    def feed(augment, chunk):
        return Feed(DeviceArrays(x, y), get_task("classification"), augment, True, base_flip, batch=16, steps=6,
                    memory_format=torch.channels_last, chunk=chunk)

    order = torch.randperm(100, generator=gen)
    for chunk in (1, 4, 6):
        batches = list(feed(AugmentConfig(), chunk).epoch(order, gen, 0))
        assert len(batches) == 6  # the ragged last 4 images are dropped
        for i, (bx, by) in enumerate(batches):
            idx = order[i * 16:(i + 1) * 16]
            assert torch.equal(by, y[idx]) and torch.equal(bx, x[idx])
            assert bx.is_contiguous(memory_format=torch.channels_last)

    augment = AugmentConfig(hflip=True, flip_mode="alternate", crop_padding=2)
    for bx, by in feed(augment, 6).epoch(order, gen, 1):
        for image, label in zip(bx, by):
            src = x[label][None]
            views = [crop_at(src, 2, torch.tensor([dy]), torch.tensor([dx]), "reflect")[0]
                     for dy in range(5) for dx in range(5)]
            flipped = bool(base_flip[label]) ^ True  # odd epoch: the opposite of the run's coin
            views = [v.flip(-1) if flipped else v for v in views]
            assert any(torch.equal(image, v) for v in views)


def test_the_loop_takes_loss_augmentation_and_metrics_from_the_task(tmp_path, monkeypatch):
    """The seam a new task plugs into: the loop's loss, augmentation of (image, target) and
    metrics all come from the task object, so a task with its own lands in metrics.csv."""
    from cvrecipe import tasks
    from cvrecipe.tasks.classification import AccuracyMeter, Classification

    calls = {"loss": 0, "augment": 0}

    class Counted(Classification):
        def loss(self, outputs, targets, label_smoothing=0.0):
            calls["loss"] += 1
            return super().loss(outputs, targets, label_smoothing)

        def augment(self, x, y, *args, **kwargs):
            calls["augment"] += 1
            return super().augment(x, y, *args, **kwargs)

        def meter(self, num_classes, device):
            class Marked(AccuracyMeter):  # a value no real accuracy takes: it must reach metrics.csv
                def compute(self):
                    return {"acc": -1.0}
            return Marked(device)

    monkeypatch.setattr(tasks, "_registry", lambda: {"classification": Counted})
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=2", "train.sanity=false"])
    run_dir = train(cfg)
    rows = read_metrics(run_dir)
    steps = int(rows[-1]["step"])
    assert calls["augment"] == steps  # one augmentation per CPU training batch
    assert calls["loss"] >= steps  # every step, plus the validation batches
    assert all(float(r["train_acc"]) == -1.0 and float(r["val_acc"]) == -1.0 for r in rows)


def test_cpu_budget_stops_at_the_step_that_spends_it(tmp_path):
    # a budget spent by setting up alone: the first step crosses it, and that one-step epoch is the last
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path / 'a'}", "train.epochs=20", "train.sanity=false",
                                       "train.budget_s=1e-6"])
    run_dir = train(cfg)
    rows = read_metrics(run_dir)
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1")]
    assert (run_dir / "best.safetensors").is_file() and load_resume(run_dir / "last.ckpt")["epoch"] == 1


def test_cpu_budget_counts_process_cpu_seconds(tmp_path):
    # 1,000 epochs would take minutes; 2 CPU seconds stop the run once this process has used them
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=1000", "train.sanity=false",
                                       "train.budget_s=2"])
    cpu0 = time.process_time()
    rows = read_metrics(train(cfg))
    assert time.process_time() - cpu0 >= 2
    assert 1 <= len(rows) < 1000
    steps_per_epoch = int(rows[0]["step"])
    assert int(rows[-1]["step"]) <= len(rows) * steps_per_epoch
