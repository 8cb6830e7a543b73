"""The guarded decoder (cvrecipe/data/images.py): headers read and checked against the pixel limit
before any pixel is decoded, in every format; reduced-scale decoding of large JPEGs; the batched
fast path equal to one-by-one decoding; one grayscale rule for every format (PIL's convert('L')
as the reference); far-too-small images reported."""
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvrecipe.cli import build_parser
from cvrecipe.config import DataConfig
from cvrecipe.data import load_dataset, load_source
from cvrecipe.data.images import (MAX_PIXELS, ImageRefused, decode_images, read_header, rgb_to_luma)
from cvrecipe.serve.settings import ServeSettings

from conftest import make_image_folder
from image_files import FORGERS, encode, jpeg_declaring

CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_growth_mb(fn) -> float:
    """How far the process' peak resident memory rises above its current size while `fn` runs
    (Linux: the peak is reset through /proc/self/clear_refs first). The decoder's libraries are
    loaded before, so only what `fn` decodes counts."""
    def status(key: str) -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
    decode_images([("warm-up", encode(smooth_photo(64, 64), "JPEG"))], 3, (8, 8))
    CLEAR_REFS.write_text("5")
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


needs_proc = pytest.mark.skipif(not CLEAR_REFS.exists(), reason="peak memory is read from Linux's /proc/self")


def smooth_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) image: smooth gradients and blobs plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * xx + c) * np.cos(4 * yy - c) * 90 + 128 for c in range(3)]
    img = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning, in the test
@pytest.mark.parametrize("fmt", sorted(FORGERS))
def test_forged_headers_are_refused_unread_in_every_format(fmt):
    width, height = (9000, 9000) if fmt == "WEBP" else (12_000, 9_000)  # above 40 Mpx, under PIL's ceiling
    data = FORGERS[fmt](width, height)
    with Image.open(io.BytesIO(data)) as img:  # PIL, the reference, reads the same size from the header
        assert img.size == (width, height)
    header = read_header(data)
    assert (header.format, header.width, header.height) == (fmt, width, height)
    x, good, skipped = decode_images([("bomb", data)], 3, (16, 16))
    assert not good and len(x) == 0
    assert f"{width}x{height}" in skipped[0][1] and "refused without decoding" in skipped[0][1]
    beyond = FORGERS[fmt](16_384, 16_384) if fmt == "WEBP" else FORGERS[fmt](60_000, 60_000)
    assert "refused without decoding" in decode_images([("bomb", beyond)], 3, (16, 16))[2][0][1]


@needs_proc
def test_a_jpeg_bomb_costs_no_memory_and_ordinary_files_still_decode():
    bomb = jpeg_declaring(30_000, 30_000)  # 629 bytes; decoded it would be 2.7 GB
    good = encode(smooth_photo(16, 16), "JPEG")
    result = {}
    growth = peak_rss_growth_mb(lambda: result.update(out=decode_images([("a", good), ("bomb", bomb), ("b", good)],
                                                                        3, (16, 16))))
    x, good_idx, skipped = result["out"]
    assert good_idx == [0, 2] and [name for name, _ in skipped] == ["bomb"]
    assert growth < 50, f"peak memory rose {growth:.0f} MB"


def test_a_bomb_in_a_training_folder_is_skipped_and_named(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 10, "test": 3})
    (tmp_path / "train" / "dog" / "bomb.jpg").write_bytes(jpeg_declaring(20_000, 20_000))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\) \(e.g. train/dog/bomb.jpg: declares 20000x20000"
                                         r".*\); all listed in \S+/skipped_files.txt$") as seen:
        ds = load_source(f"folder:{tmp_path}")
    assert ds.skipped == [("train/dog/bomb.jpg", ds.skipped[0][1])] and len(ds.train) == 30
    listing = Path(str(seen[-1].message).rsplit("all listed in ", 1)[1])
    assert listing.read_text() == "".join(f"{name}\t{why}\n" for name, why in ds.skipped)


def test_the_pixel_limit_is_a_setting_and_the_server_default_is_the_same(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 10, "test": 3}, size=16)
    (tmp_path / "train" / "cat" / "big.jpg").write_bytes(encode(smooth_photo(48, 48), "JPEG"))
    with pytest.warns(UserWarning, match=r"big.jpg: declares 48x48 = 2,304 pixels, above the limit of 1,000 "
                                         r"\(data.max_pixels\)"):
        ds = load_dataset(DataConfig(name=f"folder:{tmp_path}", max_pixels=1000))
    assert len(ds.train) + len(ds.val) == 30
    assert DataConfig().max_pixels == MAX_PIXELS == ServeSettings(".").max_pixels
    assert build_parser().parse_args(["serve", "RUN"]).max_pixels == MAX_PIXELS  # `serve --max-pixels`


def test_large_jpegs_decode_at_reduced_scale_close_to_a_full_decode_and_resize():
    """The DCT-domain shortcut against the reference: torchvision's full decode, then the same
    antialiased resize. Close (the shortcut averages in the frequency domain), never identical."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2.functional import resize

    data = encode(smooth_photo(1200, 1600), "JPEG", quality=92)
    x, good, _ = decode_images([("photo", data)], 3, (32, 48))
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    reference = resize(full, [32, 48], antialias=True).numpy()
    diff = np.abs(x[0].astype(int) - reference.astype(int))
    assert good == [0] and diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


@needs_proc
def test_a_6000px_jpeg_for_a_small_model_never_exists_at_full_size_in_memory():
    ramp = Image.linear_gradient("L").resize((6000, 6000))  # made by PIL in C: seconds faster than numpy
    buf = io.BytesIO()
    Image.merge("RGB", [ramp, ramp.rotate(90), ramp.rotate(180)]).save(buf, "JPEG", quality=80)
    data = buf.getvalue()  # 108 MB as decoded RGB
    growth = peak_rss_growth_mb(lambda: decode_images([("big", data)] * 4, 3, (32, 32)))
    assert growth < 40, f"peak memory rose {growth:.0f} MB for four 6000x6000 JPEGs"


def test_batched_and_one_by_one_decodes_agree_exactly():
    rng = np.random.default_rng(3)
    files = [encode(smooth_photo(16, 16, s), "JPEG") for s in range(5)]
    files += [encode(smooth_photo(20, 12, 7), "JPEG"), encode(smooth_photo(16, 16, 8)[..., 0], "JPEG"),
              encode(smooth_photo(16, 16, 9), "PNG"), encode(rng.integers(0, 255, (16, 16, 3), np.uint8), "JPEG"),
              b"not an image", encode(smooth_photo(16, 16, 10), "JPEG")[:300]]
    items = [(str(i), f) for i, f in enumerate(files)]
    for channels in (1, 3):
        together, good, skipped = decode_images(items, channels, (16, 16))
        alone = [decode_images([item], channels, (16, 16)) for item in items]
        assert good == [i for i, (x, _, _) in enumerate(alone) if len(x)]
        assert np.array_equal(together, np.concatenate([x for x, _, _ in alone if len(x)]))
        assert [name for name, _ in skipped] == ["9", "10"]


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}),
                                          ("JPEG", {"quality": 90}), ("GIF", {})])
def test_one_grayscale_rule_for_every_format(fmt, options):
    """Colour → gray is PIL's convert('L') (ITU-R 601 luma, rounded) whatever the format, the
    batched JPEG path included: compared with PIL on the decoded RGB of the same file."""
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    data = encode(pixels, fmt, **options)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    expected = np.asarray(rgb.convert("L"))
    for items in ([("a", data)], [("a", data), ("b", data)]):  # one by one, and batched
        x, good, _ = decode_images(items, 1, (24, 24))
        assert all(np.array_equal(img[0], expected) for img in x), fmt
    gray = np.asarray(Image.open(io.BytesIO(encode(pixels[..., 1], fmt, **options))).convert("L"))
    assert np.array_equal(decode_images([("g", encode(pixels[..., 1], fmt, **options))], 1, (24, 24))[0][0, 0], gray)


def test_the_grayscale_rule_is_pils_bit_for_bit_and_named_datasets_use_it():
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = rgb_to_luma(torch.from_numpy(pixels).permute(2, 0, 1))[0].numpy()
    assert np.array_equal(ours, np.asarray(Image.fromarray(pixels).convert("L")))
    ds = load_dataset(DataConfig(name="digits", channels=3))
    gray = load_dataset(DataConfig(name="digits", channels=1))
    assert np.array_equal(rgb_to_luma(torch.from_numpy(ds.train.x)).numpy(), gray.train.x)


def test_images_far_smaller_than_the_target_are_reported_once(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 8, "test": 2}, size=16)
    (tmp_path / "train" / "fox" / "dot.png").write_bytes(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    with pytest.warns(UserWarning, match=r"1 image\(s\) far smaller than the 32x32 .*; all listed in \S+/small_images.txt$"
                      ) as warned:
        load_source(f"folder:{tmp_path}", DataConfig(name=f"folder:{tmp_path}", image_size=32))
    listing = Path(str(warned[-1].message).rsplit("all listed in ", 1)[1])
    assert listing.read_text() == "train/fox/dot.png\t1x1\n"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_source(f"folder:{tmp_path}", DataConfig(name=f"folder:{tmp_path}", image_size=32))
    assert not [w for w in seen if "far smaller" in str(w.message)]  # once per process, not once per load


def test_header_errors_say_why():
    with pytest.raises(ImageRefused, match="empty"):
        read_header(b"")
    with pytest.raises(ImageRefused, match="not a recognised image format"):
        read_header(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # PIL could open EPS (through Ghostscript): not allowed here
