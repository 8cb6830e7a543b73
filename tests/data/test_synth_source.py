"""`synth-detect[:BACKGROUNDS]`: the synthetic detection set as a data source, written into the cache on
first use (the same files `cvrecipe data synth-detect` writes), read from there afterwards, and
trained on by a detection recipe with no command before it. On a tiny size: 12 + 4 images."""
from __future__ import annotations

import json

import pytest

from cvrecipe.cli import main
from cvrecipe.config import ConfigError, load_config
from cvrecipe.data import load_dataset, synth_source
from conftest import make_image_folder


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """The source at 12 train / 4 test images of 48-64 px, digits as objects (bundled with
    scikit-learn), a small folder of photos as backgrounds; returns the source's name."""
    monkeypatch.setattr(synth_source, "TRAIN", 12)
    monkeypatch.setattr(synth_source, "TEST", 4)
    monkeypatch.setattr(synth_source, "SIZE", (48, 64))
    monkeypatch.setattr(synth_source, "OBJECTS", "digits")
    photos = make_image_folder(tmp_path / "photos", classes=("a", "b"), per_class={"train": 3, "test": 2})
    return f"synth-detect:folder:{photos}"


def test_the_source_writes_the_set_once_into_the_cache_as_the_command_would(tiny, tmp_path, monkeypatch):
    cfg = load_config("detect-quick", [f"data.name={tiny}", "data.image_size=64", f"data.cache_dir={tmp_path / 'c'}",
                                       "data.subset=null", "data.val_fraction=0.25"])
    ds = load_dataset(cfg.data, seed=0)
    assert ds.name == tiny and len(ds.classes) == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 4)  # val held out of train, not the test split
    assert len(ds.train.y.flat) > 9 and ds.train.x.shape[1:] == (3, 64, 64)
    written = [p for p in (tmp_path / "c").iterdir() if p.name.startswith("synth-detect-")]
    assert len(written) == 1 and not any(".partial" in p.name for p in (tmp_path / "c").iterdir())

    # the same settings through the command write the same annotations
    out = tmp_path / "by-command"
    assert main(["data", "synth-detect", str(out), "--train", "12", "--test", "4", "--size", "48-64",
                 "--objects", "digits", "--backgrounds", tiny.split(":", 1)[1]]) == 0
    for split in ("train", "test"):
        name = f"annotations/instances_{split}.json"
        assert json.loads((written[0] / name).read_text()) == json.loads((out / name).read_text())

    def fail(*args, **kwargs):
        raise AssertionError("the set was written again")

    monkeypatch.setattr(synth_source, "write_set", fail)
    again = load_dataset(cfg.data, seed=0)  # read from the cache
    assert len(again.train) == 9 and (again.train.y.flat == ds.train.y.flat).all()


@pytest.mark.slow
def test_a_detection_recipe_runs_on_the_source_with_no_command_before_it(tiny, tmp_path):
    args = ["run", "detect-quick", f"data.name={tiny}", "data.image_size=64", f"data.cache_dir={tmp_path / 'c'}",
            f"runs_dir={tmp_path / 'runs'}", "data.subset=null", "data.val_fraction=0.25", "train.epochs=1",
            "train.batch_size=3", "model.kwargs={fpn_channels: 64}", "train.num_threads=1", "--no-sanity"]
    assert main(args) == 0
    result = json.loads((tmp_path / "runs" / "detect-quick" / "eval.json").read_text())
    assert result["task"] == "detection" and result["num_images"] == 4 and result["num_boxes"] > 0


def test_a_detection_recipe_names_the_sources_it_takes():
    assert load_config("detect-quick").data.name.startswith("synth-detect:")
    load_config("detect-quick", ["data.name=synth-detect"])  # the default backgrounds (cifar10)
    with pytest.raises(ConfigError, match=r"data\.name=synth-detection.*synth-detect\[:BACKGROUNDS\]"):
        load_config("detect-quick", ["data.name=synth-detection"])
