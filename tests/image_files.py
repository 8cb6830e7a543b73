"""Image files for decoder tests: real encodings in every format the decoder takes, and forged
headers that declare a size the file does not hold (decompression bombs: a few hundred bytes that
would decode to gigabytes)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP")


def encode(pixels: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    """(H, W, 3) or (H, W) uint8 → the bytes of an image file in `fmt` (PIL's encoder)."""
    img = Image.fromarray(pixels)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _tiny(fmt: str, mode: str = "RGB") -> bytearray:
    return bytearray(encode(np.full((8, 8, 3), 128, np.uint8), fmt, mode))


def jpeg_declaring(width: int, height: int) -> bytes:
    """An 8×8 JPEG whose frame header (SOF0) says width × height: libjpeg would allocate and fill
    all of it (the rest of the image is 'missing' and painted grey)."""
    data = _tiny("JPEG")
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_declaring(width: int, height: int) -> bytes:
    """An 8×8 GIF whose logical screen and first frame both say width × height."""
    data = _tiny("GIF", "P")
    data[6:10] = struct.pack("<HH", width, height)
    frame = data.index(b"\x2c")  # image descriptor: 0x2C, left, top, width, height
    data[frame + 5:frame + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = _tiny("BMP")
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    """A hand-made uncompressed grayscale TIFF: one strip of 64 bytes, tags saying width × height."""
    pixels = b"\x80" * 64
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]
    ifd_size = 2 + 12 * len(tags) + 4
    strip_offset = 8 + ifd_size
    body = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = strip_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + body + struct.pack("<I", 0) + pixels


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless 8×8 WebP whose VP8L header says width × height (14 bits each: at most 16384)."""
    data = bytearray(encode(np.full((8, 8, 3), 128, np.uint8), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8 + 1  # chunk tag, size, then the 0x2F signature byte
    bits = int.from_bytes(data[at:at + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at:at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


FORGERS = {"JPEG": jpeg_declaring, "PNG": png_declaring, "GIF": gif_declaring, "BMP": bmp_declaring,
           "TIFF": tiff_declaring, "WEBP": webp_declaring}


# -- hypothesis strategies: real files, then damaged or forged (the decoder's fuzz tests and bench/fuzz.py) --

MODES = {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGB", "L", "RGBA", "P", "I;16"), "GIF": ("P", "L"),
         "TIFF": ("RGB", "L", "RGBA", "CMYK"), "WEBP": ("RGB", "RGBA"), "BMP": ("RGB", "L", "P")}


def strategies():
    """(real_files, fuzzed_files): hypothesis strategies of (format, bytes). Imported lazily so that
    this module needs hypothesis only where it fuzzes."""
    from hypothesis import strategies as st

    @st.composite
    def real_files(draw, formats=FORMATS):
        fmt = draw(st.sampled_from(formats))
        mode = draw(st.sampled_from(MODES[fmt]))
        width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
        seed = draw(st.integers(0, 2**32 - 1))
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert(mode) if mode != "I;16" else \
            Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": draw(st.integers(5, 95))} if fmt == "JPEG" else {}))
        return fmt, buf.getvalue()

    @st.composite
    def fuzzed_files(draw, formats=FORMATS):
        """A real file then one damage: bytes flipped, cut short, bytes inserted, a region copied
        elsewhere, or a forged header declaring up to 65535 x 65535 pixels (with more damage on top)."""
        fmt, data = draw(real_files(formats))
        data = bytearray(data)
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "forge", "intact"]))
        if kind == "forge":
            side = 16_384 if fmt == "WEBP" else 65_535
            data = bytearray(FORGERS[fmt](draw(st.integers(1, side)), draw(st.integers(1, side))))
            kind = draw(st.sampled_from(["flip", "intact"]))
        if kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "splice":
            start = draw(st.integers(0, len(data) - 1))
            piece = data[start:start + draw(st.integers(1, 256))]
            at = draw(st.integers(0, len(data)))
            data[at:at] = piece
        return fmt, bytes(data)

    return real_files, fuzzed_files
