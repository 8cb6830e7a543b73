"""The HTTP application: routes, error handlers, auth, and the lifespan that loads the model.

A thin adapter over the model code: read the request and refuse unsafe files by their header
(cvrecipe.serve.inputs) → queue them for a batched decode and forward pass (cvrecipe.serve.state,
cvrecipe.serve.batching) → the task's answer → JSON. The routes that answer with a task's
outputs (for a classifier: /v1/predict and /v1/predict/batch, classification.py; for segmentation:
/v1/segment, segmentation.py) come from the module each task names in the task registry
(cvrecipe/tasks); this file holds what every server has.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvrecipe import __version__
from cvrecipe.serve import monitor_routes
from cvrecipe.serve import schema
from cvrecipe.serve.inputs import ServeError
from cvrecipe.serve.middleware import BodyLimit, Observe, error_response
from cvrecipe.serve.privacy import for_caller, has_token
from cvrecipe.serve.settings import ServeSettings
from cvrecipe.serve.state import ServerState, log
from cvrecipe.tasks import TASKS, resolve


async def require_token(request: Request) -> None:
    """Bearer-token check for predict and admin routes (no-op when the server has no token)."""
    if not has_token(request):
        raise ServeError(401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer TOKEN'",
                         {"WWW-Authenticate": "Bearer"})


def create_app(settings: ServeSettings) -> FastAPI:
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        hup = _install_sighup(state)
        yield
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await state.stop()

    respond = state.monitor.metrics.stages["respond"].observe if state.monitor is not None else None
    middleware = [Middleware(Observe, metrics=state.metrics, respond=respond)]
    if settings.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[settings.cors_origin],
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                                     expose_headers=["X-Request-ID"]))
    middleware.append(Middleware(BodyLimit, max_bytes=settings.max_body_bytes, drain_s=settings.timeout_s))
    app = FastAPI(title="cvrecipe", lifespan=lifespan, middleware=middleware, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", version=__version__,
                  description="Image model inference: POST an image, get the model's answer. Every error is a JSON "
                              "body {error: {status, code, message}, request_id}.")
    app.state.server = state
    _add_error_handlers(app)
    _add_routes(app)
    fastapi_schema = app.openapi  # builds the schema once and keeps it in app.openapi_schema, which finish() corrects
    app.openapi = lambda: app.openapi_schema or schema.finish(fastapi_schema(), settings.token is not None)
    return app


def _install_sighup(state: ServerState) -> bool:
    """SIGHUP reloads the model, like POST /admin/reload (only where signals can be handled)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False

    async def reload_logged():
        try:
            await state.reload()
        except ServeError as err:
            log.error("reload on SIGHUP failed: %s", err.message)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_logged()))
    return True


def _add_error_handlers(app: FastAPI) -> None:
    def rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError):
        return error_response(err.status, err.code, for_caller(request, err.message), rid(request), err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail), rid(request), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error_response(400, "bad_request", text, rid(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return error_response(500, "internal_error", for_caller(request, f"{type(err).__name__}: {err}"), rid(request))




def _add_routes(app: FastAPI) -> None:
    page = resources.files("cvrecipe.serve").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/healthz", response_model=schema.Health, summary="the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="ready to answer predictions (503 while loading or stopping)",
             responses={200: {"model": schema.Readiness}, 503: {"model": schema.Readiness,
                                                                "description": "not ready; status says why"}})
    async def readyz(request: Request):
        state: ServerState = request.app.state.server
        status = "stopping" if state.stopping and state.status == "ready" else state.status
        body = {"status": status, "version": state.backend.version if state.backend else None}
        if state.error:  # why the model did not load: for a caller without the token, without paths
            body["error"] = for_caller(request, state.error)
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/v1/model", summary="the served model: classes, input, version, limits",
             responses={200: {"model": schema.ModelInfo}, **schema.errors(503)})
    async def model_info(request: Request):
        state: ServerState = request.app.state.server
        s = state.settings
        info = state.require_ready().describe()
        if not has_token(request):  # where the files live is for the token holder only
            info = {**info, "file": Path(info["file"]).name, "run": info["run"] and Path(info["run"]).name}
        return JSONResponse({**info, "top_k_default": 5, "auth": s.token is not None,
                             "limits": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms,
                                        "queue_size": s.queue_size, "timeout_s": s.timeout_s,
                                        "max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels,
                                        "max_files": s.max_files}})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics(request: Request):
        return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for task in TASKS.values():  # each task names the module of its routes: add_routes(app, require_token, task)
        resolve(task.routes).add_routes(app, require_token, task.name)
    monitor_routes.add_routes(app, require_token)

    @app.post("/admin/reload", dependencies=[Depends(require_token)], summary="load the model file again and swap it in",
              responses={200: {"model": schema.Reloaded}, **schema.errors(401, 409, 500, 503)})
    async def reload(request: Request):
        return await request.app.state.server.reload()
