"""FastAPI dependencies: settings, queue, registry, metrics, API-key check + rate limits, the bounded body.

Everything a route needs arrives through these, as ``Annotated`` aliases, so tests can override
any of them (``app.dependency_overrides``) and routes stay a few lines long.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_client.protocol import CONTENT_TYPE

from ..config import GatewaySettings
from ..errors import BodyTooLarge, Unauthorized, UnsupportedMediaType
from ..metrics import Metrics
from ..queue import GatewayQueue
from ..rate_limit import RateLimiter
from ..registry import Registry

__all__ = [
    "Authorized",
    "Body",
    "MetricsDep",
    "QueueDep",
    "RegistryDep",
    "SettingsDep",
    "authorize",
    "read_body",
    "require_api_key",
]


# Plain attribute reads, declared async so FastAPI calls them inline instead of handing each one
# to its thread pool (six hand-offs per request were the gateway's largest overhead at 300 req/s).
async def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def get_queue(request: Request) -> GatewayQueue:
    return request.app.state.queue


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_limiter(request: Request) -> RateLimiter | None:
    return request.app.state.limiter


async def get_auth_failure_limiter(request: Request) -> RateLimiter | None:
    """Failed authentications per client address (None: anonymous, or VQA_AUTH_FAILURES_PER_MINUTE=0)."""
    return request.app.state.auth_failure_limiter


def client_address(request: Request) -> str:
    """The peer address (the client's only if uvicorn runs with ``--proxy-headers`` behind a proxy)."""
    return request.client.host if request.client else "unknown"


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
QueueDep = Annotated[GatewayQueue, Depends(get_queue)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="An API key from VQA_API_KEYS")


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    failures: Annotated[RateLimiter | None, Depends(get_auth_failure_limiter)],
) -> str:
    """401 unless ``Authorization: Bearer <key>`` carries a configured key (or anonymity is allowed);
    429 before any key is compared while the address is over its failed-authentication limit.

    Returns the client id the rate limit counts against: ``key:<first 16 hex of the key's sha256>``,
    or ``ip:<address>`` in anonymous mode.
    """
    if settings.allow_anonymous:
        return f"ip:{client_address(request)}"
    failure_id = f"authfail:ip:{client_address(request)}"
    if failures is not None:
        await failures.check(failure_id)
    try:
        return _client_id(settings, credentials)
    except Unauthorized:
        if failures is not None:
            await failures.acquire(failure_id)  # over the limit (a replica raced us): 429, not 401
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


async def authorize(
    client_id: Annotated[str, Depends(require_api_key)],
    limiter: Annotated[RateLimiter | None, Depends(get_limiter)],
) -> None:
    """The API key check, then the client's rate limit (429), before the body is read."""
    if limiter is not None:
        await limiter.acquire(client_id)


Authorized = Depends(authorize)


async def read_body(request: Request, settings: SettingsDep) -> bytes:
    """The request body, refused with 415/413 before it is read in full (streamed, capped)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != CONTENT_TYPE:
        raise UnsupportedMediaType(f"expected Content-Type {CONTENT_TYPE}, got {kind or 'none'}")
    limit = settings.max_body_bytes
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


Body = Annotated[bytes, Depends(read_body)]
