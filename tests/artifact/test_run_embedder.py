"""`data inspect --embed RUN`: a trained run's features embed, and on the run's own data its
predictions rank the test split's label errors (the same predictions its evaluation scored)."""
import json

import pytest

from cvrecipe.artifact.features import same_source
from cvrecipe.cli import main


def test_same_source_compares_the_files_paths_resolve_to(tmp_path, monkeypatch):
    (tmp_path / "a.tar.gz").write_bytes(b"x")
    (tmp_path / "b.tar.gz").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert same_source("folder:a.tar.gz", f"folder:{tmp_path / 'a.tar.gz'}")
    (tmp_path / "sub").mkdir()
    assert same_source("folder:./sub/../a.tar.gz", "folder:a.tar.gz")
    assert not same_source("folder:a.tar.gz", "folder:b.tar.gz")  # same bytes, other data as far as a run knows
    assert not same_source("folder:a.tar.gz", "masks:a.tar.gz")
    assert not same_source("folder:missing", "folder:missing")
    assert same_source("digits", "digits") and not same_source("digits", "fashion-mnist")


@pytest.mark.slow
def test_a_runs_predictions_rank_its_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("CVRECIPE_CACHE", str(tmp_path / "cache"))
    assert main(["run", "digits-quick", "--no-sanity", "train.epochs=2", f"runs_dir={tmp_path}", "name=r"]) == 0
    run, out = tmp_path / "r", tmp_path / "audit"
    assert main(["data", "inspect", "digits", "--out", str(out), "--embed", str(run)]) == 0
    embedding = json.loads((out / "audit.json").read_text())["embedding"]
    assert embedding["embedder"] == f"run:{run}"
    issues = embedding["label_issues"]
    assert issues["sources"] == {"train": "probe", "test": "model"}
    scored = json.loads((run / "eval.json").read_text())
    assert issues["accuracy"]["test"] == pytest.approx(scored["accuracy"], abs=1e-4)  # the run's own predictions
    assert "test: the model's own predictions" in (out / "report.html").read_text()
