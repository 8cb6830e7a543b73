"""`cvrecipe serve`: run the app on uvicorn with graceful shutdown.

On SIGTERM or Ctrl-C the server first goes on accepting and answering for ACCEPT_GRACE_S (while
/readyz already says 503, so a load balancer stops sending): connections the kernel had queued
and requests not yet read would otherwise be reset when the listening socket closes. Then uvicorn
stops accepting and waits for in-flight requests to finish (up to the request timeout plus a
margin), and the app drains its batcher. SIGHUP reloads the model.

The listening socket is bound before the model loads: a port in use or not allowed is one line at
once, and the server listens on the port it names (uvicorn gets the bound socket).
"""
from __future__ import annotations

import asyncio
import errno
import dataclasses
import logging
import math
import socket
import sys

from cvrecipe.serve.backends import resolve_source
from cvrecipe.serve.settings import ServeSettings

SHUTDOWN_MARGIN_S = 5  # beyond the request timeout, for responses to be written out
ACCEPT_GRACE_S = 1.0  # after SIGTERM, queued connections are still accepted and answered this long
# The inference thread's Python work (decoding, batching) holds the GIL for up to the switch
# interval (5 ms by default) each time the event loop gives it up for a socket call; at
# concurrency 32 those waits add up in the tail (docs/serving.md#tail-latency).
SWITCH_INTERVAL_S = 0.0005


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    try:
        import uvicorn

        from cvrecipe.serve.app import create_app
    except ImportError as err:
        raise RuntimeError(f"serving needs the serve extra ({err}): pip install 'cvrecipe[serve]'") from err

    source = resolve_source(settings.source, settings.backend)  # which file (nothing loaded yet), or one line
    listener = bind(settings.host, settings.port)  # before the model loads: a busy port is said at once
    port = listener.getsockname()[1]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cvrecipe.serve").info("model file %s (%s backend); listening on http://%s:%d",
                                             source.path, source.backend, settings.host, port)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(dataclasses.replace(settings, own_process=True))
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

    GracefulServer(config).run(sockets=[listener])


def bind(host: str, port: int) -> socket.socket:
    """The server's listening socket on host:port (0: a free port), or one line saying why not."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected a TCP port from 0 to 65535 (0: any free port)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)  # uvicorn's default backlog
    except OSError as err:
        why = "in use by another process" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
        raise ValueError(f"cannot listen on {host}:{port}: {why} (--host/--port)") from None
