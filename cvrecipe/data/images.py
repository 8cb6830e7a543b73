"""Decoding image bytes into uint8 (C, H, W) arrays: batched JPEG fast path, PIL for the rest.

Any file that cannot be decoded is reported back with a reason instead of raising, so one bad
file never stops a run. Colour modes are normalised: grayscale, RGBA, CMYK, palette and 16-bit
images all come out as uint8 with the requested number of channels.
"""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# torchvision 0.29 announces a future move of its decoders; they are what this module relies on
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

JPEG_MAGIC = b"\xff\xd8\xff"
CHUNK = 512  # images per batched decode_jpeg call; large enough to amortise the call overhead
MAX_PIXELS = 16_000 * 16_000  # refuse images declaring more pixels than this (decompression bombs)


def _pil_decode(data: bytes, channels: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"declares {img.width}x{img.height} pixels, above the {MAX_PIXELS} limit")
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
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


# torchvision is imported where images are decoded or resized, not with this module: its import
# alone holds ~160 MB of host memory, which a run that reads the decoded cache does not need.


def _decode_one(data: bytes, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    if data[:3] == JPEG_MAGIC:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        except RuntimeError as err:
            if "truncated" in str(err) or "incomplete" in str(err):
                raise ValueError("truncated JPEG") from err
            # unusual JPEG flavours (e.g. some CMYK files) are retried through PIL below
    return _pil_decode(data, channels)


def _decode_chunk(items: list[tuple[str, bytes]], channels: int) -> list[torch.Tensor | str]:
    """Decode one chunk; each entry is a (C, H, W) tensor or the reason the file was skipped."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if all(data[:3] == JPEG_MAGIC for _, data in items):
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in items]
        try:
            return list(decode_jpeg(tensors, mode=mode))
        except RuntimeError:
            pass  # at least one bad file: fall through to one-by-one decoding to find it
    results: list[torch.Tensor | str] = []
    for _, data in items:
        try:
            results.append(_decode_one(data, channels))
        except UnidentifiedImageError:
            results.append("not a recognised image format")
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            results.append(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
    return results


def guess_channels(samples: list[bytes]) -> int:
    """1 when every sampled image is grayscale, else 3."""
    for data in samples:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    return 3
        except Exception:  # noqa: BLE001 - unreadable samples are dealt with by the decoder
            continue
    return 1


def decode_images(
    items: list[tuple[str, bytes]], channels: int, size: int | tuple[int, int] | None, threads: int = 2
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode (name, bytes) pairs into one (N, C, S, S) uint8 array.

    Returns the array, the indices of `items` that decoded, and (name, reason) for those that
    did not. Images whose (H, W) differs from `size` are resized (antialiased); when `size` is
    None the most common (H, W) among the decoded images is used.
    """
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    if len(chunks) <= 1 or threads <= 1:  # a pool costs ~1 ms to start: not worth it for one chunk
        decoded = [r for chunk in chunks for r in _decode_chunk(chunk, channels)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            decoded = [r for chunk in pool.map(lambda c: _decode_chunk(c, channels), chunks) for r in chunk]
    good = [i for i, r in enumerate(decoded) if isinstance(r, torch.Tensor)]
    skipped = [(items[i][0], r) for i, r in enumerate(decoded) if not isinstance(r, torch.Tensor)]
    if isinstance(size, int):
        size = (size, size)
    if not good:
        return np.zeros((0, channels, *(size or (1, 1))), np.uint8), good, skipped
    if size is None:
        shapes, counts = np.unique([tuple(decoded[i].shape[1:]) for i in good], axis=0, return_counts=True)
        target = tuple(int(v) for v in shapes[counts.argmax()])
    else:
        target = tuple(size)
    out = np.empty((len(good), channels, *target), np.uint8)
    for row, i in enumerate(good):
        img = decoded[i]
        if tuple(img.shape[1:]) != target:
            from torchvision.transforms.v2.functional import resize

            img = resize(img, list(target), antialias=True)
        out[row] = img.numpy()
    return out, good, skipped
