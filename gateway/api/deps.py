"""FastAPI dependencies: settings, queue, registry, metrics, API-key check + rate limits, the bounded body.

The cold routes (models, health) take what they need through the ``Annotated`` aliases below, so
tests can override any of them (``app.dependency_overrides``). ``POST /v1/vqa`` is the hot path: it
reads ``app.state`` through :func:`state` and calls :func:`read_body` itself, because FastAPI
resolves every dependency node with a full recursive solve: the 13 nodes the route had took 60 % of
its CPU in a profile (in process, without Redis: 200 us a request before, 128 us after). The one
dependency every ``/v1`` route shares, :data:`authorize`, is a single node: the HTTPBearer security
scheme itself (the same entry in the OpenAPI document), which then checks the key and rate limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import TYPE_CHECKING, Annotated, Protocol, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.base import SecurityBase

from edge_client.protocol import CONTENT_TYPE

from ..config import GatewaySettings
from ..errors import BodyTooLarge, QueueUnavailable, RateLimited, Unauthorized, UnsupportedMediaType
from ..metrics import Metrics
from ..queue import GatewayQueue
from ..rate_limit import RateLimiter
from ..served_models import Registry
from .image_cache import ImageCache

if TYPE_CHECKING:
    from ..worker.worker import InProcessWorker

__all__ = [
    "ApiKeyAuth",
    "AppState",
    "Authorized",
    "MetricsDep",
    "QueueDep",
    "RegistryDep",
    "SettingsDep",
    "authorize",
    "read_body",
    "require_api_key",
    "state",
]


class AppState(Protocol):
    """What ``create_app`` and the lifespan keep on ``app.state`` (read per request: tests swap
    the limiters of a running app)."""

    settings: GatewaySettings
    metrics: Metrics
    queue: GatewayQueue
    registry: Registry
    images: ImageCache
    limiter: RateLimiter | None
    auth_failure_limiter: RateLimiter | None  # None: anonymous, or VQA_AUTH_FAILURES_PER_MINUTE=0
    in_process: InProcessWorker | None
    image_decodes: asyncio.Semaphore  # VQA_IMAGE_DECODES
    image_waiting: dict[str, int]  # client id -> its cloud-only images waiting for or in a slot


def state(request: Request) -> AppState:
    """The app's state, typed."""
    return cast("AppState", request.app.state)


# Plain attribute reads, declared async so FastAPI calls them inline instead of handing each one
# to its thread pool (six hand-offs per request were the gateway's largest overhead at 300 req/s).
async def get_settings(request: Request) -> GatewaySettings:
    return state(request).settings


async def get_queue(request: Request) -> GatewayQueue:
    return state(request).queue


async def get_registry(request: Request) -> Registry:
    return state(request).registry


async def get_metrics(request: Request) -> Metrics:
    return state(request).metrics


def client_address(request: Request) -> str:
    """The peer address, or the client's as named by a proxy in ``VQA_FORWARDED_ALLOW_IPS``."""
    return request.client.host if request.client else "unknown"


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
QueueDep = Annotated[GatewayQueue, Depends(get_queue)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """401 unless ``Authorization: Bearer <key>`` carries a configured key (or anonymity is allowed);
    429 instead of 401 for a wrong key once the address is over its failed-authentication limit.

    A valid key always passes, so a client is never locked out by failures of others behind the
    same address (a NAT, an ingress). Only failures are counted and, past the limit, refused with
    429 + ``Retry-After``; with keys of 128+ random bits the limit is there to stop and flag clients
    that loop on a revoked key, not to make a guess likelier to fail.

    Returns the client id the rate limit counts against: ``key:<first 16 hex of the key's sha256>``,
    or ``ip:<address>`` in anonymous mode.
    """
    app = state(request)
    if app.settings.allow_anonymous:
        return f"ip:{client_address(request)}"
    try:
        return _client_id(app.settings, credentials)
    except Unauthorized:
        # Only a presented key that is wrong is a guess; a request without one is always plain 401.
        if app.auth_failure_limiter is not None and credentials is not None and credentials.credentials:
            await app.auth_failure_limiter.acquire(f"authfail:ip:{client_address(request)}")
        raise


def _client_id(settings: GatewaySettings, credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("expected an 'Authorization: Bearer <api key>' header, got none")
    digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
    # Compare against every configured digest (no early exit) in constant time per comparison:
    # neither the timing nor the position of a match tells an attacker anything.
    matched = False
    for entry in settings.api_keys:
        matched |= hmac.compare_digest(entry.removeprefix("sha256:"), digest)
    if not matched:
        raise Unauthorized("the API key is not valid")
    return f"key:{digest[:16]}"


class ApiKeyAuth(SecurityBase):
    """The ``HTTPBearer`` security scheme (same name and model in the OpenAPI document) that also
    runs the API key check, then the client's rate limit (429), before the body is read."""

    def __init__(self) -> None:
        self._bearer = HTTPBearer(auto_error=False, description="An API key from VQA_API_KEYS")
        self.model = self._bearer.model
        self.scheme_name = self._bearer.scheme_name

    async def __call__(self, request: Request) -> None:
        client_id = await require_api_key(request, await self._bearer(request))
        request.state.client_id = client_id  # the tenant that idempotency keys are scoped to
        limiter = state(request).limiter
        if limiter is not None:
            await limiter.acquire(client_id)


authorize = ApiKeyAuth()
Authorized = Depends(authorize)
# What :data:`Authorized` may refuse with, on every route behind it (the limits live in Redis).
AUTH_ERRORS = (Unauthorized, RateLimited, QueueUnavailable)


async def read_body(request: Request, limit: int, media_type: str = CONTENT_TYPE) -> bytes:
    """The request body, refused with 415/413 before it is read in full (streamed, capped at ``limit``)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != media_type:
        raise UnsupportedMediaType(f"expected Content-Type {media_type}, got {kind or 'none'}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body is {int(declared)} bytes (Content-Length); at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes; at most {limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)
