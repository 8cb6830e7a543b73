"""Shared by the monitoring tests: a small model exported with its reference profile, trained once."""
from pathlib import Path

import numpy as np
import pytest

from cvrecipe.export import export_run
from cvrecipe.monitor.profile import profile_run

from conftest import make_image_folder


def train_run(root: Path):
    from rich.console import Console

    from cvrecipe.config import load_config
    from cvrecipe.train.job import train

    data = make_image_folder(root / "images", per_class={"train": 40, "test": 100})
    cfg = load_config("digits-quick", [f"data.name=folder:{data}", f"runs_dir={root / 'runs'}", "name=stripes",
                                       "train.epochs=6", "train.sanity=false", "model.kwargs={width: 8}",
                                       f"data.cache_dir={root / 'cache'}"])
    return train(cfg, console=Console(quiet=True))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(export folder, [(class, clean image bytes)]): a stripes model exported with its profile, and
    fresh images of the same generator (another seed) to replay."""
    root = tmp_path_factory.getbasetemp() / "monitor-model"  # one per session: each test module imports this
    run_dir = root / "runs" / "stripes"
    if not (run_dir / "export" / "profile.json").is_file():
        run_dir = train_run(root)
        export_run(run_dir, "onnx", dynamic_batch=True)
        profile_run(run_dir)
    fresh = make_image_folder(root / "fresh", per_class={"test": 70}, seed=1)
    files = [(p.parent.name, p.read_bytes()) for p in sorted((fresh / "test").glob("*/*.jpg"))]
    np.random.default_rng(0).shuffle(files)
    return run_dir / "export", files
