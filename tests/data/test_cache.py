"""Cache entries written by several processes at once (ranks of one job, tuning workers): the first
complete entry wins, the others are dropped, and nobody fails."""
import json
import os
from pathlib import Path

import numpy as np

from cvrecipe.data import cache
from cvrecipe.data.cache import EntryWriter


def test_an_entry_another_process_renames_into_place_meanwhile_is_kept(tmp_path, monkeypatch):
    folder = tmp_path / "named-digits"
    mine, theirs = EntryWriter(folder), EntryWriter(folder)
    for writer in (mine, theirs):
        writer.add("train_x", np.arange(6, dtype=np.uint8))
    real_replace = os.replace

    def the_other_wins_first(src, dst):
        if Path(src) == mine.tmp:  # between this writer's "is it there yet?" and its rename
            theirs.commit({"writer": "theirs"})
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", the_other_wins_first)
    mine.commit({"writer": "mine"})  # raised "Directory not empty" before
    assert json.loads((folder / "meta.json").read_text())["writer"] == "theirs"
    assert np.array_equal(np.load(folder / "train_x.npy"), np.arange(6))
    assert not mine.tmp.exists() and not theirs.tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named-digits"]  # no temp folder left behind
