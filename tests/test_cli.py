"""The command line: a bad recipe or override stops at once with one line naming the key, the
value and what is allowed, before anything heavy is imported or any data is read; `cvrecipe
config` prints the resolved config with each field's doc; errors are one line, exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvrecipe.cli import main
from cvrecipe.config import Config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
# runs the CLI in a fresh interpreter and reports whether torch got imported on the way
PROBE = ("import sys; from cvrecipe.cli import main; code = main(sys.argv[1:]); "
         "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")


@pytest.mark.parametrize("overrides, expected", [
    (["train.monitor=val_los"], ["train.monitor", "checkpoint.monitor", "val_los", "val_loss, val_acc"]),
    (["train.mode=maxx"], ["train.mode", "checkpoint.mode", "maxx", "auto, min, max"]),
    (["train.optimizer=sgdd"], ["train.optimizer", "optim.name", "sgdd", "sgd, adam, adamw, muon"]),
    (["train.precision=fp8"], ["train.precision", "fp8", "auto, fp32, bf16, fp16"]),
    (["data.val_fraction=1.5"], ["data.val_fraction", "1.5", ">= 0 and < 1"]),
    (["stop.early=true", "data.val_fraction=0"], ["stop.early", "checkpoint.monitor=val_loss", "data.val_fraction=0", "fashion-mnist"]),
    (["checkpoint.monitor=val_los"], ["checkpoint.monitor", "val_los", "train_loss, train_acc, val_loss, val_acc"]),
    (["optim.lr=-1"], ["optim.lr", "-1", "> 0"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["train.epochs=0"], ["train.epochs", ">= 1"]),
])
def test_bad_values_stop_before_any_data_with_one_line(tmp_path, overrides, expected):
    """The issue's list: each refused with key, value and allowed values on one line, exit 2,
    no run folder, and torch never imported (so no data could have been read)."""
    out = subprocess.run([sys.executable, "-c", PROBE, "train", "fashion-mnist", *overrides, f"runs_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    lines = out.stderr.splitlines()  # the error line goes to stderr, alone
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and all(word in lines[0] for word in expected), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.rstrip().endswith("torch not imported")
    assert not (tmp_path / "fashion-mnist").exists()


def test_overrides_without_a_recipe_apply_to_the_default_one(capsys):
    assert main(["config", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "fashion-mnist" and printed["train"]["epochs"] == 3


def test_config_prints_the_resolved_config_with_each_fields_doc(capsys):
    assert main(["config", "fashion-mnist", "optim.lr=0.2"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == to_dict(load_config("fashion-mnist", ["optim.lr=0.2"]))
    leaves = [line for line in text.splitlines() if not line.rstrip().endswith(":")]
    assert leaves and all(" # " in line and line.split(" # ", 1)[1].strip() for line in leaves)
    assert "peak learning rate" in next(line for line in leaves if line.strip().startswith("lr: 0.2"))


def test_explain_gives_type_default_and_doc_and_follows_moved_keys(capsys):
    assert main(["config", "--explain", "average.name"]) == 0
    text = capsys.readouterr().out
    assert "one of none, ema, lookahead" in text and "default: none" in text and "weight averaging" in text
    assert main(["config", "--explain", "train.ema"]) == 0
    assert capsys.readouterr().out.startswith("train.ema is now average.name")
    assert main(["config", "--explain", "train.nope"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["train", "digits-quick", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["config", "schedule.ends=[0.2]"]) == 2  # brackets in a message are printed, not parsed
    assert "schedule.ends=[0.2]: expected a list of 2 numbers" in capsys.readouterr().err


def test_every_config_field_has_a_doc():
    import dataclasses

    missing = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            missing += [f"{section.name}.{f.name}" for f in dataclasses.fields(value) if not f.metadata.get("doc")]
        elif not section.metadata.get("doc"):
            missing.append(section.name)
    assert not missing
