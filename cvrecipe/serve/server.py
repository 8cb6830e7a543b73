"""`cvrecipe serve`: run the app on uvicorn with graceful shutdown.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and waits for in-flight requests to
finish (up to the request timeout plus a margin); then the app drains its batcher. SIGHUP
reloads the model.
"""
from __future__ import annotations

import logging
import math

from cvrecipe.serve.backends import resolve_source
from cvrecipe.serve.settings import ServeSettings

SHUTDOWN_MARGIN_S = 5  # beyond the request timeout, for responses to be written out


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    try:
        import uvicorn

        from cvrecipe.serve.app import create_app
    except ImportError as err:
        raise RuntimeError(f"serving needs the serve extra ({err}): pip install 'cvrecipe[serve]'") from err

    source = resolve_source(settings.source, settings.backend)  # fail before binding, with a clear message
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cvrecipe.serve").info("model file %s (%s backend); listening on http://%s:%d",
                                             source.path, source.backend, settings.host, settings.port)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False,  # per-request lines cost throughput; /metrics counts requests
                            timeout_graceful_shutdown=math.ceil(settings.timeout_s) + SHUTDOWN_MARGIN_S)
    uvicorn.Server(config).run()
