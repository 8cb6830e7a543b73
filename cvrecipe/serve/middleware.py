"""ASGI middleware: request ids and request metrics (Observe), body-size limits (BodyLimit).

Both are plain ASGI callables rather than Starlette's BaseHTTPMiddleware, which would buffer
streaming bodies and add a task per request.
"""
from __future__ import annotations

import asyncio
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
    count by route template and status code. `respond(seconds)`, when given, is called with the time
    from a route's answer (the time it put in request.state.answered_at) to the response's last byte
    handed to the server: serialisation and sending."""

    def __init__(self, app, metrics: Metrics, respond=None):
        self.app, self.metrics, self.respond = app, metrics, respond

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
            answered = scope["state"].get("answered_at")
            if answered is not None and message["type"] == "http.response.body" and not message.get("more_body"):
                self.respond(time.perf_counter() - answered)

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


DRAIN_BYTES = 64 * 2**20  # request bytes read and dropped after an early answer, so the client sees it


class BodyLimit:
    """ASGI middleware: 413 for a body above `max_bytes`, from Content-Length when the client sends
    it (before reading anything) and by counting bytes as they arrive (chunked or lying clients).

    Every answer given before the request body was read (a 413, but also a 401 or 415) is held
    open until the rest of the body has been read and dropped, up to DRAIN_BYTES in all and for at
    most `drain_s`: closing a socket with unread data makes the kernel reset the connection, and a
    client that sends its whole body before reading (urllib, many SDKs) would then see
    ConnectionResetError instead of the answer. A client that waits for "100 Continue" is never
    asked for a body it was refused.
    """

    def __init__(self, app, max_bytes: int, drain_s: float = 10.0, drain_bytes: int = DRAIN_BYTES):
        self.app, self.max_bytes, self.drain_s, self.drain_bytes = app, max_bytes, drain_s, drain_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        message = f"request body is larger than the server's limit of {limit} bytes ({limit / 2**20:.3g} MiB)"
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        waits = headers.get(b"expect", b"").lower() == b"100-continue"
        # body: bytes read so far, and whether the whole of it has been (or need not be) read
        body = {"read": 0, "done": declared == 0 or (declared is None and b"transfer-encoding" not in headers),
                "asked": False}

        async def counting_receive():
            body["asked"] = True
            msg = await receive()
            if msg["type"] == "http.request":
                body["read"] += len(msg.get("body", b""))
                body["done"] = not msg.get("more_body", False)
                if body["read"] > limit:
                    raise ServeError(413, "body_too_large", message, {"Connection": "close"})
            else:  # http.disconnect
                body["done"] = True
            return msg

        async def send_after_drain(msg):
            if msg["type"] == "http.response.body" and not msg.get("more_body", False) and not body["done"] \
                    and not (waits and not body["asked"]):
                await send({**msg, "more_body": True})  # the whole answer is out; the response stays open
                await self._drain(receive, body)
                msg = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(msg)

        if declared is not None and declared > limit:
            if declared > self.drain_bytes:
                body["done"] = True  # too much to read: the connection closes unread
            request_id = scope.get("state", {}).get("request_id")
            response = error_response(413, "body_too_large", message, request_id, {"Connection": "close"})
            return await response(scope, receive, send_after_drain)
        await self.app(scope, counting_receive, send_after_drain)

    async def _drain(self, receive, body: dict) -> None:
        async def read_rest():
            while body["read"] <= self.drain_bytes:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                body["read"] += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read_rest(), self.drain_s)
        except asyncio.TimeoutError:
            pass  # a client this slow gets the connection closed after its answer
