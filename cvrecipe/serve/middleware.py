"""ASGI middleware: request ids and request metrics (Observe), body-size limits (BodyLimit).

Both are plain ASGI callables rather than Starlette's BaseHTTPMiddleware, which would buffer
streaming bodies and add a task per request.
"""
from __future__ import annotations

import re
import time
import uuid

from fastapi.responses import JSONResponse

from cvrecipe.serve.inputs import ServeError
from cvrecipe.serve.metrics import Metrics

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # client-sent ids outside this are replaced


def error_response(status: int, code: str, message: str, request_id: str | None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"status": status, "code": code, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


class Observe:
    """ASGI middleware: a request id per request (X-Request-ID), in-flight gauge, and latency and
    count by route template and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, start = 500, time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = _route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _route_label(scope) -> str:
    """The matched route's template (never the raw path, which would make unbounded label sets).
    Requests refused before routing (e.g. 413 from Content-Length) count under their route's path."""
    route = scope.get("route")
    if route is not None:
        return route.path
    known = {getattr(r, "path", None) for r in getattr(scope.get("app"), "routes", [])}
    return scope["path"] if scope["path"] in known else "unmatched"


class BodyLimit:
    """ASGI middleware: 413 for a body above `max_bytes`, from Content-Length when the client sends
    it (before reading anything) and by counting bytes as they arrive (chunked or lying clients)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        message = f"request body is larger than the server's limit of {limit} bytes ({limit / 2**20:.3g} MiB)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            request_id = scope.get("state", {}).get("request_id")
            response = error_response(413, "body_too_large", message, request_id, {"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise ServeError(413, "body_too_large", message, {"Connection": "close"})
            return msg

        await self.app(scope, counting_receive, send)
