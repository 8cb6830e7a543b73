import pytest

from cvrecipe.config import Config, ConfigError, RECIPES_DIR, apply_overrides, from_dict, load_config


def test_every_shipped_recipe_loads():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        cfg = load_config(path.stem)
        assert isinstance(cfg, Config) and cfg.name


def test_dotted_overrides_are_typed():
    cfg = load_config("fashion-mnist", ["train.lr=0.01", "train.epochs=3", "data.subset=500", "train.grad_clip=1"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3 and cfg.data.subset == 500
    assert isinstance(cfg.train.grad_clip, float)  # int accepted where float is expected


@pytest.mark.parametrize("override, key", [("train.lrr=0.1", "train.lrr"), ("optim.lr=1", "optim")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("fashion-mnist", [override])


@pytest.mark.parametrize("override", ["train.epochs=ten", "train.epochs=2.5", "augment.hflip=3", "train.seed=null"])
def test_wrong_type_is_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("fashion-mnist", [override])


def test_malformed_override_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
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
    assert cfg.train.lr == base.train.lr and cfg.augment == base.augment and cfg.eval == base.eval
    assert cfg.data == base.data


def test_extends_resolves_paths_next_to_the_file_and_names_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntrain:\n  epochs: 2\n")
    (tmp_path / "b.yaml").write_text("name: from-b\ntrain:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.name == "from-b" and cfg.train.lr == 0.5 and cfg.train.epochs == 2
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no-such-recipe\n")
    with pytest.raises(ConfigError, match="no-such-recipe"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a, b]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(tmp_path / "d.yaml")
