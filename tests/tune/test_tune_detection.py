"""`cvrecipe tune` on a detection recipe with its shipped space: trials train detectors and the study
records their val_map50, maximised."""
from __future__ import annotations

import csv
import json
import math
import subprocess

import pytest

from cvrecipe.config import SPACES_DIR, read_recipe
from detector_helpers import digit_boxes_set
from tune_helpers import env, load, sqlite_url, tune_command

SPACE = SPACES_DIR / "detect-synth.yaml"


def test_the_detection_space_fits_its_recipe():
    from cvrecipe.tune.space import load_space

    space = load_space(SPACE, read_recipe("detect-synth"))
    assert {"model.name", "optim.lr", "optim.weight_decay", "train.batch_size"} <= set(space.keys)


@pytest.mark.slow  # two trials in worker processes: ~25 s on 2 busy cores
def test_tune_detect_synth_runs_two_trials_and_records_val_map50(tmp_path):
    data = digit_boxes_set(tmp_path / "set", {"train": (8, 1), "val": (4, 2)})
    command = tune_command(SPACE, "--trials", "2", "--study", "det", f"data.name=boxes:{data}", "data.image_size=64",
                           "model.kwargs={fpn_channels: 32}", "train.epochs=2", "train.num_threads=1",
                           f"data.cache_dir={tmp_path / 'cache'}", recipe="detect-synth")
    out = subprocess.run(command, cwd=tmp_path, env=env(tmp_path / "cache"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"cvrecipe tune failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    study = load(sqlite_url(tmp_path, "det"), "det")
    assert study.direction.name == "MAXIMIZE" and len(study.trials) == 2
    for trial in study.trials:
        assert trial.state.name == "COMPLETE", trial
        record = json.loads((tmp_path / "runs" / "det" / f"trial-{trial.number:03d}" / "trial.json").read_text())
        assert record["metric"] == "val_map50" and record["params"]["model.name"] in ("fcos-lite0", "retinanet-lite0")
        with open(tmp_path / "runs" / "det" / f"trial-{trial.number:03d}" / "metrics.csv") as f:
            per_epoch = [float(row["val_map50"]) for row in csv.DictReader(f)]
        assert len(per_epoch) == 2 and all(0 <= v <= 1 for v in per_epoch)
        assert math.isclose(trial.value, max(per_epoch)) and math.isclose(record["value"], trial.value)
    assert (tmp_path / "runs" / "det" / "best.yaml").is_file()
