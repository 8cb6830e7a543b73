"""Fuzzing the guarded decoder with hypothesis: real PNG, JPEG, GIF, TIFF, WebP and BMP files in
many colour modes, then damaged (bytes flipped, cut, inserted, copied) or given forged headers
declaring up to 65535 x 65535 pixels. Properties: the decoder never raises, every file is either
a uint8 image of the requested shape or skipped with a reason, nothing beyond the pixel limit is
ever decoded, and the peak memory of a decode stays under a bound. JPEG headers are read the way
libjpeg reads them (libjpeg, through torchvision, is the reference). `python bench/fuzz.py` runs
the same properties on many more cases."""
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from PIL import Image

from cvrecipe.data.images import ImageRefused, decode_images, jpeg_size, read_header

from image_files import strategies

CASES = 2000  # damaged or forged files per run (~7 s here); plus CASES // 5 intact ones and JPEG_CASES
JPEG_CASES = 600
LIMIT = 1_000_000  # pixels: a decode within it costs a few MB, so a bomb would stand out
MEMORY_BOUND_MB = 64  # peak resident growth allowed for one file
real_files, fuzzed_files = strategies()
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


@pytest.fixture(scope="module", autouse=True)
def decoder_loaded():
    """Load the decoding libraries once, so per-case memory counts only the case itself."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG")
    decode_images([("warm-up", buf.getvalue())] * 2, 3, (16, 16))


@given(case=fuzzed_files())
@settings(FUZZ, max_examples=CASES)
def test_damaged_and_forged_files_never_crash_or_blow_memory(case):
    fmt, data = case
    measure = CLEAR_REFS.exists()
    if measure:
        CLEAR_REFS.write_text("5")  # reset the peak: VmHWM then tells this case's peak
        before = _status_kb("VmRSS:")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoders' own warnings about damaged data
        channels = 1 if len(data) % 2 else 3
        x, good, skipped = decode_images([("f", data)], channels, (16, 16), max_pixels=LIMIT)
    if measure:
        growth_mb = (_status_kb("VmHWM:") - before) / 1024
        assert growth_mb < MEMORY_BOUND_MB, f"{fmt}: peak memory rose {growth_mb:.0f} MB"
    event("decoded" if good else "skipped")
    if good:
        assert x.shape == (1, channels, 16, 16) and x.dtype == np.uint8 and not skipped
        header = read_header(data)
        assert header.width * header.height <= LIMIT
    else:
        assert len(x) == 0 and len(skipped) == 1 and skipped[0][1], (fmt, skipped)


@given(case=real_files())
@settings(FUZZ, max_examples=CASES // 5)
def test_intact_files_always_decode(case):
    fmt, data = case
    x, good, skipped = decode_images([("f", data)], 3, (16, 16))
    assert good == [0], (fmt, skipped)


@given(case=fuzzed_files(formats=("JPEG",)))
@settings(FUZZ, max_examples=JPEG_CASES)
def test_jpeg_headers_are_read_as_libjpeg_reads_them(case):
    """Whenever libjpeg decodes a (damaged) JPEG, its size is the size the header check saw; run
    only where both our reader and PIL's promise a small image, so a disagreement cannot cost GBs."""
    from torchvision.io import ImageReadMode, decode_jpeg

    _, data = case
    ours = jpeg_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                pil = img.size
    except Exception:  # noqa: BLE001 - PIL cannot read it: no second opinion on the size
        pil = None
    if ours is None or pil is None or ours[0] * ours[1] > LIMIT or pil[0] * pil[1] > LIMIT:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return  # libjpeg refused it too
    event("compared with libjpeg")
    assert tuple(decoded.shape[1:]) == (ours[1], ours[0])


def test_a_header_the_reader_gets_wrong_is_caught_after_the_decode():
    """Defence in depth: if a decoder ever produced another size than the header declared, the file
    is refused rather than passed on (here a JPEG whose second frame header libjpeg rejects)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = buf.getvalue()
    sof = data.index(b"\xff\xc0")
    length = int.from_bytes(data[sof + 2:sof + 4], "big")
    twice = data[:sof + 2 + length] + data[sof:sof + 2 + length] + data[sof + 2 + length:]
    x, good, skipped = decode_images([("twice", twice)], 3, (8, 8))
    assert not good and skipped[0][1]
    with pytest.raises(ImageRefused):
        read_header(b"\xff\xd8\xff")
