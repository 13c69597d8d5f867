"""Prometheus metrics of one gateway process, in their own registry (one per app, so tests can
build many apps in one process).

- ``vqa_requests_total{route,status,code}``: every HTTP request; ``route`` is the route template
  (``/v1/models/{name}/edge-bundle``), ``code`` the error code or ``ok``.
- ``vqa_request_seconds{route}``: total time in the gateway.
- ``vqa_queue_wait_seconds{model}``, ``vqa_compute_seconds{model}``, ``vqa_batch_size{model}``: the
  stages of answered requests, as reported by the worker that ran them.
- ``vqa_waiting_requests``: requests awaiting a reply in this process.

The labelled children are looked up once per label set and kept: ``labels()`` builds a string
tuple and takes a lock on every call (five calls were ~5 us of every answered request). The label
sets are bounded (route templates, statuses, error codes, served models), and prometheus_client
keeps each child for good anyway.
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
        self.live_workers = Gauge(
            "vqa_live_workers",
            "Workers that announced themselves for a model within their liveness window (read at scrape)",
            ["model"],
            registry=self.registry,
        )
        self._by_request: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}
        self._by_model: dict[str, tuple[Histogram, Histogram, Histogram]] = {}

    def observe_request(self, route: str, status: int, code: str, seconds: float) -> None:
        children = self._by_request.get((route, status, code))
        if children is None:
            children = (self.requests.labels(route, str(status), code), self.latency.labels(route))
            self._by_request[(route, status, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_answer(self, response: VQAResponse) -> None:
        children = self._by_model.get(response.model)
        if children is None:
            model = response.model
            children = (
                self.queue_wait.labels(model),
                self.compute.labels(model),
                self.batch_size.labels(model),
            )
            self._by_model[model] = children
        children[0].observe(response.queue_ms / 1000)
        children[1].observe(response.compute_ms / 1000)
        children[2].observe(response.batch_size)

    def set_live_workers(self, live: dict[str, int]) -> None:
        """The per-model worker counts as read now; models no longer served drop out."""
        self.live_workers.clear()
        for model, count in live.items():
            self.live_workers.labels(model).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
