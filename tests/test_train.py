"""End-to-end: train → eval → predict on small data, NaN handling, early stopping, kill-and-resume."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cvrecipe.cli import main
from cvrecipe.config import load_config
from cvrecipe.models.registry import register
from cvrecipe.runs import evaluate, predict, train
from cvrecipe.train.checkpoint import load_model, load_resume
from cvrecipe.train.loop import TrainingDiverged

from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_run_eval_predict_on_a_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 12})
    (data / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    runs = tmp_path / "runs"
    code = main(["run", "digits-quick", f"data.name=folder:{data}", f"runs_dir={runs}", "name=e2e",
                 "train.epochs=6", "model.kwargs={width: 8}"])
    assert code == 0
    run_dir = runs / "e2e"
    for name in ("config.yaml", "run.json", "metrics.csv", "best.safetensors", "last.ckpt", "eval.json",
                 "skipped_files.txt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "broken.jpg" in (run_dir / "skipped_files.txt").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["seed"] == 0 and "git_commit" in info
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["split"] == "test" and result["num_images"] == 36
    assert result["accuracy"] > 0.8  # stripes are easy; chance is 1/3
    assert len(read_metrics(run_dir)) == 6

    capsys.readouterr()
    assert main(["predict", str(run_dir), str(data / "test" / "fox"), "--json", "-k", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 12 and all(len(p["top"]) == 2 for p in preds)
    assert sum(p["top"][0]["class"] == "fox" for p in preds) >= 9

    # a second run with the same name goes to a new folder instead of overwriting
    cfg = load_config("digits-quick", [f"runs_dir={runs}", "name=e2e", "train.epochs=1"])
    assert train(cfg).name == "e2e-2"


def test_predict_reports_unreadable_files(tmp_path):
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=1"])
    run_dir = train(cfg)
    (tmp_path / "bad.png").write_bytes(b"nope")
    out = predict(run_dir, [str(tmp_path / "bad.png")])
    assert out[0]["file"].endswith("bad.png") and "error" in out[0]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict(run_dir, [str(tmp_path / "missing.png")])


def test_eval_numbers_come_from_the_best_checkpoint(tmp_path):
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=3"])
    run_dir = train(cfg)
    result = evaluate(run_dir)
    model = load_model(run_dir)
    from cvrecipe.data import load_dataset
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    with torch.no_grad():
        acc = (model(torch.from_numpy(ds.test.x)).argmax(1).numpy() == ds.test.y).mean()
    assert result["accuracy"] == pytest.approx(acc)


def test_early_stopping_stops_and_keeps_best(tmp_path):
    # lr=0: only BN statistics move, by less than min_delta, so patience 2 stops after epoch 3
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "train.epochs=20", "train.lr=0",
                                       "train.early_stopping=true", "train.patience=2",
                                       "train.monitor=val_loss", "train.mode=min", "train.min_delta=0.05"])
    run_dir = train(cfg)
    assert len(read_metrics(run_dir)) == 3
    train(cfg, resume_dir=run_dir)  # resuming a run that stopped early does not train on
    assert len(read_metrics(run_dir)) == 3


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
            "train.epochs=12", "train.num_threads=1", "--deterministic", "model.dropout=0.2", *extra]


def test_kill_and_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight), check=True, env=env, capture_output=True, cwd=ROOT, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "r" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_resume(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_resume(ckpt)["epoch"] < 12

    subprocess.run([sys.executable, "-m", "cvrecipe", "train", "--resume", str(killed / "r")], check=True,
                   env=env, capture_output=True, cwd=ROOT, timeout=300)
    a, b = read_metrics(straight / "r"), read_metrics(killed / "r")
    timing = {"epoch_time_s", "images_per_s"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in a] == \
           [{k: v for k, v in row.items() if k not in timing} for row in b]
    wa, wb = load_resume(straight / "r" / "last.ckpt")["model"], load_resume(killed / "r" / "last.ckpt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_help_for_every_verb():
    for verb in ("run", "train", "eval", "predict", "data", "models"):
        out = subprocess.run([sys.executable, "-m", "cvrecipe", verb, "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert out.returncode == 0 and "usage: cvrecipe" in out.stdout


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "digits-quick", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().out
