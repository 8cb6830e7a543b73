"""The serving route of a detection model: POST /v1/detect. Not served yet: the server's backends
(warm-up, batching, the export they load) expect a classifier's or a segmentation model's outputs,
so the route answers 501 with a line saying so when a detection model is loaded (and 409, as every
task's route does, when the served model answers another task); `cvrecipe predict` answers with
boxes (tasks/answers/detection.py) in the meantime."""
from __future__ import annotations

from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

NOT_SERVED = ("detection models are not served yet (POST /v1/detect is planned: JSON boxes with score_threshold "
              "and max_detections); use `cvrecipe predict RUN IMAGES` for boxes")


def add_routes(app: FastAPI, require_token: Callable, task: str) -> None:
    """The routes, on `app`, of the task registered as `task`."""
    @app.post("/v1/detect", dependencies=[Depends(require_token)], summary="detect objects in one image (not yet)",
              responses={501: {"description": NOT_SERVED},
                         409: {"description": "the served model answers another task"}})
    async def detect(request: Request):
        request.app.state.server.require_task(task)  # another task's model: 409 wrong_task, as elsewhere
        return JSONResponse({"detail": NOT_SERVED}, status_code=501)
