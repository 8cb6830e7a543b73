"""`cvrecipe serve`: run the app on uvicorn with graceful shutdown.

On SIGTERM or Ctrl-C the server first goes on accepting and answering for ACCEPT_GRACE_S (while
/readyz already says 503, so a load balancer stops sending): connections the kernel had queued
and requests not yet read would otherwise be reset when the listening socket closes. Then uvicorn
stops accepting and waits for in-flight requests to finish (up to the request timeout plus a
margin), and the app drains its batcher. SIGHUP reloads the model.
"""
from __future__ import annotations

import asyncio
import logging
import math

from cvrecipe.serve.backends import resolve_source
from cvrecipe.serve.settings import ServeSettings

SHUTDOWN_MARGIN_S = 5  # beyond the request timeout, for responses to be written out
ACCEPT_GRACE_S = 1.0  # after SIGTERM, queued connections are still accepted and answered this long


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
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=False,  # per-request lines cost throughput; /metrics counts requests
                            timeout_graceful_shutdown=math.ceil(settings.timeout_s) + SHUTDOWN_MARGIN_S)

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.stopping = True  # /readyz: 503 from now on
            logging.getLogger("cvrecipe.serve").info("stopping: answering queued connections for %.1f s",
                                                     ACCEPT_GRACE_S)
            await asyncio.sleep(ACCEPT_GRACE_S)  # the event loop keeps accepting and answering meanwhile
            await super().shutdown(sockets)

    GracefulServer(config).run()
