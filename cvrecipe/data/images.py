"""Decoding image files into uint8 (C, H, W) arrays, guarded: the one decoder behind every path
(folder ingest and the audit, `predict`, the server).

Each file's header is read first and checked against a pixel limit before any pixel is decoded:
a 700-byte JPEG may declare 30000×30000 pixels (2.7 GB decoded). Then, per file:
- ordinary JPEGs are decoded together with torchvision's batched `decode_jpeg` (the fast path);
- a JPEG at least DRAFT_FACTOR times larger than the target (per side) is decoded at 1/2, 1/4 or
  1/8 scale in the DCT domain (PIL's `draft`), so a 6000×6000 photo for a 32×32 model costs a
  750×750 decode, not 36 Mpx;
- everything else goes through PIL, restricted to the formats in FORMATS.
Every image is resized to the target as soon as it is decoded, and JPEGs decoded together hold at
most BATCH_PIXELS pixels, so the full-size pixels in memory at once stay bounded whatever the
image sizes.

A file that cannot be decoded is reported back with a reason instead of raising, so one bad file
never stops a run. Colour modes are normalised: grayscale, RGBA, CMYK, palette and 16-bit images
all come out as uint8 with the requested number of channels, and colour becomes grayscale by one
rule for every format (GRAYSCALE_RULE, recorded in an export's model.json).
"""
from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

# torchvision 0.29 announces a future move of its decoders; they are what this module relies on
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

JPEG_MAGIC = b"\xff\xd8\xff"
CHUNK = 512  # images per worker task; large enough to amortise the batched decode's call overhead
MAX_PIXELS = 40_000_000  # default pixel limit (width × height): data.max_pixels, `serve --max-pixels`
BATCH_PIXELS = 16_000_000  # JPEG pixels decoded together (48 MB as RGB); larger ones go one at a time
DRAFT_FACTOR = 4  # JPEGs at least this many times the target per side are decoded at reduced scale
SMALL_FACTOR = 4  # images upscaled more than this in width or height are reported as far too small
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


def rgb_to_luma(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 RGB → (..., 1, H, W) uint8 luma by GRAYSCALE_RULE (bit-identical to
    PIL's convert('L'); gray pixels, R = G = B, keep their value)."""
    w = x.to(torch.int32)
    luma = (w[..., 0, :, :] * 19595 + w[..., 1, :, :] * 38470 + w[..., 2, :, :] * 7471 + 32768) >> 16
    return luma.to(torch.uint8).unsqueeze(-3)


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """(1 or 3, H, W) uint8 → (channels, H, W): gray is repeated into RGB, RGB becomes luma."""
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1)
    return rgb_to_luma(img)


def _pil_decode(data: bytes, draft: tuple[int, int] | None = None) -> torch.Tensor:
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
    return torch.from_numpy(arr.copy())


# torchvision is imported where images are decoded or resized, not with this module: its import
# alone holds ~160 MB of host memory, which a run that reads the decoded cache does not need.


def _fit(img: torch.Tensor, channels: int, target: tuple[int, int]) -> torch.Tensor:
    """(1 or 3, h, w) uint8 → (channels, H, W) at `target` (H, W), antialiased when shrinking."""
    img = to_channels(img, channels)
    if tuple(img.shape[1:]) != target:
        from torchvision.transforms.v2.functional import resize

        img = resize(img, list(target), antialias=True)
    return img


def _drafts(header: Header, target: tuple[int, int]) -> bool:
    return header.format == "JPEG" and header.width >= DRAFT_FACTOR * target[1] \
        and header.height >= DRAFT_FACTOR * target[0]


def decode_image(data: bytes, channels: int, target: tuple[int, int], max_pixels: int = MAX_PIXELS,
                 header: Header | None = None) -> torch.Tensor:
    """One file → (channels, H, W) uint8 at `target` (H, W). Raises ImageRefused."""
    header = header or read_header(data)
    check_pixels(header, max_pixels)
    img = None
    if _drafts(header, target):
        # ask for twice the target, so the final antialiased resize still does part of the shrinking
        img = _pil_decode(data, draft=(2 * target[1], 2 * target[0]))
    elif header.format == "JPEG" and header.components in (1, 3):
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if header.components == 1 else ImageReadMode.RGB
        try:
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        except RuntimeError as err:
            if "truncated" in str(err) or "incomplete" in str(err):
                raise ImageRefused("corrupt_image", "truncated JPEG") from err
            # unusual JPEG flavours are retried through PIL below
    if img is None:
        try:
            img = _pil_decode(data)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "this file is unusable"
            raise ImageRefused("corrupt_image", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
    _, height, width = img.shape
    reduced = _drafts(header, target)  # a reduced-scale decode is smaller than the header says
    if (height, width) != (header.height, header.width) and not (reduced and height <= header.height
                                                                 and width <= header.width):
        # the decoder's size must be the size the limit was checked on (a header read wrongly would be a bypass)
        raise ImageRefused("corrupt_image", f"decoded {width}x{height} pixels, the header declared "
                                            f"{header.width}x{header.height}")
    return _fit(img, channels, target)


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


def _decode_chunk(items: list[tuple[str, bytes]], headers: list, channels: int, target: tuple[int, int],
                  max_pixels: int) -> list[torch.Tensor | str]:
    """Decode one chunk; each entry is a (channels, H, W) tensor at `target` or why it was skipped.
    `headers`: per item a Header or the ImageRefused from reading it."""
    results: list[torch.Tensor | str | None] = [None] * len(items)
    batches: dict[int, list[list[int]]] = {1: [[]], 3: [[]]}  # by stored components: lists of indices
    pixels = {1: 0, 3: 0}
    for i, header in enumerate(headers):
        if isinstance(header, ImageRefused):
            results[i] = _reason(header)
            continue
        size = header.width * header.height
        if not 0 < size <= max_pixels:
            try:
                check_pixels(header, max_pixels)
            except ImageRefused as err:
                results[i] = _reason(err)
        elif header.format == "JPEG" and header.components in (1, 3) and size <= BATCH_PIXELS // 16 \
                and not _drafts(header, target):  # an ordinary JPEG: decoded with others
            group = header.components
            if pixels[group] + size > BATCH_PIXELS:
                batches[group].append([])
                pixels[group] = 0
            batches[group][-1].append(i)
            pixels[group] += size
    for group, lists in batches.items():
        for batch in filter(None, lists):
            from torchvision.io import ImageReadMode, decode_jpeg

            mode = ImageReadMode.GRAY if group == 1 else ImageReadMode.RGB
            try:
                decoded = decode_jpeg([torch.frombuffer(bytearray(items[i][1]), dtype=torch.uint8) for i in batch],
                                      mode=mode)
            except RuntimeError:
                continue  # at least one bad file: left to the one-by-one decode below, which names it
            for i, img in zip(batch, decoded):
                shape = img.shape  # (C, H, W)
                if shape[1] == headers[i].height and shape[2] == headers[i].width:
                    results[i] = img if shape == (channels, *target) else _fit(img, channels, target)
    for i, result in enumerate(results):
        if result is None:
            try:
                results[i] = decode_image(items[i][1], channels, target, max_pixels, headers[i])
            except ImageRefused as err:
                results[i] = _reason(err)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
                results[i] = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return results


def guess_channels(samples: list[bytes]) -> int:
    """1 when every sampled image is grayscale, else 3."""
    for data in samples:
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    return 3
        except Exception:  # noqa: BLE001 - unreadable samples are dealt with by the decoder
            continue
    return 1


def _header(data: bytes) -> Header | ImageRefused:
    if data[:3] == JPEG_MAGIC:  # the common case without read_header's call and try
        found = jpeg_size(data)
        if found is not None:
            return Header("JPEG", *found)
    try:
        return read_header(data)
    except ImageRefused as err:
        return err


def decode_images(
    items: list[tuple[str, bytes]], channels: int, size: int | tuple[int, int] | None, threads: int = 2,
    max_pixels: int = MAX_PIXELS, small: list | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode (name, bytes) pairs into one (N, C, S, S) uint8 array.

    Returns the array, the indices of `items` that decoded, and (name, reason) for those that
    did not. Images whose (H, W) differs from `size` are resized (antialiased); when `size` is
    None the most common (H, W) among the headers is used. Files declaring more than `max_pixels`
    pixels are skipped unread. `small`, when given, receives (name, (h, w)) for each decoded image
    upscaled more than SMALL_FACTOR times in width or height.
    """
    headers = [_header(data) for _, data in items]
    usable = [h for h in headers if isinstance(h, Header) and 0 < h.width * h.height <= max_pixels]
    if isinstance(size, int):
        size = (size, size)
    if size is None and usable:
        size = Counter((h.height, h.width) for h in usable).most_common(1)[0][0]
    target = tuple(size) if size is not None else None
    if target is None:  # nothing decodable: report every file
        decoded = _decode_chunk(items, headers, channels, (1, 1), max_pixels) if items else []
    else:
        chunks = [range(i, min(i + CHUNK, len(items))) for i in range(0, len(items), CHUNK)]

        def run(idx: range) -> list:
            return _decode_chunk([items[i] for i in idx], [headers[i] for i in idx], channels, target, max_pixels)

        if len(chunks) <= 1 or threads <= 1:  # a pool costs ~1 ms to start: not worth it for one chunk
            decoded = [r for idx in chunks for r in run(idx)]
        else:
            with ThreadPoolExecutor(threads) as pool:
                decoded = [r for part in pool.map(run, chunks) for r in part]
    good = [i for i, r in enumerate(decoded) if isinstance(r, torch.Tensor)]
    skipped = [(items[i][0], r) for i, r in enumerate(decoded) if not isinstance(r, torch.Tensor)]
    if not good:
        return np.zeros((0, channels, *(target or (1, 1))), np.uint8), good, skipped
    if small is not None:
        small += [(items[i][0], (headers[i].height, headers[i].width)) for i in good
                  if SMALL_FACTOR * headers[i].height < target[0] or SMALL_FACTOR * headers[i].width < target[1]]
    return torch.stack([decoded[i] for i in good]).numpy(), good, skipped
