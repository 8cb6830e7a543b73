"""masks:PATH, image/mask pairs for segmentation: the layouts and mask kinds read right, every bad pair
is named with its file and reason (never resized or dropped silently), the cache, seeded holdout and
K-fold splits, and the real ISBI 2012 membrane archive."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from cvrecipe.config import DataConfig, load_config
from cvrecipe.data import IGNORE, DataError, load_dataset, load_source

from conftest import SHARED_DATA, make_shapes_masks, shapes_pair


def png(array: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    if palette:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_bad_pairs_are_skipped_and_named(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "cells.tar.gz"
    (tmp_path / "cells.yaml").write_text("classes: [background, disc, square]\ncolours: [[0, 0, 0], [255, 0, 0], "
                                         "[0, 0, 255]]\n")
    good = {}
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(6):
            image, mask = shapes_pair(32, rng)
            good[f"{i}"] = mask
            add(tf, f"data/image/{i}.png", png(image))
            add(tf, f"data/label/{i}.png", png(mask))
        image, mask = shapes_pair(32, rng)
        add(tf, "data/image/lonely.png", png(image))  # no mask
        add(tf, "data/label/orphan.png", png(mask))  # no image
        add(tf, "data/image/small.png", png(image))
        add(tf, "data/label/small.png", png(mask[:16]))  # mask of another size
        bad_values = mask.copy()
        bad_values[0, :3] = 7  # no class has value 7
        add(tf, "data/image/seven.png", png(image))
        add(tf, "data/label/seven.png", png(bad_values))
        add(tf, "data/image/broken.png", b"\x89PNG\r\n\x1a\nnot really")
        add(tf, "data/label/broken.png", png(mask))
        add(tf, "data/image/big.png", png(np.zeros((40, 40), np.uint8)))  # another size than the dataset's
        add(tf, "data/label/big.png", png(np.zeros((40, 40), np.uint8)))
    with pytest.warns(UserWarning, match="skipped"):
        ds = load_source(f"masks:{archive}", DataConfig(name=f"masks:{archive}"))
    reasons = dict(ds.skipped)
    assert "image without a mask" in reasons["data/image/lonely.png"]
    assert "mask without an image" in reasons["data/label/orphan.png"]
    small = reasons["data/label/small.png"]
    assert "mask is 32x16" in small and "data/image/small.png" in small
    assert "[7]" in reasons["data/label/seven.png"]
    assert "data/image/broken.png" in reasons
    assert "40x40" in reasons["data/image/big.png"] and "data.image_size" in reasons["data/image/big.png"]
    assert len(reasons) == 6
    # the good pairs, in name order, masks as stored, names and colours from the YAML beside the archive
    assert ds.classes == ["background", "disc", "square"] and ds.colours[1] == [255, 0, 0]
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.train.y.dtype == np.uint8 and ds.train.y.shape == (6, 32, 32)
    assert ds.train.names == [f"data/image/{i}.png" for i in range(6)]
    for i in range(6):
        np.testing.assert_array_equal(ds.train.y[i], good[str(i)])
    again = load_source(f"masks:{archive}", DataConfig(name=f"masks:{archive}"))  # from the cache
    np.testing.assert_array_equal(again.train.y, ds.train.y)
    assert again.skipped == ds.skipped


def test_mask_kinds_palette_binary_and_splits(tmp_path):
    rng = np.random.default_rng(1)
    voc = tmp_path / "voc"
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # VOC: 255 = void
    for split, count in (("train", 4), ("val", 2)):
        (voc / split / "image").mkdir(parents=True)
        (voc / split / "mask").mkdir(parents=True)
        for i in range(count):
            image, mask = shapes_pair(24, rng)
            mask[0, :] = IGNORE  # a void border row
            Image.fromarray(image).save(voc / split / "image" / f"{i}.jpg", quality=95)
            (voc / split / "mask" / f"{i}.png").write_bytes(png(mask, "P", palette))
    ds = load_dataset(load_config(None, ["task=segmentation", f"data.name=masks:{voc}"]).data)
    assert ds.classes == ["0", "1", "2"] and ds.colours[1] == [128, 0, 0]  # colours from the palette
    assert len(ds.train) == 4 and len(ds.val) == 2  # the source's own val split
    assert set(np.unique(ds.train.y)) <= {0, 1, 2, IGNORE} and (ds.train.y[:, 0] == IGNORE).all()

    binary = tmp_path / "binary"
    for kind in ("image", "label"):
        (binary / kind).mkdir(parents=True)
    for i in range(5):
        image, mask = shapes_pair(24, rng)
        Image.fromarray(image).save(binary / "image" / f"{i}.png")
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(binary / "label" / f"{i}.png")
    cfg = load_config(None, ["task=segmentation", f"data.name=masks:{binary}", "data.val_fraction=0.2"])
    ds = load_dataset(cfg.data)
    assert ds.classes == ["0", "255"] and set(np.unique(ds.train.y)) == {0, 1}  # 0/255: two classes, no ignore
    assert len(ds.train) == 4 and len(ds.val) == 1


def test_folds_are_fixed_disjoint_and_cover_the_training_images(tmp_path):
    data = make_shapes_masks(tmp_path / "shapes", count=10, size=16)
    held = []
    for fold in range(5):
        for seed in (0, 3):  # folds do not move with the training seed
            cfg = load_config(None, ["task=segmentation", f"data.name=masks:{data}", "data.folds=5",
                                     f"data.fold={fold}", f"train.seed={seed}"])
            ds = load_dataset(cfg.data, seed=seed)
            assert len(ds.train) == 8 and len(ds.val) == 2
            assert not set(ds.train.names) & set(ds.val.names)
        held += ds.val.names
    assert sorted(held) == sorted(f"image/{i}.png" for i in range(10))
    with pytest.raises(Exception, match="data.fold=5"):
        load_config(None, ["task=segmentation", f"data.name=masks:{data}", "data.folds=5", "data.fold=5"])


def test_missing_and_empty_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(f"masks:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    (tmp_path / "empty" / "stuff" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no image/NAME"):
        load_source(f"masks:{tmp_path / 'empty'}")


@pytest.mark.skipif(not (SHARED_DATA / "isbi2012-membrane.tar.gz").is_file(),
                    reason="needs ../shared/data/isbi2012-membrane.tar.gz (the ISBI 2012 membrane archive)")
def test_isbi_membrane_archive_loads_as_two_classes():
    archive = SHARED_DATA / "isbi2012-membrane.tar.gz"
    ds = load_source(f"masks:{archive}")
    assert ds.classes == ["0", "255"] and not ds.skipped
    assert ds.train.x.shape == (30, 1, 512, 512) and ds.train.y.shape == (30, 512, 512)
    assert 0.20 < (ds.train.y == 0).mean() < 0.24  # membrane: 22% of the pixels
