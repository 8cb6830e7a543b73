"""A generated image folder with planted near duplicates and label flips, for the embedding audit.

Every image is a random smooth colour field with a few random discs and bars; each class has its
own colour cast, so a linear probe on embeddings learns the classes. Planted: copies of train
images in test and train, each changed as a real copy would be (resized, recompressed, mirrored,
cropped a few pixels, re-toned), and train images filed under another class."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("red", "green", "blue")
CAST = {"red": (90, -40, -40), "green": (-40, 90, -40), "blue": (-40, -40, 90)}
SIDE = 32


def picture(rng: np.random.Generator, cls: str, side: int = SIDE) -> np.ndarray:
    """(side, side, 3) uint8: a smooth random field, shapes, and the class's colour cast."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(4):
        x, y, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(3, side // 3))]
        colour = tuple(rng.integers(0, 256, 3).tolist())
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.rectangle([x - r, y - 2, x + r, y + 2], fill=colour)
    return np.clip(np.asarray(coarse).astype(np.int16) + CAST[cls], 0, 255).astype(np.uint8)


def save(path: Path, arr: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def variants(arr: np.ndarray) -> dict[str, np.ndarray | tuple[np.ndarray, int]]:
    """How a copy of `arr` may differ: name → (pixels, JPEG quality)."""
    img = Image.fromarray(arr)
    side = arr.shape[0]
    cropped = img.crop((2, 1, side - 1, side - 2)).resize((side, side), Image.BILINEAR)
    toned = np.clip(arr.astype(np.float32) * 0.85 + 20, 0, 255).astype(np.uint8)
    return {"resized": (np.asarray(img.resize((48, 48), Image.BICUBIC)), 95),  # decoded back to 32 px
            "recompressed": (arr, 40),
            "mirrored": (arr[:, ::-1].copy(), 90),
            "cropped": (np.asarray(cropped), 90),
            "retoned": (toned, 90)}


def make_folder(root: Path, per_class: tuple[int, int] = (40, 12), flips: int = 4, seed: int = 0) -> dict:
    """Write train/test images under `root`; returns what was planted:
    {"leaks": {test file: train file}, "within": {train copy: train original}, "flips": [train file]}."""
    rng = np.random.default_rng(seed)
    originals: dict[str, np.ndarray] = {}
    for split, count in zip(("train", "test"), per_class):
        for cls in CLASSES:
            for i in range(count):
                arr = picture(rng, cls)
                rel = f"{split}/{cls}/{i:03d}.jpg"
                save(root / rel, arr)
                originals[rel] = arr
    planted = {"leaks": {}, "within": {}, "flips": []}
    for k, (name, (arr, quality)) in enumerate(variants(originals["train/red/000.jpg"]).items()):
        cls = CLASSES[k % 3]
        source = f"train/{cls}/{k + 1:03d}.jpg"
        arr, quality = variants(originals[source])[name]
        rel = f"test/{cls}/leak-{name}.jpg"
        save(root / rel, arr, quality)
        planted["leaks"][rel] = source
    for k, name in enumerate(("mirrored", "cropped")):
        source = f"train/blue/{10 + k:03d}.jpg"
        arr, quality = variants(originals[source])[name]
        rel = f"train/blue/dup-{name}.jpg"
        save(root / rel, arr, quality)
        planted["within"][rel] = source
    for k in range(flips):  # a picture of one class filed under the next
        cls, wrong = CLASSES[k % 3], CLASSES[(k + 1) % 3]
        rel = f"train/{wrong}/flip-{k}.jpg"
        save(root / rel, picture(rng, cls))
        planted["flips"].append(rel)
    return planted
