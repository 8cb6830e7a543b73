"""What a caller without the server's token may read: no filesystem paths, hosts or user names.

The token holder (or everyone, on a server without a token) sees where the model, its reference
profile and the prediction log live; other callers see names instead: a path becomes its last
part (`/srv/runs/fashion/best.safetensors` → `best.safetensors`), a URL its scheme
(`postgresql://user:***@db.example/log` → `postgresql://…`). Applied to every answer built from
the server's own strings that such a caller can get: /v1/model, /v1/monitor, /readyz and error
messages. The pages (/, /dashboard) are static files and carry nothing of the server's.
"""
from __future__ import annotations

import hmac
import re
from pathlib import PurePosixPath

from starlette.requests import Request

_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://[^\s'\"<>]+")  # scheme://[user[:password]@]host[:port]/...
# an absolute, ~/, ./ or ../ path (not the // of a URL, not the / of a fraction or a route)
_PATH = re.compile(r"(?<![\w./~])(?:~|\.\.?)?/(?!/)(?:[^\s/'\"<>(),;:]+/)*[^\s/'\"<>(),;:]*")


def has_token(request: Request) -> bool:
    """Whether the request carries the server's bearer token (True when the server has none)."""
    token = request.app.state.server.settings.token
    if token is None:
        return True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def for_caller(request: Request, value):
    """`value` as this caller may read it: whole for the token holder, public() for anyone else."""
    return value if has_token(request) else public(value)


def public_text(text: str) -> str:
    """`text` with URLs reduced to their scheme and paths to their last part."""
    text = _URL.sub(lambda m: f"{m.group(1)}://…", text)
    return _PATH.sub(lambda m: PurePosixPath(m.group(0)).name or "…", text)


def public(value):
    """A JSON-like value (dicts, lists, strings, numbers) with public_text applied to every string."""
    if isinstance(value, str):
        return public_text(value)
    if isinstance(value, dict):
        return {key: public(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(item) for item in value]
    return value
