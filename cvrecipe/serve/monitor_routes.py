"""Monitoring routes: GET /v1/monitor (JSON), POST /v1/feedback (true labels), GET /dashboard."""
from __future__ import annotations

import asyncio
from importlib import resources
from typing import Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from cvrecipe.serve.inputs import ServeError
from cvrecipe.serve.privacy import for_caller


class Feedback(BaseModel):
    request_id: str = Field(min_length=1, max_length=64, description="the request_id of the prediction's response")
    label: str = Field(min_length=1, description="the true class name")
    item: int = Field(0, ge=0, description="the file's position in a /v1/predict/batch request (0 otherwise)")


class FeedbackStored(BaseModel):
    request_id: str
    item: int
    label: str
    predicted: str
    correct: bool
    stored: str = Field(description="'log' (committed to the prediction log) or 'memory' (no log)")


def _monitor(request: Request):
    monitor = getattr(request.app.state.server, "monitor", None)
    if monitor is None:
        raise ServeError(404, "monitoring_off", "monitoring is off on this server (started with --no-monitor)")
    return monitor


def add_routes(app: FastAPI, require_token: Callable) -> None:
    page = resources.files("cvrecipe.monitor").joinpath("static/dashboard.html").read_text()

    @app.get("/v1/monitor", summary="drift, live accuracy, traffic and resources over the monitoring window")
    async def monitor_report(request: Request, history: bool = Query(False, description="add the recent history"),
                             fresh: bool = Query(False, description="compute now instead of the last interval's")):
        monitor = _monitor(request)
        report = await asyncio.to_thread(monitor.evaluate) if fresh or not monitor.report else monitor.report
        body = {**report, "throughput_per_s": monitor.report.get("throughput_per_s")}
        if history:
            body["history"] = list(monitor.history)
        return JSONResponse(for_caller(request, body))  # the profile's and the log's paths: token holder only

    @app.post("/v1/feedback", dependencies=[Depends(require_token)], summary="the true label of a served image",
              responses={200: {"model": FeedbackStored}})
    async def feedback(request: Request, body: Feedback):
        monitor = _monitor(request)
        try:
            stored = await monitor.feedback(body.request_id, body.item, body.label)
        except ValueError as err:
            raise ServeError(400, "unknown_label", str(err)) from err
        except KeyError as err:
            raise ServeError(404, "unknown_request", err.args[0]) from err
        return JSONResponse(stored)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        return HTMLResponse(page)
