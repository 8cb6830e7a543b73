"""The server's OpenAPI schema (GET /openapi.json): the response bodies of the routes every server
has, the error body, how images are sent, and the finishing touches FastAPI cannot infer.

The routes return JSONResponse objects built by hand (FastAPI's generic encoder costs more than
the rest of a predict route), so these models document the answers rather than produce them; the
tests check the real answers against them (schemathesis, tests/serve/test_schema.py).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    status: int = Field(description="the HTTP status code, repeated")
    code: str = Field(description="a stable machine-readable reason, e.g. too_many_pixels, body_too_large")
    message: str = Field(description="one line for a person: what was wrong and what the limit is")


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str | None = Field(description="also in the X-Request-ID header")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="loading | ready | stopping | failed | draining")
    version: str | None = Field(description="first 12 hex digits of the served model file's sha256")
    error: str | None = Field(None, description="why the model failed to load")


class ModelName(BaseModel):
    name: str
    version: str


class Limits(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    timeout_s: float
    max_body_bytes: int
    max_pixels: int
    max_files: int


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # a model's metadata may hold more (mean, std, ...)

    task: str
    name: str
    class_names: list[str]
    in_channels: int
    input_size: list[int] = Field(description="[H, W]")
    precision: str
    version: str
    backend: str
    format: str
    file: str = Field(description="the model file; only its name unless the caller sent the server's token")
    run: str | None = Field(description="the run it came from; only its name unless the caller sent the token")
    fixed_batch_size: int | None
    top_k_default: int
    limits: Limits
    auth: bool = Field(description="whether predict and admin routes need 'Authorization: Bearer TOKEN'")


class Reloaded(BaseModel):
    previous_version: str
    version: str
    seconds: float


IMAGE_BODY = {"type": "string", "format": "binary"}
# Every route that reads images takes the file as the body or as multipart form fields.
IMAGE_REQUEST = {"requestBody": {"required": True, "content": {
    "image/jpeg": {"schema": IMAGE_BODY}, "image/png": {"schema": IMAGE_BODY},
    "application/octet-stream": {"schema": IMAGE_BODY},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": IMAGE_BODY}}},
}}}


def errors(*statuses: int) -> dict[int, dict[str, Any]]:
    """The `responses` entries of a route's error answers, all with ErrorBody."""
    return {status: {"model": ErrorBody, "description": ERROR_TEXT[status]} for status in statuses}


ERROR_TEXT = {
    400: "not an image, empty, damaged or undecodable; a bad query parameter or form",
    401: "missing or wrong bearer token",
    404: "no such route",
    409: "the served model does not answer this route's task",
    413: "body above --max-body-mb, or an image declaring more than --max-pixels pixels (refused unread)",
    415: "a content type other than image/*, application/octet-stream or multipart/form-data",
    500: "the model could not be reloaded (the old one keeps serving)",
    503: "the model is not ready, the queue is full or the server is stopping; retry after Retry-After",
    504: "no answer within the server's --timeout-s",
}


def finish(schema: dict, token: bool) -> dict:
    """FastAPI's schema, corrected: its 422 validation answers do not exist here (a bad parameter is
    a 400 with ErrorBody); any status a route does not list is an ErrorBody too (the error handlers
    and the body limit serve every route, a task's new routes included); with a token the protected
    routes say they need it."""
    default = {"description": "any other error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses.setdefault("default", default)
            if token and "401" in responses:
                operation["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if token:
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return schema
