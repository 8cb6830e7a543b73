"""Shared fixtures: an isolated cache per test and small real image folders built on the fly."""
from __future__ import annotations

import io
import os
import sys
import threading
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


def shapes_pair(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A learnable segmentation pair: a noisy gray background (class 0) with red discs (class 1) and
    green squares (class 2). Returns (H, W, 3) uint8 image and (H, W) uint8 class-index mask."""
    image = rng.normal(80, 15, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(2, 4))):
        cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(4, max(5, size // 6))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        image[disc], mask[disc] = rng.normal((210, 50, 50), 12, (disc.sum(), 3)), 1
    for _ in range(int(rng.integers(1, 3))):
        top, left, side = rng.integers(0, size - 8), rng.integers(0, size - 8), rng.integers(6, max(7, size // 4))
        square = np.zeros((size, size), bool)
        square[top:top + side, left:left + side] = True
        image[square], mask[square] = rng.normal((50, 190, 70), 12, (square.sum(), 3)), 2
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_shapes_masks(root: Path, count: int = 24, size: int = 48, seed: int = 0, splits=("",)) -> Path:
    """root/[split/]image/i.png + root/[split/]label/i.png: `count` shapes pairs per split."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for kind in ("image", "label"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = shapes_pair(size, rng)
            Image.fromarray(image).save(root / split / "image" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "label" / f"{i}.png")
    return root


# -- leaving -------------------------------------------------------------------------------------------
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with the session's exit status once every report is written, without the interpreter's
    teardown. The session hosts native thread pools (torch.distributed's launcher and stores, ONNX
    Runtime sessions of in-process servers) whose static destructors can run while one of their
    threads is still alive: once in a full run, after every test had passed, the process aborted in
    that teardown ("terminate called without an active exception"), and make saw the abort instead
    of the result. The threads still alive are named, for whoever looks into it."""
    if not _EXIT_STATUS:
        return
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    if alive:
        print(f"\nthreads alive at exit ({len(alive)}): {', '.join(alive)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])
