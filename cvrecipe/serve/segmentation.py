"""The serving route of a segmentation model: POST /v1/segment (one image).

The image is decoded at its own size and segmented in overlapping tiles of the model's input size
(the same tiling as evaluation and the export check). `format=png` (the default) answers with the
mask itself: a palette PNG of the image's size whose pixel values are class indices and whose
palette holds the classes' colours. `format=json` answers {"request_id", "model": {"name",
"version"}, "width", "height", "areas": [{"class", "pixels", "fraction"}], "mean_confidence",
"latency_ms"}, plus "mask" (the same PNG as a data URI) with `mask=true`. Limits, errors and metrics
are /v1/predict's: the same body limit, header checks, queue, timeout and batcher.
"""
from __future__ import annotations

import base64
import time
from typing import Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cvrecipe.serve import schema
from cvrecipe.serve.inputs import ServeError, read_one_image, refusal
from cvrecipe.serve.state import ServerState
from cvrecipe.tasks import answers_of

class ClassArea(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class")
    pixels: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1, description="share of the image's pixels")


class Segmentation(BaseModel):
    request_id: str
    model: schema.ModelName
    width: int
    height: int
    areas: list[ClassArea] = Field(description="one per class, in class order")
    mean_confidence: float = Field(ge=0, le=1, description="mean over pixels of the largest class probability")
    latency_ms: float
    mask: str | None = Field(None, description="with mask=true: the mask PNG as a data: URI")


ERRORS = schema.errors(400, 401, 409, 413, 415, 503, 504)
PNG_ANSWER = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                          "application/json": {"schema": Segmentation.model_json_schema()}},
              "description": "format=png: the mask, a palette PNG of the image's size whose values are class "
                             "indices; format=json: per-class areas"}


def add_routes(app: FastAPI, require_token: Callable, task: str) -> None:
    """The routes, on `app`, of the task registered as `task` (the served model must be one)."""
    answers = answers_of(task)  # imported now: a first request pays for no import
    @app.post("/v1/segment", dependencies=[Depends(require_token)], summary="segment one image",
              responses={200: PNG_ANSWER, **ERRORS}, openapi_extra=schema.IMAGE_REQUEST)
    async def segment(request: Request, format: Literal["png", "json"] = Query("png"),
                      mask: bool = Query(False, description="json: include the mask PNG as a data URI")):
        start = time.perf_counter()
        state: ServerState = request.app.state.server
        used = state.require_task(task)
        with state.arrival():
            _, data = await read_one_image(request, "/v1/segment")
            refused = refusal(data, state.settings.max_pixels)
        if refused is not None:
            raise refused
        (logits,), used = await state.infer([data], deadline=start + state.settings.timeout_s)
        if isinstance(logits, ServeError):
            raise logits
        (answer,) = answers.answers(logits[None], used.info)  # the task's answer layer, as predict's
        classes, confidence = answer["mask"], answer["mean_confidence"]
        from cvrecipe.data.mask_images import class_colours, mask_png  # here: `cvrecipe.data` imports torch

        png = mask_png(classes, class_colours(len(used.info["class_names"]), used.info.get("class_colours")))
        latency = round((time.perf_counter() - start) * 1000, 3)
        if state.monitor is not None:  # the window's pixel class mix and confidence
            k = len(used.info["class_names"])
            state.monitor.record_pixels(np.bincount(classes.ravel(), minlength=k)[:k], confidence, latency)
        model = {"name": used.info["name"], "version": used.version}
        if format == "png":
            return Response(png, media_type="image/png",
                            headers={"X-Model-Version": used.version, "X-Latency-Ms": str(latency)})
        body = {"request_id": request.state.request_id, "model": model, "width": int(classes.shape[1]),
                "height": int(classes.shape[0]), "areas": answer["areas"],
                "mean_confidence": confidence, "latency_ms": latency}
        if mask:
            body["mask"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return JSONResponse(body)
