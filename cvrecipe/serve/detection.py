"""The serving route of a detection model: POST /v1/detect (one image).

The image is decoded and resized to the model's input size like a classifier's, run through the
batcher with other requests, and its detections (rows [x1, y1, x2, y2, score, class], models/
detectors.py) become the answer in the uploaded image's own pixels through the task's answer layer
(tasks/answers/detection.py), the one `cvrecipe predict` uses. Query parameters: `score_threshold`
(keep detections scoring at least this, in [0, 1]; default the answer layer's 0.25) and
`max_detections` (at most this many, best first; 1 to 100, the rows a detector gives).

`format=json` (the default) answers {"request_id", "model": {"name", "version"}, "width", "height",
"boxes": [{"x1", "y1", "x2", "y2", "class", "score"}], "latency_ms"}; `format=png`, or an Accept
header asking for image/png and not JSON, answers the uploaded image as a PNG with the boxes drawn
(`annotate`). Limits, errors and metrics are /v1/predict's: the same body limit, header checks,
queue, timeout and batcher.
"""
from __future__ import annotations

import asyncio
import io
import time
from typing import Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cvrecipe.serve import schema
from cvrecipe.serve.inputs import ServeError, read_one_image, screen
from cvrecipe.serve.state import ServerState
from cvrecipe.tasks import answers_of

MAX_ROWS = 100  # detections a detector gives per image (models/detectors.py MAX_DETECTIONS)


class Box(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    x1: float = Field(description="left edge, pixels of the uploaded image")
    y1: float = Field(description="top edge")
    x2: float = Field(description="right edge")
    y2: float = Field(description="bottom edge")
    class_: str = Field(alias="class")
    score: float = Field(ge=0, le=1, description="the detector's own score (not calibrated)")


class Detections(BaseModel):
    request_id: str
    model: schema.ModelName
    width: int = Field(description="the uploaded image's width, pixels")
    height: int
    boxes: list[Box] = Field(description="best first")
    latency_ms: float


ERRORS = schema.errors(400, 401, 409, 413, 415, 503, 504)
ANSWER = {"content": {"application/json": {"schema": Detections.model_json_schema()},
                      "image/png": {"schema": {"type": "string", "format": "binary"}}},
          "description": "format=json: the boxes; format=png (or Accept: image/png): the image with the boxes drawn"}


def add_routes(app: FastAPI, require_token: Callable, task: str) -> None:
    """The routes, on `app`, of the task registered as `task` (the served model must be one)."""
    answers = answers_of(task)  # imported now: a first request pays for no import

    @app.post("/v1/detect", dependencies=[Depends(require_token)], summary="detect objects in one image",
              responses={200: ANSWER, **ERRORS}, openapi_extra=schema.IMAGE_REQUEST)
    async def detect(request: Request,
                     score_threshold: float = Query(answers.SCORE_THRESHOLD, ge=0, le=1,
                                                    description="keep detections scoring at least this"),
                     max_detections: int = Query(MAX_ROWS, ge=1, le=MAX_ROWS,
                                                 description="at most this many, best first"),
                     format: Literal["json", "png"] | None = Query(None, description="json (default) or png")):
        start = time.perf_counter()
        state: ServerState = request.app.state.server
        used = state.require_task(task)
        with state.arrival():
            item = await read_one_image(request, "/v1/detect")
            data = item[1]
            header = screen(data, state.settings.max_pixels)
        if isinstance(header, ServeError):
            raise header
        (rows,), used = await state.infer([data], deadline=start + state.settings.timeout_s)
        if isinstance(rows, ServeError):
            raise rows
        size = (header.height, header.width)
        (answer,) = answers.answers(rows[None], used.info, max_detections, score_threshold, image_sizes=[size])
        latency = round((time.perf_counter() - start) * 1000, 3)
        if state.monitor is not None:  # the window's detections, at the profile's own floor (not this request's)
            await state.monitor.record_boxes(request.state.request_id, item, rows, answer["boxes"], latency,
                                             header)
        if _wants_png(format, request.headers.get("accept", "")):
            png = await asyncio.to_thread(_annotated_png, answers, data, answer["boxes"], used.info, size)
            return Response(png, media_type="image/png", headers={"X-Model-Version": used.version,
                                                                  "X-Latency-Ms": str(latency)})
        return JSONResponse({"request_id": request.state.request_id,
                             "model": {"name": used.info["name"], "version": used.version},
                             "width": header.width, "height": header.height, "boxes": answer["boxes"],
                             "latency_ms": latency})


def _wants_png(format: str | None, accept: str) -> bool:
    """format=png, or no format and an Accept header naming image/png but not JSON."""
    if format is not None:
        return format == "png"
    accept = accept.lower()
    return "image/png" in accept and "application/json" not in accept


def _annotated_png(answers, data: bytes, boxes: list[dict], info: dict, size: tuple[int, int]) -> bytes:
    """The uploaded image at its own size, RGB, with `boxes` drawn (the answer layer's annotate), as PNG."""
    from PIL import Image

    from cvrecipe.imagefile import decode_array

    image = decode_array(data, 3, size, max_pixels=size[0] * size[1])  # (3, H, W) uint8; checked by screen already
    drawn = answers.annotate(np.moveaxis(image, 0, -1), boxes, info["class_names"])
    out = io.BytesIO()
    Image.fromarray(drawn).save(out, format="PNG", compress_level=1)  # fast: the answer is for a person
    return out.getvalue()
