"""The config: recipes load, overrides are typed, every choice and range is checked at load time,
rules across fields hold, old keys name their new place, and `extends` merges recipes."""
import dataclasses
import typing

import pytest
import yaml

from cvrecipe.config import (MOVED, RECIPES_DIR, Config, ConfigError, apply_overrides, from_dict, load_config,
                             load_run_config, migrate)


def test_every_shipped_recipe_loads():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        cfg = load_config(path.stem)
        assert isinstance(cfg, Config) and cfg.name


def test_dotted_overrides_are_typed():
    cfg = load_config("fashion-mnist", ["optim.lr=0.01", "train.epochs=3", "data.subset=500", "train.grad_clip=1"])
    assert cfg.optim.lr == 0.01 and cfg.train.epochs == 3 and cfg.data.subset == 500
    assert isinstance(cfg.train.grad_clip, float)  # int accepted where float is expected


@pytest.mark.parametrize("override, key", [("train.lrr=0.1", "train.lrr"), ("optimizer.lr=1", "optimizer")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("fashion-mnist", [override])


@pytest.mark.parametrize("override", ["train.epochs=ten", "train.epochs=2.5", "augment.hflip=3", "train.seed=null"])
def test_wrong_type_is_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("fashion-mnist", [override])


def test_malformed_override_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-recipe")
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict({"train": 3})


def test_extends_takes_the_base_and_merges_sections(tmp_path):
    base = load_config("cifar10-speedrun")
    variant = tmp_path / "variant.yaml"
    variant.write_text("extends: cifar10-speedrun\nname: variant\ntrain:\n  batch_size: 256\n"
                       "model:\n  kwargs:\n    bn_momentum: 0.88\n")
    cfg = load_config(variant, ["train.epochs=3"])
    assert cfg.name == "variant" and cfg.train.batch_size == 256 and cfg.train.epochs == 3
    assert cfg.model.kwargs == {**base.model.kwargs, "bn_momentum": 0.88}  # nested section merged key by key
    # everything the variant does not state is the base's
    assert cfg.optim.lr == base.optim.lr and cfg.augment == base.augment and cfg.eval == base.eval
    assert cfg.data == base.data


def test_extends_resolves_paths_next_to_the_file_and_names_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntrain:\n  epochs: 2\n")
    (tmp_path / "b.yaml").write_text("name: from-b\noptim:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.name == "from-b" and cfg.optim.lr == 0.5 and cfg.train.epochs == 2
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no-such-recipe\n")
    with pytest.raises(ConfigError, match="no-such-recipe"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a, b]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(tmp_path / "d.yaml")


def test_every_choice_field_is_a_literal_checked_at_load():
    """Each str field that takes one of a few values is a Literal, so a typo stops the load."""
    choices = {"augment.flip_mode", "augment.pad_mode", "train.precision", "optim.name", "optim.units",
               "schedule.name", "average.name", "checkpoint.mode", "eval.tta", "finetune.strategy",
               "data.channels"}
    for key in choices:
        section, _, name = key.rpartition(".")
        cls = type(getattr(Config(), section)) if section else Config
        hint = typing.get_type_hints(cls)[name]
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        literal = next(o for o in options if typing.get_origin(o) is typing.Literal)
        bad = "no-such-choice"
        with pytest.raises(ConfigError, match=rf"{key}={bad}: expected one of " + ", ".join(map(str, typing.get_args(literal)))):
            load_config(None, [f"{key}={bad}"])


def test_the_task_is_one_the_registry_knows_checked_at_load():
    """`task` is a string checked against the task registry (not a Literal: the registry sits above config)."""
    from cvrecipe.tasks import task_names

    with pytest.raises(ConfigError, match="task=no-such-choice: expected one of " + ", ".join(task_names())):
        load_config(None, ["task=no-such-choice"])
    assert load_config(None, []).task == "classification"


@pytest.mark.parametrize("override, allowed", [
    ("data.val_fraction=-0.1", ">= 0 and < 1"), ("optim.momentum=1", ">= 0 and < 1"), ("optim.lr=0", "> 0"),
    ("train.device=gpu", "matching"), ("average.every=0", ">= 1"), ("finetune.layer_decay=1.5", "<= 1"),
    ("train.label_smoothing=1", "< 1"), ("schedule.peak_at=1", "< 1"), ("name=../escape", "matching"),
])
def test_ranges_are_checked_at_load(override, allowed):
    with pytest.raises(ConfigError, match=allowed):
        load_config(None, [override])


def test_rules_across_fields():
    with pytest.raises(ConfigError, match="checkpoint.monitor=val_miou: expected one of"):
        load_config(None, ["checkpoint.monitor=val_miou"])
    with pytest.raises(ConfigError, match=r"finetune.freeze_epochs=0: two-stage needs 1 to train.epochs - 1 \(4\)"):
        load_config(None, ["finetune.strategy=two-stage", "train.epochs=5"])
    with pytest.raises(ConfigError, match="finetune.feature_cache=true needs finetune.strategy=linear"):
        load_config(None, ["finetune.feature_cache=true", "finetune.strategy=full"])
    # early stopping on a train_ metric needs no val split; a folder with its own val/ needs no carving
    load_config(None, ["stop.early=true", "data.val_fraction=0", "checkpoint.monitor=train_loss"])


def test_a_folder_with_its_own_val_split_may_stop_early_without_carving(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="needs a validation split"):
        load_config(None, [f"data.name=folder:{tmp_path}", "data.val_fraction=0", "stop.early=true"])
    (tmp_path / "val" / "a").mkdir(parents=True)
    assert load_config(None, [f"data.name=folder:{tmp_path}", "data.val_fraction=0", "stop.early=true"]).stop.early


def test_monitor_mode_auto_follows_the_metric():
    assert load_config(None, ["checkpoint.monitor=val_loss"]).monitor_mode == "min"
    assert load_config(None, ["checkpoint.monitor=val_acc"]).monitor_mode == "max"
    assert load_config(None, ["checkpoint.monitor=val_acc", "checkpoint.mode=min"]).monitor_mode == "min"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_key_names_its_new_place(old):
    new = MOVED[old]
    with pytest.raises(ConfigError, match=f"'{old}' is " + (f"now '{new}'" if new else "removed")):
        load_config(None, [f"{old}=1"])


def test_run_folders_of_earlier_versions_still_load(tmp_path):
    """A config.yaml written before the split into sections is carried over, not refused."""
    old = {"name": "old", "train": {"epochs": 3, "lr": 0.3, "ema": "lookahead", "monitor": "val_acc",
                                    "mode": "max", "bn_recalibrate": 0, "triangle_ends": [0.1, 0.0]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_run_config(tmp_path)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.average.name, cfg.checkpoint.monitor, cfg.schedule.ends) == \
           (3, 0.3, "lookahead", "val_acc", [0.1, 0.0])
    assert migrate(old)["train"] == {"epochs": 3}


def test_a_resolved_config_round_trips_through_yaml():
    cfg = load_config("cifar10-speedrun-cpu")
    assert from_dict(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))) == cfg


def test_scientific_notation_on_the_command_line_is_a_number():
    """YAML 1.1 reads 1e-3 (no dot) as a string; as an override it means the number."""
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


@pytest.mark.parametrize("overrides, words", [
    (["augment.crop_size=64"], "segmentation augmentation"),
    (["augment.elastic_sigma=5"], "segmentation augmentation"),
    (["data.name=masks:x"], "task=segmentation"),
    (["task=segmentation", "augment.crop_padding=2"], "classification only"),
    (["task=segmentation", "augment.scale=[1.5, 1.0]"], "low <= high"),
    (["task=segmentation", "checkpoint.monitor=val_acc"], "val_pixel_acc"),
    (["data.folds=1"], "at least 2 folds"),
    (["data.folds=3", "data.fold=3"], "data.fold=3"),
    (["data.fold=1"], "data.folds"),
])
def test_segmentation_and_fold_rules(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, overrides)


def test_segmentation_recipe_monitors_its_metrics():
    cfg = load_config("membrane-unet")
    assert cfg.task == "segmentation" and cfg.segment.loss == "ce+dice" and cfg.augment.crop_size == 256
    assert load_config(None, ["task=segmentation", "checkpoint.monitor=val_miou"]).monitor_mode == "max"
