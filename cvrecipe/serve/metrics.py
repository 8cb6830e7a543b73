"""Prometheus metrics for one server, in its own registry (several servers may share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per forward pass


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cvrecipe_requests_total", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("cvrecipe_request_latency_seconds", "time from request start to response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("cvrecipe_in_flight_requests", "requests being handled now", registry=r)
        self.queue_time = Histogram("cvrecipe_queue_time_seconds", "time images wait before their forward pass",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cvrecipe_queue_depth_images", "images waiting for a forward pass", registry=r)
        self.batch_size = Histogram("cvrecipe_batch_size_images", "images per forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("cvrecipe_inference_seconds", "duration of one forward pass",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cvrecipe_images_total", "images handed to the inference thread", registry=r)
        self.rejected = Counter("cvrecipe_rejected_total", "requests refused before inference, by reason",
                                ["reason"], registry=r)
        self.reloads = Counter("cvrecipe_reloads_total", "model reloads by result", ["result"], registry=r)
        self.model_info = Gauge("cvrecipe_model_info", "the model being served (value 1)",
                                ["name", "version", "backend"], registry=r)

    def set_model(self, name: str, version: str, backend: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, backend).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
