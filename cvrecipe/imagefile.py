"""Image files without torch: header checks, and a NumPy/PIL decoder with the training decoder's rules.

What a file is and how many pixels it declares is read from its header before any pixel is
decoded (a 700-byte JPEG may declare 30000×30000 pixels). `decode_array` then turns one file into
the uint8 (C, H, W) array a model takes, by the rules of `cvrecipe.data.images.decode_images`
(alpha onto white, 16-bit scaled to 8-bit, GRAYSCALE_RULE, large JPEGs decoded at reduced DCT
scale, antialiased bilinear resize of the whole image) with NumPy and PIL alone: a server of an
ONNX export imports neither torch nor torchvision. The training decoder batches JPEG decodes with
torchvision and resizes with it; tests/data/test_imagefile.py holds the two to the same pixels
(resizes within one grey level).
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
MAX_PIXELS = 40_000_000  # default pixel limit (width × height): data.max_pixels, `serve --max-pixels`
DRAFT_FACTOR = 4  # JPEGs at least this many times the target per side are decoded at reduced scale
# What PIL may open. Its other plugins (EPS runs Ghostscript, ...) are not for untrusted files.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
GRAYSCALE_RULE = ("ITU-R BT.601 luma of the decoded RGB, L = (19595 R + 38470 G + 7471 B + 32768) >> 16 "
                  "(PIL's convert('L')), for every file format; files stored as grayscale keep their values")


class ImageRefused(ValueError):
    """A file that is not decoded; `code` says why: empty_image, not_an_image, too_many_pixels,
    corrupt_image (the server answers with these codes)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Header(NamedTuple):  # a tuple: made once per file, and ingest reads ~20,000 files a second
    format: str  # JPEG, PNG, GIF, ...
    width: int
    height: int
    components: int  # channels as stored: 1 grayscale, 3 colour, 4 CMYK or with alpha, ...


# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other markers
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI: markers without a length field


def jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, walking the markers as libjpeg does
    (bytes between markers and 0xFF fill bytes skipped); None when no frame header is found before
    the scan. ~1 µs for a CIFAR file, where PIL's Image.open takes ~60 µs: as much as the decode."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1  # libjpeg skips (and warns about) stray bytes before a marker
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _NO_LENGTH:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if length < 8 or i + 10 > n:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return width, height, data[i + 9]
        if length < 2:
            return None
        i += 2 + length
    return None


def read_header(data: bytes) -> Header:
    """The file's format and declared size, from its header alone (no pixel is decoded)."""
    if not data:
        raise ImageRefused("empty_image", "empty file (0 bytes)")
    if data[:3] == JPEG_MAGIC:
        found = jpeg_size(data)
        if found is not None:
            return Header("JPEG", *found)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb warning: the limit is checked by check_pixels
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                header = Header(img.format or "?", img.width, img.height, len(img.getbands()))
    except Image.DecompressionBombError as err:  # PIL's own ceiling, also read from the header
        found = re.search(r"\((\d+) pixels\)", str(err))
        declared = f"declares {int(found.group(1)):,} pixels" if found else str(err)
        raise ImageRefused("too_many_pixels", f"{declared}, above PIL's own ceiling of {2 * Image.MAX_IMAGE_PIXELS:,}; "
                                              f"refused without decoding") from err
    except Exception as err:  # noqa: BLE001 - a header PIL cannot parse, whatever the reason
        raise ImageRefused("not_an_image", "not a recognised image format (PNG, JPEG, GIF, BMP, TIFF, WebP, "
                                           "PPM) or a damaged header") from err
    return header


def check_pixels(header: Header, max_pixels: int, setting: str = "data.max_pixels") -> None:
    """Refuse a header declaring no pixels or more than `max_pixels` (named `setting` in the message)."""
    pixels = header.width * header.height
    if pixels == 0:
        raise ImageRefused("not_an_image", f"the header declares {header.width}x{header.height} pixels")
    if pixels > max_pixels:
        raise ImageRefused("too_many_pixels", f"declares {header.width}x{header.height} = {pixels:,} pixels, above "
                                              f"the limit of {max_pixels:,} ({setting}); refused without decoding")


def pil_decode(data: bytes, draft: tuple[int, int] | None = None) -> np.ndarray:
    """(1 or 3, H, W) uint8 through PIL; `draft` (W, H): for a JPEG, decode at the smallest DCT
    scale (1/2, 1/4, 1/8) that still covers that size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked before, by check_pixels
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        if draft is not None and img.format == "JPEG":
            img.draft(img.mode if img.mode in ("L", "RGB") else None, draft)
        img.load()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float images: scale the full range down to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent → white
        img = Image.alpha_composite(background, img)
    img = img.convert("L" if img.mode in ("1", "L") else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr.copy()  # writable and contiguous, not a view of PIL's buffer


def rgb_to_luma(x: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 RGB → (1, H, W) uint8 luma by GRAYSCALE_RULE (PIL's convert('L'))."""
    w = x.astype(np.int32)
    return ((w[0] * 19595 + w[1] * 38470 + w[2] * 7471 + 32768) >> 16).astype(np.uint8)[None]


def fit(img: np.ndarray, channels: int, target: tuple[int, int]) -> np.ndarray:
    """(1 or 3, h, w) uint8 → (channels, H, W) at `target` (H, W): PIL's bilinear resize, which
    widens its filter when shrinking (antialiased), as torchvision's resize(antialias=True)."""
    if img.shape[0] != channels:
        img = np.repeat(img, 3, axis=0) if channels == 3 else rgb_to_luma(img)
    if tuple(img.shape[1:]) == tuple(target):
        return img
    size = (target[1], target[0])  # PIL takes (W, H)
    if channels == 1:
        return np.asarray(Image.fromarray(img[0], "L").resize(size, Image.BILINEAR))[None]
    return np.ascontiguousarray(np.asarray(Image.fromarray(img.transpose(1, 2, 0), "RGB")
                                           .resize(size, Image.BILINEAR)).transpose(2, 0, 1))


def drafts(header: Header, target: tuple[int, int]) -> bool:
    """Whether this JPEG is large enough (DRAFT_FACTOR × target per side) to decode at reduced scale."""
    return header.format == "JPEG" and header.width >= DRAFT_FACTOR * target[1] \
        and header.height >= DRAFT_FACTOR * target[0]


def decode_array(data: bytes, channels: int, target: tuple[int, int], max_pixels: int = MAX_PIXELS,
                 setting: str = "data.max_pixels") -> np.ndarray:
    """One file → (channels, H, W) uint8 at `target` (H, W). Raises ImageRefused, with `setting`
    named when the file declares more than `max_pixels`."""
    header = read_header(data)
    check_pixels(header, max_pixels, setting)
    reduced = drafts(header, target)
    try:
        # a large JPEG: ask for twice the target, so the final antialiased resize still does part of the shrinking
        img = pil_decode(data, draft=(2 * target[1], 2 * target[0]) if reduced else None)
    except Exception as err:  # noqa: BLE001 - any decoder failure means "this file is unusable"
        raise ImageRefused("corrupt_image", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
    _, height, width = img.shape
    if (height, width) != (header.height, header.width) and not (reduced and height <= header.height
                                                                 and width <= header.width):
        # the decoder's size must be the size the limit was checked on (a header read wrongly would be a bypass)
        raise ImageRefused("corrupt_image", f"decoded {width}x{height} pixels, the header declared "
                                            f"{header.width}x{header.height}")
    return fit(img, channels, target)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand_image_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the image files inside them."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def refusals(paths: list[Path], max_pixels: int = MAX_PIXELS) -> list[tuple[str, str]]:
    """(file, reason) for each file its header alone refuses (not an image, or more pixels than
    `max_pixels`): what can be said about files before any model or decoder is loaded."""
    out = []
    for path in paths:
        try:
            check_pixels(read_header(path.read_bytes()), max_pixels)
        except ImageRefused as err:
            out.append((str(path), str(err) or err.code))
    return out
