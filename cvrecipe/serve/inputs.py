"""From a request body to model input: read the image bytes, refuse what is not safe to decode
(from the header alone), decode by the training data's rules.

Images reach the model through `cvrecipe.imagefile.decode_array`: NumPy and PIL, no torch, with
the rules and header checks of the decoder that read the training set
(`cvrecipe.data.images.decode_images`; tests/data/test_imagefile.py holds the two to the same
pixels). It decodes and resizes one image at a time, so the full-size pixels held by a batch
stay bounded whatever the images' sizes.
"""
from __future__ import annotations

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from cvrecipe.imagefile import Header, ImageRefused, check_pixels, decode_array, read_header

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


async def read_one_image(request: Request, route: str) -> tuple[str, bytes]:
    """(file name, bytes) of the one image a single-image route (`route`, e.g. "/v1/segment") takes;
    more files are a 400."""
    items = await read_images(request, max_files=1)
    if len(items) > 1:
        raise ServeError(400, "too_many_files", f"{len(items)} files sent; {route} takes one image")
    return items[0]


STATUS = {"too_many_pixels": 413}  # ImageRefused codes that are not a 400


def check_header(data: bytes, max_pixels: int) -> Header:
    """Refuse empty, unrecognised and oversized images from their header alone, before any
    pixel is decoded: a small file may declare billions of pixels (a decompression bomb)."""
    try:
        header = read_header(data)
        check_pixels(header, max_pixels, setting="the server's --max-pixels")
    except ImageRefused as err:
        message = "the image is empty (0 bytes)" if err.code == "empty_image" else f"image {err}"
        raise ServeError(STATUS.get(err.code, 400), err.code, message) from err
    return header


def screen(data: bytes, max_pixels: int) -> Header | ServeError:
    """The file's header (format and size, what monitoring records), or why `data` must not be
    decoded (see check_header); ~15 µs, fine on the event loop."""
    try:
        return check_header(data, max_pixels)
    except ServeError as err:
        return err


def refusal(data: bytes, max_pixels: int) -> ServeError | None:
    """Why `data` must not be decoded (see check_header), or None."""
    found = screen(data, max_pixels)
    return found if isinstance(found, ServeError) else None


def decode_batch(blobs: list[bytes], shape: tuple[int, int, int], max_pixels: int,
                 keep_size: bool = False) -> list[np.ndarray | ServeError]:
    """Per blob, a uint8 `shape` (C, H, W) image, or the ServeError that refused it; with `keep_size`
    (models run in tiles), each image at its own (H, W) with `shape`'s channels. CPU work, run on
    the inference thread (PIL releases the GIL while it decodes and resizes)."""
    channels, height, width = shape
    out: list[np.ndarray | ServeError] = []
    for data in blobs:
        try:
            target = _native_size(data) if keep_size else (height, width)
            out.append(decode_array(data, channels, target, max_pixels, setting="the server's --max-pixels"))
        except ImageRefused as err:
            message = f"cannot decode the image: {err}" if err.code == "corrupt_image" else f"image {err}"
            out.append(ServeError(STATUS.get(err.code, 400), err.code, message))
    return out


def _native_size(data: bytes) -> tuple[int, int]:
    header = read_header(data)  # raises ImageRefused for what is no image
    return header.height, header.width
