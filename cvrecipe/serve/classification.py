"""The serving routes of a classifier: POST /v1/predict (one image) and /v1/predict/batch.

Response schema: {"request_id", "model": {"name", "version"}, "top": [{"class", "probability"}, ...],
"latency_ms"}; the batch route answers {"results": [{"file", "top"} or {"file", "error"}, ...]}.
The answers come from the task's torch-free answer layer (cvrecipe/tasks/answers/), as `predict`'s do:
a server of an ONNX export needs no torch for this.
"""
from __future__ import annotations

import time
from types import ModuleType
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cvrecipe.serve import schema
from cvrecipe.serve.inputs import ServeError, read_images, screen
from cvrecipe.serve.state import ServerState
from cvrecipe.tasks import answers_of

class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class")
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    request_id: str
    model: schema.ModelName
    top: list[ClassProbability] = Field(description="the k most probable classes, most probable first")
    latency_ms: float


class FileAnswer(BaseModel):
    file: str = Field(description="the form field's file name")
    top: list[ClassProbability] | None = Field(None, description="when the file could be used")
    error: schema.ErrorDetail | None = Field(None, description="when it could not")


class BatchPrediction(BaseModel):
    request_id: str
    model: schema.ModelName
    results: list[FileAnswer] = Field(description="one per file, in the order sent")
    latency_ms: float


ERRORS = schema.errors(400, 401, 409, 413, 415, 503, 504)


def add_routes(app: FastAPI, require_token: Callable, task: str) -> None:
    """The routes, on `app`, of the task registered as `task` (the served model must be one)."""
    answers = answers_of(task)  # imported now: a first request pays for no import
    @app.post("/v1/predict", dependencies=[Depends(require_token)], summary="classify one image",
              responses={200: {"model": Prediction}, **ERRORS}, openapi_extra=schema.IMAGE_REQUEST)
    async def predict(request: Request, k: int = Query(5, ge=1, le=1000)):
        result = await _classify(request, task, answers, max_files=1, k=k)
        _, answer = result["entries"][0]
        if isinstance(answer, ServeError):
            raise answer
        # a JSONResponse skips FastAPI's generic encoder, which costs more than the rest of the route
        return JSONResponse({"request_id": result["request_id"], "model": result["model"], "top": answer,
                             "latency_ms": result["latency_ms"]})

    @app.post("/v1/predict/batch", dependencies=[Depends(require_token)],
              summary="classify several images sent as multipart file fields",
              responses={200: {"model": BatchPrediction}, **ERRORS}, openapi_extra=schema.IMAGE_REQUEST)
    async def predict_batch(request: Request, k: int = Query(5, ge=1, le=1000)):
        result = await _classify(request, task, answers, max_files=request.app.state.server.settings.max_files,
                                 k=k)
        entries = result["entries"]
        if all(isinstance(answer, ServeError) for _, answer in entries):
            name, err = entries[0]
            raise ServeError(err.status, err.code, f"no image could be used; {name}: {err.message}")
        results = [{"file": name, "error": {"status": a.status, "code": a.code, "message": a.message}}
                   if isinstance(a, ServeError) else {"file": name, "top": a} for name, a in entries]
        return JSONResponse({"request_id": result["request_id"], "model": result["model"], "results": results,
                             "latency_ms": result["latency_ms"]})


async def _classify(request: Request, task: str, layer: ModuleType, max_files: int, k: int) -> dict:
    """Read → refuse unsafe files by header → batcher (decode + forward on the inference
    thread) → top-k. 'entries' holds (file name, top-k list or ServeError) per file, in order."""
    start = time.perf_counter()
    state: ServerState = request.app.state.server
    used = state.require_task(task)
    with state.arrival():
        items = await read_images(request, max_files)
        if len(items) > max_files:
            raise ServeError(400, "too_many_files", f"{len(items)} files sent; this route takes at most {max_files}")
        headers = {i: screen(data, state.settings.max_pixels) for i, (_, data) in enumerate(items)}
    answers = {i: found if isinstance(found, ServeError) else None for i, found in headers.items()}
    to_run = [i for i, answer in answers.items() if answer is None]
    if to_run:
        outputs, used = await state.infer([items[i][1] for i in to_run], deadline=start + state.settings.timeout_s)
        answers.update(zip(to_run, outputs))  # logits (K,) or the ServeError of a file that did not decode
    good = [i for i, answer in answers.items() if isinstance(answer, np.ndarray)]
    found = layer.answers(np.stack([answers[i] for i in good]), used.info, k) if good else []
    ranked = {i: answer["top"] for i, answer in zip(good, found)}  # the task's answer layer, calibrated
    latency_ms = round((time.perf_counter() - start) * 1000, 3)
    if state.monitor is not None and good:  # the window, and the log row committed before the answer goes out
        await state.monitor.record(request.state.request_id, items, {i: answers[i] for i in good}, ranked, latency_ms,
                                   headers)
        request.state.answered_at = time.perf_counter()  # the respond stage runs from here to the last byte
    return {"request_id": request.state.request_id, "model": {"name": used.info["name"], "version": used.version},
            "entries": [(name, ranked.get(i, answers[i])) for i, (name, _) in enumerate(items)],
            "latency_ms": latency_ms}
