"""Prometheus metrics of one gateway process, in their own registry (one per app, so tests can
build many apps in one process).

- ``vqa_requests_total{route,status,code}``: every HTTP request; ``route`` is the route template
  (``/v1/models/{name}/edge-bundle``), ``code`` the error code or ``ok``.
- ``vqa_request_seconds{route}``: total time in the gateway.
- ``vqa_queue_wait_seconds{model}``, ``vqa_compute_seconds{model}``, ``vqa_batch_size{model}``: the
  stages of answered requests, as reported by the worker that ran them.
- ``vqa_waiting_requests``: requests awaiting a reply in this process.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edge_client.protocol import VQAResponse

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vqa_requests",
            "HTTP requests by route, status and error code",
            ("route", "status", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "vqa_request_seconds",
            "Time from request to response in the gateway",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "vqa_queue_wait_seconds",
            "Time from enqueue to the start of the batch that ran it",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "vqa_compute_seconds",
            "Worker compute time of the batch that answered a request",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vqa_batch_size",
            "Size of the batch that answered a request",
            ("model",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.waiting = Gauge("vqa_waiting_requests", "Requests awaiting a reply", registry=self.registry)

    def observe_request(self, route: str, status: int, code: str, seconds: float) -> None:
        self.requests.labels(route, str(status), code).inc()
        self.latency.labels(route).observe(seconds)

    def observe_answer(self, response: VQAResponse) -> None:
        self.queue_wait.labels(response.model).observe(response.queue_ms / 1000)
        self.compute.labels(response.model).observe(response.compute_ms / 1000)
        self.batch_size.labels(response.model).observe(response.batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
