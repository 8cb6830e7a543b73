"""The HTTP application: routes, error handlers, auth, and the lifespan that loads the model.

A thin adapter over the model code: read the request and refuse unsafe files by their header
(cvrecipe.serve.inputs) → queue them for a batched decode and forward pass (cvrecipe.serve.state,
cvrecipe.serve.batching) → turn logits into top-k classes → JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import threading
import time
from importlib import resources

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvrecipe.serve.inputs import ServeError, read_images, refusal
from cvrecipe.serve.middleware import BodyLimit, Observe, error_response
from cvrecipe.serve.settings import ServeSettings
from cvrecipe.serve.state import ServerState, log


async def require_token(request: Request) -> None:
    """Bearer-token check for predict and admin routes (no-op when the server has no token)."""
    token = request.app.state.server.settings.token
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ServeError(401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer TOKEN'",
                         {"WWW-Authenticate": "Bearer"})


def top_k(logits: np.ndarray, class_names: list[str], k: int) -> list[list[dict]]:
    """Per image, the k most probable classes (softmax over the logits), most probable first."""
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, probs.shape[1])]
    return [[{"class": class_names[i], "probability": float(p[i])} for i in row] for p, row in zip(probs, order)]


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

    middleware = [Middleware(Observe, metrics=state.metrics)]
    if settings.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[settings.cors_origin],
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                                     expose_headers=["X-Request-ID"]))
    middleware.append(Middleware(BodyLimit, max_bytes=settings.max_body_bytes))
    app = FastAPI(title="cvrecipe", lifespan=lifespan, middleware=middleware, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    _add_error_handlers(app)
    _add_routes(app)
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
        return error_response(err.status, err.code, err.message, rid(request), err.headers)

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
        return error_response(500, "internal_error", f"{type(err).__name__}: {err}", rid(request))


def _add_routes(app: FastAPI) -> None:
    page = resources.files("cvrecipe.serve").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        state: ServerState = request.app.state.server
        body = {"status": state.status, "version": state.backend.version if state.backend else None}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/model")
    async def model_info(request: Request):
        state: ServerState = request.app.state.server
        s = state.settings
        return {**state.require_ready().describe(), "top_k_default": 5,
                "limits": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "queue_size": s.queue_size,
                           "timeout_s": s.timeout_s, "max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels,
                           "max_files": s.max_files}, "auth": s.token is not None}

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", dependencies=[Depends(require_token)])
    async def predict(request: Request, k: int = Query(5, ge=1, le=1000)):
        result = await _classify(request, max_files=1, k=k)
        _, answer = result["entries"][0]
        if isinstance(answer, ServeError):
            raise answer
        # a JSONResponse skips FastAPI's generic encoder, which costs more than the rest of the route
        return JSONResponse({"request_id": result["request_id"], "model": result["model"], "top": answer,
                             "latency_ms": result["latency_ms"]})

    @app.post("/v1/predict/batch", dependencies=[Depends(require_token)])
    async def predict_batch(request: Request, k: int = Query(5, ge=1, le=1000)):
        result = await _classify(request, max_files=request.app.state.server.settings.max_files, k=k)
        entries = result["entries"]
        if all(isinstance(answer, ServeError) for _, answer in entries):
            name, err = entries[0]
            raise ServeError(err.status, err.code, f"no image could be used; {name}: {err.message}")
        results = [{"file": name, "error": {"status": a.status, "code": a.code, "message": a.message}}
                   if isinstance(a, ServeError) else {"file": name, "top": a} for name, a in entries]
        return JSONResponse({"request_id": result["request_id"], "model": result["model"], "results": results,
                             "latency_ms": result["latency_ms"]})

    @app.post("/admin/reload", dependencies=[Depends(require_token)])
    async def reload(request: Request):
        return await request.app.state.server.reload()


async def _classify(request: Request, max_files: int, k: int) -> dict:
    """Read → refuse unsafe files by header → batcher (decode + forward on the inference
    thread) → top-k. 'entries' holds (file name, top-k list or ServeError) per file, in order."""
    start = time.perf_counter()
    state: ServerState = request.app.state.server
    used = state.require_ready()
    with state.arrival():
        items = await read_images(request, max_files)
        if len(items) > max_files:
            raise ServeError(400, "too_many_files", f"{len(items)} files sent; this route takes at most {max_files}")
        answers = {i: refusal(data, state.settings.max_pixels) for i, (_, data) in enumerate(items)}
    to_run = [i for i, answer in answers.items() if answer is None]
    if to_run:
        outputs, used = await state.infer([items[i][1] for i in to_run], deadline=start + state.settings.timeout_s)
        answers.update(zip(to_run, outputs))  # logits (K,) or the ServeError of a file that did not decode
    good = [i for i, answer in answers.items() if isinstance(answer, np.ndarray)]
    ranked = dict(zip(good, top_k(np.stack([answers[i] for i in good]), used.info["class_names"], k))) if good else {}
    return {"request_id": request.state.request_id, "model": {"name": used.info["name"], "version": used.version},
            "entries": [(name, ranked.get(i, answers[i])) for i, (name, _) in enumerate(items)],
            "latency_ms": round((time.perf_counter() - start) * 1000, 3)}
