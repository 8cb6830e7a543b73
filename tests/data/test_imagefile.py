"""The server's NumPy/PIL decoder (cvrecipe.imagefile.decode_array) against the training decoder
(cvrecipe.data.images.decode_images, torchvision's JPEG decode and resize): the same pixels from
the same files, the same refusals."""
import io

import numpy as np
import pytest
from PIL import Image

from cvrecipe.data.images import decode_images
from cvrecipe.imagefile import ImageRefused, decode_array

from conftest import encode, pattern_image


def torch_path(data: bytes, channels: int, target: tuple[int, int]) -> np.ndarray:
    x, good, skipped = decode_images([("f", data)], channels, target, threads=1)
    assert good == [0], skipped
    return x[0]


def sixteen_bit_png(size: int) -> bytes:
    arr = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 257) % 65535
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def rgba_png(size: int) -> bytes:
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


RNG = np.random.default_rng(0)
FILES = {  # name → (file bytes, source side)
    "png-rgb": (encode(pattern_image(1, 32, RNG), "PNG"), 32),
    "png-gray": (encode(pattern_image(2, 32, RNG, channels=1), "PNG"), 32),
    "png-rgba": (rgba_png(32), 32),
    "png-16bit": (sixteen_bit_png(32), 32),
    "jpeg-rgb": (encode(pattern_image(0, 32, RNG)), 32),
    "jpeg-gray": (encode(pattern_image(1, 32, RNG, channels=1)), 32),
    "jpeg-large": (encode(pattern_image(2, 200, RNG)), 200),  # ≥ 4× a 28/32 target: decoded at reduced DCT scale
    "bmp": (encode(pattern_image(0, 40, RNG), "BMP"), 40),
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("side", [None, 28, 48])  # None: the file's own size (no resize); then shrink, enlarge
def test_same_pixels_as_the_training_decoder(name, channels, side):
    data, own = FILES[name]
    target = (side or own, side or own)
    ours, reference = decode_array(data, channels, target), torch_path(data, channels, target)
    assert ours.dtype == np.uint8 and ours.shape == reference.shape == (channels, *target)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    if side is None or side == own:
        # no resize: the same decoders' pixels (PIL for PNG/BMP; libjpeg-turbo in PIL and torchvision for JPEG)
        assert diff.max() == 0
    else:
        # PIL's and torchvision's antialiased bilinear resizes round differently: one grey level at most
        assert diff.max() <= 1 and diff.mean() < 0.1


@pytest.mark.parametrize("data, code", [(b"", "empty_image"), (b"not an image at all", "not_an_image"),
                                        (FILES["jpeg-rgb"][0][:-40], "corrupt_image"),
                                        (FILES["png-rgb"][0][:60], "corrupt_image")])
def test_same_refusals_as_the_training_decoder(data, code):
    with pytest.raises(ImageRefused) as err:
        decode_array(data, 3, (32, 32))
    assert err.value.code == code
    _, good, skipped = decode_images([("f", data)], 3, (32, 32), threads=1)
    assert good == [] and len(skipped) == 1


def test_pixel_limit_is_checked_from_the_header():
    data = encode(pattern_image(0, 64, RNG), "PNG")
    with pytest.raises(ImageRefused, match="the server's --max-pixels") as err:
        decode_array(data, 3, (32, 32), max_pixels=64 * 64 - 1, setting="the server's --max-pixels")
    assert err.value.code == "too_many_pixels"
