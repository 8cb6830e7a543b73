"""The search space: every mistake is a one-line error naming the key, before any trial runs, and
the draws follow the ranges and conditions. The checks are the config's own (cvrecipe.config)."""
from __future__ import annotations

import optuna
import pytest

from cvrecipe.cli import main
from cvrecipe.config import SPACES_DIR, ConfigError, load_config, read_recipe
from cvrecipe.tune.space import build_config, parse_space

from tune_helpers import ROOT

BASE = read_recipe("digits-quick")


@pytest.mark.parametrize("space, words", [
    ({"optim.learning_rate": {"float": [0.01, 0.1]}}, ["unknown config key 'optim.learning_rate'"]),
    ({"optim": {"float": [0.01, 0.1]}}, ["optim is a section"]),
    ({"model.dropout": {"float": [0.0, 1.0]}}, ["model.dropout=1.0", "< 1"]),  # the config's own bound
    ({"optim.lr": {"float": [0.1, 0.1]}}, ["optim.lr", "empty range"]),
    ({"optim.lr": {"float": [0.5, 0.1]}}, ["optim.lr", "empty range"]),
    ({"train.batch_size": {"float": [16, 64.5]}}, ["train.batch_size=64.5", "an integer"]),
    ({"optim.name": {"choice": ["sgd", "lion"]}}, ["optim.name=lion", "one of sgd, adam, adamw, muon"]),
    ({"optim.lr": {"float": [0.0, 0.1], "log": True}}, ["optim.lr=0", "> 0"]),
    ({"optim.lr": {"range": [0.01, 0.1]}}, ["optim.lr", "exactly one of float, int, choice"]),
    ({"train.epochs": {"int": [2, 5], "step": 0}}, ["train.epochs", "step expects a positive integer"]),
    ({"optim.momentum": {"float": [0.8, 0.9], "when": {"optim.name": "sgd"}}},
     ["optim.momentum", "when names optim.name, which is not a choice entry above it"]),
    ({"optim.name": {"choice": ["sgd", "adam"]}, "optim.momentum": {"float": [0.8, 0.9], "when": {"optim.name": "muon"}}},
     ["optim.momentum", "muon", "not among its choices"]),
    # a rule across fields that the value breaks in the recipe whatever else is drawn (check_rules)
    ({"finetune.feature_cache": {"choice": [False, True]}},
     ["finetune.feature_cache=true is refused by the recipe", "finetune.strategy=linear"]),
])
def test_a_bad_space_is_one_line_naming_the_key(space, words):
    with pytest.raises(ConfigError) as err:
        parse_space(space, BASE, "space.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("space.yaml: ")
    for word in words:
        assert word in message


def test_grid_needs_a_finite_space():
    space = parse_space({"optim.lr": {"float": [0.01, 0.1]}}, BASE)
    with pytest.raises(ConfigError, match="grid sampler needs a step"):
        space.grid()
    stepped = parse_space({"optim.lr": {"float": [0.1, 0.3], "step": 0.1}, "train.batch_size": {"int": [16, 64], "step": 16},
                           "optim.name": {"choice": ["sgd", "adam"]}}, BASE)
    assert stepped.grid() == {"optim.lr": [0.1, 0.2, 0.3], "train.batch_size": [16, 32, 48, 64],
                              "optim.name": ["sgd", "adam"]}


@pytest.mark.parametrize("recipe, space", [("fashion-mnist-cnn", "fashion-mnist-cnn"),
                                           ("finetune-efficientnet-lite0", "finetune"),
                                           ("digits-quick", "digits-quick")])
def test_the_shipped_spaces_fit_their_recipes(recipe, space):
    from cvrecipe.tune.space import load_space

    parsed = load_space(SPACES_DIR / f"{space}.yaml", read_recipe(recipe))
    assert parsed.params


def test_draws_stay_in_range_and_follow_conditions():
    """200 draws of the fashion-mnist-cnn space by Optuna's random sampler: each within its range, a
    conditional entry drawn exactly when its condition holds, and each draw a config the recipe accepts."""
    from cvrecipe.tune.space import load_space

    base = read_recipe("fashion-mnist-cnn")
    space = load_space(SPACES_DIR / "fashion-mnist-cnn.yaml", base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen = set()
    for _ in range(200):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        schedule = values["schedule.name"]
        assert ("schedule.peak_at" in values) == (schedule == "onecycle")
        assert ("schedule.warmup_epochs" in values) == (schedule == "cosine")
        assert 0.02 <= values["optim.lr"] <= 0.5 and values["train.batch_size"] in (128, 256, 512)
        assert isinstance(values["augment.crop_padding"], int) and 0 <= values["augment.crop_padding"] <= 3
        cfg = build_config(base, values)
        assert cfg.optim.lr == values["optim.lr"] and cfg.schedule.name == schedule
        seen.add(schedule)
    assert seen == {"onecycle", "cosine"}


def test_build_config_is_what_load_config_makes():
    """A trial's config is exactly the recipe with the values as overrides (the same checks, the same result)."""
    values = {"optim.lr": 0.2, "model.dropout": 0.25, "train.batch_size": 32}
    assert build_config(BASE, values) == load_config("digits-quick", [f"{k}={v}" for k, v in values.items()])


def test_cli_refuses_a_bad_space_before_any_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {float: [0.01, 0.1]}\nmodel.dropout: {float: [0.2, 0.2]}\n")
    assert main(["tune", "digits-quick", "--space", str(space), "--trials", "3"]) == 2
    out = capsys.readouterr().err
    assert "error:" in out and "model.dropout" in out and "empty range" in out and str(space) in out
    assert not (tmp_path / "runs").exists()  # no study, no trial folder
    space.write_text("optim.lr: {float: [0.01, 0.1]}\n")
    assert main(["tune", "digits-quick", "--space", str(space), "--metric", "val_f1"]) == 2
    assert "--metric val_f1: expected one of train_loss, train_acc, val_loss, val_acc" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
