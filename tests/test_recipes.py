"""The shipped recipes as package data: listed with their descriptions, found by name from any
directory, and the paths inside a recipe resolved by one rule (`cvrecipe config --explain paths`)."""
from pathlib import Path

import pytest

from cvrecipe.cli import main
from cvrecipe.config import (RECIPES_DIR, SPACES_DIR, ConfigError, load_config, read_recipe, resolve_space,
                             shipped_recipes)
from cvrecipe.data import locate


def test_the_recipes_live_inside_the_package_each_with_a_description():
    import cvrecipe

    assert RECIPES_DIR == Path(cvrecipe.__file__).parent / "recipes"
    recipes = dict(shipped_recipes())
    assert {"fashion-mnist", "digits-quick", "membrane-unet"} <= set(recipes)
    assert all(recipes.values()), [name for name, text in recipes.items() if not text]
    assert "description" not in read_recipe("digits-quick")  # a label for `cvrecipe recipes`, not a setting


def test_cvrecipe_recipes_lists_recipes_and_spaces(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, description in shipped_recipes():
        assert any(line.split() and line.split()[0] == name and description[:40] in line for line in out.splitlines())
    assert "digits-quick, fashion-mnist-cnn, finetune" in out


def test_a_recipe_means_the_same_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("membrane-unet")
    assert Path(cfg.data.mask_classes) == RECIPES_DIR / "classes" / "membrane.yaml"  # beside the recipe
    assert load_config("cifar10-speedrun-cpu").train.batch_size == 256  # `extends` by name, from anywhere
    # a path given on the command line stays relative to where the command runs
    assert load_config("membrane-unet", ["data.mask_classes=mine.yaml"]).data.mask_classes == "mine.yaml"


def test_search_spaces_are_found_by_name_or_path(tmp_path):
    assert resolve_space("digits-quick") == SPACES_DIR / "digits-quick.yaml"
    own = tmp_path / "space.yaml"
    own.write_text("optim.lr: {float: [0.01, 0.1]}\n")
    assert resolve_space(own) == own
    with pytest.raises(ConfigError, match=r"search space 'nope' not found.*known: .*digits-quick.*fashion-mnist-cnn"):
        resolve_space("nope")


def test_relative_data_paths_are_looked_for_here_then_in_cvrecipe_data(tmp_path, monkeypatch):
    here, shelf = tmp_path / "here", tmp_path / "shelf"
    (here / "data").mkdir(parents=True)
    shelf.mkdir()
    (shelf / "set.tar.gz").write_bytes(b"")
    monkeypatch.chdir(here)
    monkeypatch.setenv("CVRECIPE_DATA", f"{tmp_path / 'none'}:{shelf}")
    assert locate("../shared/data/set.tar.gz") == shelf / "set.tar.gz"  # by its file name on the shelf
    (here / "data" / "set.tar.gz").write_bytes(b"")
    assert locate("data/set.tar.gz") == Path("data/set.tar.gz")  # the current directory comes first
    assert locate("/abs/missing.tar.gz") == Path("/abs/missing.tar.gz")
    assert locate("missing.tar.gz") == Path("missing.tar.gz")  # not found: as written, for the loader's error


def test_explain_paths_states_the_rule(capsys):
    assert main(["config", "--explain", "paths"]) == 0
    out = capsys.readouterr().out
    assert "CVRECIPE_DATA" in out and str(RECIPES_DIR) in out and "relative to that recipe file" in out
