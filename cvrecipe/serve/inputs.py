"""From a request body to model input: read the image bytes, refuse what is not safe to decode
(from the header alone), decode with the training data's decoder.

Images reach the model through `cvrecipe.data.images.decode_images`, the function that decoded
the training set, so colour conversion and resizing are the same in training and serving, and
the same header checks guard both. It decodes and resizes one large image at a time, so the
full-size pixels held by a batch stay bounded whatever the images' sizes.
"""
from __future__ import annotations

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from cvrecipe.data.images import ImageRefused, check_pixels, decode_images, read_header

RAW_TYPES = ("image/", "application/octet-stream")  # bodies that are the image itself


class ServeError(Exception):
    """An HTTP error with a JSON body {"error": {"status", "code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


async def read_images(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) for each image in a multipart form or a raw image body.

    The body-size limit is enforced while the body streams in (see middleware.BodyLimit); here the
    content type decides how to read it.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except MultiPartException as err:
            raise ServeError(400, "bad_form", f"cannot read the multipart form: {err}") from err
        files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if isinstance(f, UploadFile)]
        await form.close()
        if not files:
            raise ServeError(400, "no_file", "the form has no file; send the image in a file field named 'file'")
        return files
    if content_type.startswith(RAW_TYPES):
        return [("body", await request.body())]
    raise ServeError(415, "unsupported_media_type",
                     f"content type '{content_type or 'none'}' is not supported; send the image as the body with "
                     f"Content-Type image/* (e.g. image/png) or as multipart/form-data with a 'file' field")


STATUS = {"too_many_pixels": 413}  # ImageRefused codes that are not a 400


def check_header(data: bytes, max_pixels: int) -> None:
    """Refuse empty, unrecognised and oversized images from their header alone, before any
    pixel is decoded: a small file may declare billions of pixels (a decompression bomb)."""
    try:
        check_pixels(read_header(data), max_pixels, setting="the server's --max-pixels")
    except ImageRefused as err:
        message = "the image is empty (0 bytes)" if err.code == "empty_image" else f"image {err}"
        raise ServeError(STATUS.get(err.code, 400), err.code, message) from err


def refusal(data: bytes, max_pixels: int) -> ServeError | None:
    """Why `data` must not be decoded (see check_header), or None; ~15 µs, fine on the event loop."""
    try:
        check_header(data, max_pixels)
    except ServeError as err:
        return err
    return None


def decode_batch(blobs: list[bytes], shape: tuple[int, int, int], max_pixels: int) -> list[np.ndarray | ServeError]:
    """Per blob, a uint8 `shape` (C, H, W) image from the training decoder, or why it failed.

    One call per forward pass: the decoder's per-call set-up is shared by the whole batch and
    small JPEGs are decoded together. CPU work, run on the inference thread.
    """
    channels, height, width = shape
    x, good, skipped = decode_images([(str(i), b) for i, b in enumerate(blobs)], channels, (height, width),
                                     threads=1, max_pixels=max_pixels)
    out: list[np.ndarray | ServeError] = [None] * len(blobs)
    for row, i in enumerate(good):
        out[i] = x[row]
    for name, reason in skipped:
        out[int(name)] = ServeError(400, "corrupt_image", f"cannot decode the image: {reason}")
    return out
