"""FastAPI dependencies: settings, queue, registry, metrics, the API-key check and the bounded body.

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
from ..registry import Registry

__all__ = [
    "Authorized",
    "Body",
    "MetricsDep",
    "QueueDep",
    "RegistryDep",
    "SettingsDep",
    "read_body",
    "require_api_key",
]


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_queue(request: Request) -> GatewayQueue:
    return request.app.state.queue


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
QueueDep = Annotated[GatewayQueue, Depends(get_queue)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="An API key from VQA_API_KEYS")


def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless ``Authorization: Bearer <key>`` carries a configured key (or anonymity is allowed)."""
    if settings.allow_anonymous:
        return
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


Authorized = Depends(require_api_key)


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
