"""``/healthz`` (the process is up), ``/readyz/gateway`` (this gateway accepts requests: the pod
readiness probe), ``/readyz`` (requests can be answered: every served model has a live worker; for
monitoring and scripts), ``/metrics`` (Prometheus).

The two readiness checks are separate so that a worker restart or model load never takes every
gateway out of the Service at once: gateways keep answering, with JSON errors (503 ``no_worker``)
or queued answers, instead of the ingress's HTML 502/503. Per-model worker counts are in
``/v1/models``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from ...errors import NotReady, QueueUnavailable, error_responses
from ...metrics import CONTENT_TYPE_LATEST
from ..deps import MetricsDep, QueueDep, RegistryDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    live_workers: dict[str, int]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz/gateway", response_model=Health, responses=error_responses(QueueUnavailable, NotReady))
async def gateway_ready(request: Request, queue: QueueDep) -> Health:
    """503 unless this gateway can accept requests: the queue answers (and, in memory mode, its
    in-process worker has not failed). Says nothing about workers."""
    await queue.ping()
    _check_in_process(request)
    return Health(status="ready")


def _check_in_process(request: Request) -> None:
    in_process = request.app.state.in_process
    if in_process is not None and in_process.failure is not None:
        raise NotReady(f"the in-process worker failed: {in_process.failure}")


@router.get("/readyz", response_model=Readiness, responses=error_responses(QueueUnavailable, NotReady))
async def readyz(request: Request, queue: QueueDep, registry: RegistryDep) -> Readiness:
    """503 unless the queue answers and every served model has at least one live worker."""
    await queue.ping()
    _check_in_process(request)
    models = await registry.all()
    if not models:
        raise NotReady("no model is served yet: no worker has published one")
    live = {m.info.name: await queue.live_workers(m.info.name) for m in models}
    missing = sorted(name for name, count in live.items() if count == 0)
    if missing:
        raise NotReady(f"no live worker for {', '.join(missing)}")
    return Readiness(status="ready", live_workers=live)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(metrics: MetricsDep, queue: QueueDep, registry: RegistryDep) -> Response:
    """Prometheus text; the per-model live-worker gauge is read from the queue at scrape time (and
    left out while Redis is unreachable, so the scrape itself still works)."""
    try:
        served = await registry.all()
        metrics.set_live_workers({m.info.name: await queue.live_workers(m.info.name) for m in served})
    except QueueUnavailable:
        pass
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
