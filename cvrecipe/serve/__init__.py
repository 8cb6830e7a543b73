"""Serve: an HTTP server with dynamic batching, a web page, health checks and Prometheus metrics."""
from cvrecipe.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def create_app(settings: ServeSettings):
    from cvrecipe.serve.app import create_app as _create_app

    return _create_app(settings)


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    from cvrecipe.serve.server import serve as _serve

    _serve(settings, log_level)
