"""Data audit: planted duplicates, leakage and broken files in a generated folder are found (and
nothing else is); statistics match direct numpy computations; the page renders in a browser."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cvrecipe.cli import main
from cvrecipe.config import DataConfig, load_config
from cvrecipe.data import load_dataset, load_source
from cvrecipe.data import audit as A
from cvrecipe.data.augment import augment_batch
from cvrecipe.artifact.build import build_model
from cvrecipe.data.report import model_view

from pagecheck import view_page

CLASSES = ("cat", "dog", "fox")


def smooth_image(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A random smooth colour image: distinct draws share no structure (unlike class patterns)."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR))


def save(path, arr, fmt="JPEG", quality=95):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())


@pytest.fixture
def planted(tmp_path):
    """train: 10 per class, test: 4 per class, plus the planted cases the audit must find."""
    root, rng = tmp_path / "data", np.random.default_rng(1)
    for split, count in (("train", 10), ("test", 4)):
        for cls in CLASSES:
            for i in range(count):
                save(root / split / cls / f"{i}.jpg", smooth_image(rng))
    shutil.copy(root / "train/cat/0.jpg", root / "train/cat/copy.jpg")  # exact, within train
    shutil.copy(root / "train/dog/1.jpg", root / "test/dog/leak.jpg")  # exact, train → test
    source = np.asarray(Image.open(root / "train/fox/2.jpg")).astype(np.float32)
    save(root / "test/fox/near.jpg", np.clip(source * 1.1 + 5, 0, 255).astype(np.uint8), quality=70)  # near leak
    source = np.asarray(Image.open(root / "train/cat/3.jpg")).astype(np.float32)
    toned = (source * 0.9 + 10).round().astype(np.uint8)
    save(root / "train/dog/relabelled.png", toned, fmt="PNG")  # near (re-toned), within train, another label
    save(root / "train/fox/big.png", smooth_image(rng, 24), fmt="PNG")  # another size, resized when decoded
    save(root / "train/fox/gray.png", smooth_image(rng)[:, :, 0], fmt="PNG")  # mode L
    (root / "test/cat/broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (root / "train/dog/empty.png").write_bytes(b"")
    return root


def _pair_files(summary):
    return {frozenset((e["a"]["file"], e["b"]["file"])) for e in summary["examples"]}


def test_audit_finds_planted_duplicates_leakage_and_broken_files(planted):
    name = f"folder:{planted}"
    ds = load_source(name, DataConfig(name=name))
    names, headers = A.folder_files(planted, ds)
    assert names is not None and len(names["train"]) == len(ds.train) and len(names["test"]) == len(ds.test)
    dups = A.find_duplicates(ds, names)

    exact = dups["exact"]
    assert exact["groups"] == 2
    assert exact["within"] == {"train": {"images": 2, "pairs": 1}}
    assert exact["across"] == {"train-test": {"images": 1, "pairs": 1}}
    assert _pair_files(exact) == {frozenset({"train/cat/0.jpg", "train/cat/copy.jpg"}),
                                  frozenset({"train/dog/1.jpg", "test/dog/leak.jpg"})}
    near = dups["near"]
    assert _pair_files(near) == {frozenset({"train/fox/2.jpg", "test/fox/near.jpg"}),
                                 frozenset({"train/cat/3.jpg", "train/dog/relabelled.png"})}
    assert near["across"] == {"train-test": {"images": 1, "pairs": 1}} and near["label_conflicts"] == 1
    assert near["examples"][0]["b"]["file"] == "test/fox/near.jpg"  # leakage is listed first

    assert {f for f, _ in ds.skipped} == {"test/cat/broken.jpg", "train/dog/empty.png"}
    assert headers["sizes"] == {"16x16": 47, "24x24": 1}  # from headers, before resizing
    assert headers["modes"] == {"RGB": 47, "L": 1} and headers["formats"] == {"JPEG": 45, "PNG": 3}


def test_statistics_match_direct_computation(planted):
    ds = load_source(f"folder:{planted}", DataConfig(name=f"folder:{planted}"))
    balance = A.class_balance(ds)
    counts = np.bincount(ds.train.y, minlength=3)
    assert balance["train"]["class_counts"] == dict(zip(ds.classes, counts.tolist()))
    assert balance["train"]["imbalance_ratio"] == pytest.approx(counts.max() / counts.min())
    stats = A.channel_stats(ds.train.x, chunk=7)  # several chunks
    pixels = ds.train.x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(1), atol=1e-4)
    np.testing.assert_allclose(stats["std"], pixels.std(1), atol=1e-4)


def test_model_view_is_the_augmented_batch_denormalised(planted):
    cfg = load_config("digits-quick", ["augment.crop_padding=2", "augment.hflip=true", "augment.cutout=4"])
    name = f"folder:{planted}"
    view = model_view(cfg, name, n=8, normalizer=lambda c, ds: build_model(c, ds).normalize)
    train = load_dataset(DataConfig(name=name), seed=cfg.train.seed).train  # after the val carve-out
    gen = torch.Generator().manual_seed(cfg.train.seed)
    idx = torch.randperm(len(train), generator=gen)[:8].numpy()
    assert torch.equal(view["original"], torch.from_numpy(train.x[idx]))
    expected = augment_batch(view["original"], cfg.augment, True, gen)
    assert torch.equal(view["draw1"], expected)
    for stats in view["batch_stats_after_normalize"]:  # what the network receives is standardised
        assert all(abs(m) < 0.6 for m in stats["mean"])


def test_cli_inspect_writes_report_and_json_that_render(planted, tmp_path):
    out = tmp_path / "report"
    assert main(["data", "inspect", f"folder:{planted}", "--out", str(out), "--recipe", "digits-quick"]) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["exact_duplicates"]["groups"] == 2 and len(audit["unreadable"]) == 2
    assert audit["splits"]["test"]["images"] == 14
    info = view_page(out / "report.html", tmp_path / "data-report.png")
    assert info["title"].startswith("Data report")
    assert len(info["images"]) >= 8 and all(i["width"] > 0 and i["shown"] > 0 for i in info["images"])
    assert info["tables"] and all(rows > 0 for rows in info["tables"])
    assert {"Class balance", "Near duplicates", "What the model sees"} <= set(info["headings"])
    assert (tmp_path / "data-report.png").stat().st_size > 10_000
