"""Shared fixtures: an isolated cache per test and small real image folders built on the fly."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own decoded-image cache, so no test sees another's entries."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CVRECIPE_CACHE", str(cache))
    return cache


def pattern_image(label: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """An image whose class is learnable: stripes in a class-specific direction/colour, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx if label % 2 == 0 else yy) // max(1, size // 8 + label // 2)) % 2
    base = stripes * 180 + rng.integers(0, 60, (size, size))
    img = np.stack([base * (0.4 + 0.3 * ((label + c) % 3)) for c in range(channels)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=None, size=16, seed=0,
                      fmt="JPEG") -> Path:
    """root/split/class/i.jpg with learnable class patterns. per_class: {split: count}."""
    per_class = per_class or {"train": 30, "test": 10}
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                ext = "jpg" if fmt == "JPEG" else fmt.lower()
                (folder / f"{i}.{ext}").write_bytes(encode(pattern_image(label, size, rng), fmt))
    return root


def tiny_speedrun(tmp_path: Path, overrides=()):
    """cifar10-speedrun shrunk to seconds: 3 classes of 16×16 learnable patterns (40 train, 10 test
    per class), widths 8/16/16, batch 32, deterministic, a checkpoint every epoch."""
    from cvrecipe.config import load_config

    data = make_image_folder(tmp_path / "imgs", per_class={"train": 40, "test": 10}, size=16)
    return load_config("cifar10-speedrun", [f"data.name=folder:{data}", "model.kwargs.widths=[8, 16, 16]",
                                            "train.batch_size=32", "train.epochs=4", "average.every=1",
                                            "train.log_every=1", "train.deterministic=true", "checkpoint.every_s=0",
                                            *overrides])
