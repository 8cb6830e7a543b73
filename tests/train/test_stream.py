"""Data larger than memory, end to end: a run whose dataset exceeds data.memory_gb streams its
batches from the cache's shards, trains to exactly what the in-memory run gives (same order, same
augmentation draws), holds no more than its budget of the data in host memory, and resumes
exactly after a crash."""
import csv
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.config import load_config
from cvrecipe.data import load_source
from cvrecipe.train.job import train
from conftest import make_image_folder

pytestmark = pytest.mark.slow  # end to end: trains, exports, serves or starts processes

TRAIN_PER_CLASS = 4000  # 3 classes of 16×16 RGB: 12,000 training images, 9.2 MB of uint8
BUDGET_GB = 2 * 2**20 / 2**30  # 2 MiB: under a quarter of the data


def _config(folder, cache, runs, memory_gb=None, extra=()):
    return load_config("digits-quick", [f"data.name=folder:{folder}", f"data.cache_dir={cache}", f"runs_dir={runs}",
                                        f"data.memory_gb={memory_gb if memory_gb else 'null'}", "model.kwargs={width: 8}",
                                        "train.epochs=2", "train.deterministic=true", "train.sanity=false", "train.num_threads=1",
                                        "augment.hflip=true", "augment.cutout=4", "checkpoint.every_s=0", *extra])


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in csv.DictReader(f)]


def _info(run_dir):
    return json.loads((run_dir / "run.json").read_text())["dataset"]


def _weights(run_dir):
    return load_resume(run_dir / "last.ckpt")["model"]


def _traced_peak(fn):
    """Peak bytes of numpy (and Python) allocations while fn runs: tracemalloc sees numpy's
    buffers, which is where host-side data lives on the CPU; torch's own allocations it does not."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _two_runs_traced(folder, cache, root) -> dict:
    """The in-memory run, then the streamed one, each under _traced_peak. Run in a process of its
    own: tracemalloc counts every thread's allocations, and threads that earlier tests leave in the
    test process (e.g. torch's rendezvous keep-alive timer after a stopped launch) would count too."""
    whole, whole_peak = _traced_peak(lambda: train(_config(folder, cache, root / "whole")))
    streamed, streamed_peak = _traced_peak(lambda: train(_config(folder, cache, root / "streamed", BUDGET_GB)))
    return {"whole": str(whole), "streamed": str(streamed), "whole_peak": whole_peak, "streamed_peak": streamed_peak}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-epoch run twice: in memory, and streamed with a 2 MiB budget."""
    root = tmp_path_factory.mktemp("stream")
    folder = make_image_folder(root / "imgs", per_class={"train": TRAIN_PER_CLASS, "test": 100}, size=16)
    cache = root / "cache"
    cfg = _config(folder, cache, root / "runs")
    load_source(cfg.data.name, cfg.data, lazy=True)  # decode into the cache before anything is measured
    here = Path(__file__).resolve().parent
    code = (f"import json, sys; sys.path[:0] = [{str(here.parents[1])!r}, {str(here.parent)!r}, {str(here)!r}]; "
            f"import test_stream as t; "
            f"print(json.dumps(t._two_runs_traced(*map(t.Path, sys.argv[1:]))))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(cache), str(root)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {"folder": folder, "cache": cache, "root": root, **measured,
            "whole": Path(measured["whole"]), "streamed": Path(measured["streamed"])}


def test_the_streamed_run_trains_exactly_as_the_in_memory_run(runs):
    assert not _info(runs["whole"])["streamed"] and _info(runs["streamed"])["streamed"]
    assert _rows(runs["streamed"]) == _rows(runs["whole"])
    wa, wb = _weights(runs["whole"]), _weights(runs["streamed"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_streamed_run_holds_less_than_its_memory_budget(runs):
    data_bytes = 3 * TRAIN_PER_CLASS * 3 * 16 * 16
    assert runs["whole_peak"] > data_bytes  # the in-memory run reads the training set whole (the measure sees it)
    assert runs["streamed_peak"] < BUDGET_GB * 2**30 < data_bytes / 4


class _CrashAfter:
    """A training callback that fails at the end of epoch `epoch`, before its checkpoint is written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, row, model):
        if row["epoch"] == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_streamed_run_resumes_exactly(runs):
    cfg = _config(runs["folder"], runs["cache"], runs["root"] / "crashed", BUDGET_GB)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, callbacks=[_CrashAfter(2)])
    run_dir = runs["root"] / "crashed" / cfg.name
    assert load_resume(run_dir / "last.ckpt")["epoch"] == 1
    train(cfg, resume_dir=run_dir)
    assert _rows(run_dir) == _rows(runs["streamed"])
    wa, wb = _weights(runs["streamed"]), _weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert np.isfinite([float(r["val_loss"]) for r in _rows(run_dir)]).all()
