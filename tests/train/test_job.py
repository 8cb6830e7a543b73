"""The train job around the loop: a failed start leaves no run folder, a run killed before its
first checkpoint starts again from its saved config (and ends as an uninterrupted run would), and
a crashed training marks its MLflow run FAILED with the error."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from torch import nn

from cvrecipe.config import load_config
from cvrecipe.models.registry import register
from cvrecipe.train.job import train

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

ROOT = Path(__file__).resolve().parents[2]


class _Crashes(nn.Module):
    """A real model whose forward pass fails after `steps` training steps, as a bug would."""

    def __init__(self, num_classes, in_channels, input_size, steps=3, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(in_channels * input_size[0] * input_size[1], num_classes)
        self.steps, self.calls = steps, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                raise RuntimeError("the forward pass failed (planted)")
        return self.fc(x.flatten(1))


register("test-crashes")(_Crashes)


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in csv.DictReader(f)]


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path}", "model.name=test-crashes", "model.kwargs={steps: 3}",
                                       "train.sanity=false"])
    with pytest.raises(RuntimeError, match="planted"):
        train(cfg, console=Console(quiet=True))
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_a_crash_marks_the_mlflow_run_failed_with_the_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 20 steps per epoch: the crash comes in epoch 2, after a checkpoint, so the folder stays for a resume
    cfg = load_config("digits-quick", [f"runs_dir={tmp_path / 'runs'}", "model.name=test-crashes",
                                       "model.kwargs={steps: 30}", "train.sanity=false", "track.mlflow=true",
                                       f"track.mlflow_uri={uri}", "track.experiment=crash"])
    with pytest.raises(RuntimeError, match="planted"):
        train(cfg, console=Console(quiet=True))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["cvrecipe.error"] == "RuntimeError: the forward pass failed (planted)"
    assert (tmp_path / "runs" / "digits-quick" / "last.ckpt").is_file()


def test_a_run_killed_before_its_first_checkpoint_starts_again_and_ends_as_an_uninterrupted_one(tmp_path):
    # checkpoint.every_s=3600: last.ckpt is written only after the last epoch, so a kill before it leaves
    # a folder with config.yaml and metrics.csv but nothing to resume from. 30 epochs, killed as soon as
    # the first is logged: the run is still going when the kill comes, however fast the machine is
    overrides = ["name=r", "train.epochs=30", "train.num_threads=1", "checkpoint.every_s=3600"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "cvrecipe", "train", "digits-quick", *overrides, "--deterministic", "--no-sanity"]
    straight = train(load_config("digits-quick", [*overrides, "train.deterministic=true", "train.sanity=false",
                                                  f"runs_dir={tmp_path / 'straight'}"]), console=Console(quiet=True))
    killed = tmp_path / "killed" / "r"
    proc = subprocess.Popen([*cmd, f"runs_dir={tmp_path / 'killed'}"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.csv").is_file() and len(rows(killed)) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "last.ckpt").exists() and (killed / "config.yaml").is_file()

    out = subprocess.run([sys.executable, "-m", "cvrecipe", "train", "--resume", str(killed)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "has no last.ckpt (it stopped before its first checkpoint): starting it again" in " ".join(out.stdout.split())
    assert rows(killed) == rows(straight) and len(rows(killed)) == 30
