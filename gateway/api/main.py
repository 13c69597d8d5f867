"""The FastAPI application: ``create_app(settings)`` and the ``vqa-gateway`` command.

    vqa-gateway --host 0.0.0.0 --port 8000 --redis-url redis://redis:6379/0
    VQA_QUEUE=memory VQA_ALLOW_ANONYMOUS=true vqa-gateway      # laptop demo, model in-process

The lifespan builds the queue (Redis, or in-process with the worker loop in a thread), the
registry of served models and the reply reader; nothing heavy happens at import time, and this
module never imports torch (only ``VQA_QUEUE=memory`` loads the model, inside the lifespan). One
exception handler maps every :class:`~edge_client.errors.AlignedVQError` to its HTTP status and
``{"error": {"code", "message"}}`` (on ``/v1/chat/completions``, the same code and status as an
OpenAI error object); FastAPI's and Starlette's own errors get the same body, and an
unexpected exception is logged and answered with a bare 500 ``server_error``, never a traceback.
The ``/v1`` routes check the API key, then the client's rate limit (:mod:`gateway.rate_limit`),
then read the body; CORS headers are sent only to ``VQA_CORS_ORIGINS`` (none by default).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from edge_client.errors import AlignedVQError
from edge_client.protocol import RequestError

from ..config import GatewaySettings
from ..errors import HTTP_STATUS, ServerError, error_body, http_status
from ..metrics import Metrics
from ..queue import MemoryQueue, RedisGatewayQueue
from ..rate_limit import RateLimit, limiter_for
from ..served_models import Registry
from .image_cache import image_cache_for
from .openai_chat import CHAT_PATH, error_object
from .routes import chat_router, health_router, models_router, vqa_router
from .routes.web import router as web_router

__all__ = ["create_app", "run"]

log = logging.getLogger("gateway")

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: GatewaySettings = app.state.settings
    in_process = None
    queue: MemoryQueue | RedisGatewayQueue
    if settings.queue == "memory":
        from ..worker.worker import InProcessWorker  # its thread loads torch: in this mode only

        queue = MemoryQueue(settings)
        await queue.start()
        in_process = InProcessWorker(queue, settings)
        in_process.start()
    else:
        queue = RedisGatewayQueue(settings, gateway_id=uuid.uuid4().hex[:16])
        await queue.start()
        try:
            await queue.ping()
        except AlignedVQError as exc:  # not fatal: the gateway answers 503 until Redis is back
            log.warning("Redis is not reachable at start-up (%s); serving 503 until it is", exc)
    # Held where the queue keeps its state: in Redis, so every gateway replica sees the same counts.
    app.state.limiter = (
        limiter_for(queue, RateLimit(settings.rate_limit_per_s, settings.rate_limit_burst))
        if settings.rate_limit_per_s > 0
        else None
    )
    app.state.auth_failure_limiter = (
        limiter_for(
            queue,
            RateLimit(
                settings.auth_failures_per_minute / 60, settings.auth_failure_burst, "failed authentications"
            ),
        )
        if settings.auth_failures_per_minute > 0 and not settings.allow_anonymous
        else None
    )
    app.state.queue = queue
    app.state.images = image_cache_for(queue, settings.image_ttl_s, settings.image_cache_bytes)
    app.state.in_process = in_process
    app.state.image_decodes = asyncio.Semaphore(settings.image_decodes)
    app.state.image_waiting = {}
    app.state.registry = Registry(queue, settings.registry_ttl_ms)
    try:
        yield
    finally:
        if in_process is not None:
            in_process.stop()
        await queue.close()


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    retry_after: int | None = None,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The JSON error reply, with the headers its status promises (RFC 9110: ``Allow`` on 405,
    ``WWW-Authenticate`` on 401; ours: ``Retry-After`` on 429 and 503). On the OpenAI-compatible
    route, an OpenAI error object (``param``: the field at fault, when known)."""
    request.state.error_code = code
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after or request.app.state.settings.retry_after_s)
    if request.url.path == CHAT_PATH:
        return JSONResponse(error_object(status, code, message, param), status_code=status, headers=headers)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def _handle_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AlignedVQError)
    status = http_status(exc)
    if status >= 500:  # the cause (e.g. redis-py's error) is logged, never sent
        cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
        log.warning(
            "%s %s -> %d %s: %s%s", request.method, request.url.path, status, exc.code, exc.message, cause
        )
    param = exc.param if isinstance(exc, RequestError) else None
    return _respond(request, status, exc.code, exc.message, getattr(exc, "retry_after", None), param=param)


async def _handle_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"]) or "request"
    return _respond(request, 422, "bad_request", f"{where}: {first['msg']}")


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else ServerError.code)
    return _respond(request, exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _respond(request, 500, ServerError.code, "internal error; see the gateway log")


class MetricsMiddleware:
    """Counts every request by route template, status and error code, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            code = scope.get("state", {}).get("error_code") or ("ok" if status < 400 else ServerError.code)
            self.metrics.observe_request(route, status, code, time.perf_counter() - start)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app; ``settings`` default to the environment (validated here, at start-up)."""
    settings = settings if settings is not None else GatewaySettings()
    app = FastAPI(
        title="LLaVA-AlignedVQ gateway",
        version="1",
        summary="Edge-cloud VQA: AlignedVQ-compressed image features in, answers out",
        lifespan=lifespan,
        # No Swagger UI: FastAPI's loads its scripts from a CDN, into the origin that also serves
        # the web edge page (whose API key sits in sessionStorage). The schema stays.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.limiter = None  # set by the lifespan when VQA_RATE_LIMIT_PER_S > 0
    app.state.auth_failure_limiter = None  # set by the lifespan unless anonymous or turned off
    app.include_router(vqa_router)
    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(health_router)
    app.include_router(web_router)  # GET /: the web edge page (edge_client/web)
    app.add_exception_handler(AlignedVQError, _handle_error)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.forwarded_allow_ips:  # outermost: every later layer sees the client's address
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    if settings.cors_origins:  # off by default: the API is for edge devices, not browser pages
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", "If-None-Match", "Last-Event-ID"],
            expose_headers=["Retry-After", "ETag", "X-Codebook-Hash"],
            max_age=600,
        )
    assert all(code in HTTP_STATUS for code in _HTTP_CODES.values())
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made self-consistent for schema-driven tools:

    - without the 422 FastAPI adds to every route with parameters: ours are strings that cannot
      fail validation (a route that can answer 422 declares it, with our error body);
    - request bodies given as pydantic schemas (the msgpack and chat bodies) keep their nested
      models under ``components/schemas``, where their references point, not under a ``$defs``
      that a body schema inside ``paths`` cannot be referenced at.
    """
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema["paths"].values():
            for operation in operations.values():
                framework = operation["responses"].get("422", {}).get("content", {})
                if "HTTPValidationError" in str(framework):
                    del operation["responses"]["422"]
                for content in operation.get("requestBody", {}).get("content", {}).values():
                    body = content.get("schema", {})
                    components.update(body.pop("$defs", {}))
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = json.loads(json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/'))
    return app.openapi_schema


def _parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="vqa-gateway", description="Serve the VQA HTTP API (settings: VQA_* env vars and .env)."
    )
    parser.add_argument("--host", help="bind address (VQA_HOST)")
    parser.add_argument("--port", type=int, help="port (VQA_PORT)")
    parser.add_argument("--redis-url", help="Redis URL (VQA_REDIS_URL)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def run(argv: Sequence[str] | None = None) -> None:
    """``vqa-gateway``: validate the settings, then serve with uvicorn (SIGTERM drains in-flight requests)."""
    import uvicorn

    overrides = _parse_args(argv)
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        print(f"vqa-gateway: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    # The imports leave ~90k long-lived objects that each full collection would walk (~20-35 ms,
    # a pause for every request in flight). Collected once, then frozen: the collector skips them.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=False,  # create_app applies VQA_FORWARDED_ALLOW_IPS itself
        timeout_graceful_shutdown=max(1, settings.max_timeout_ms // 1000),
    )
