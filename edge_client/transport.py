"""Sans-I/O HTTP for the edge: retrying exchanges written once, run by a sync or an async driver.

Each operation is a generator ("flow") that yields what it needs done (an ``httpx.Request`` to
send, or a :class:`Sleep`) and receives the response; :func:`run_sync` and :func:`run_async` are
the only code that differs between ``httpx.Client`` and ``httpx.AsyncClient`` (the pattern of h11
and httpcore). A streamed reply (Server-Sent Events) takes two more steps: :class:`OpenStream`
sends a request and returns its response with the body unread, and :class:`ReadLine` returns the
body's next line, so the flow parses events (:mod:`edge_client.sse`) as they arrive and the drivers
only move bytes. Responses a flow leaves open are closed when it ends.

Retries (:func:`exchange`): connection failures, timeouts and HTTP 429/502/503/504 are retried up to
``policy.retries`` times, honouring ``Retry-After`` and otherwise backing off exponentially (with
jitter, capped at ``policy.max_backoff_s``). A retry resends the same body, so the same
``request_id``: the gateway processes a request id once per API key (docs/design.md, request
path), so a retry after a lost reply is safe. Other 4xx are never retried.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import anyio
import httpx

from .errors import GatewayError, GatewayTimeoutError, GatewayUnreachableError

__all__ = [
    "RETRY_STATUSES",
    "Flow",
    "OpenStream",
    "ReadLine",
    "RetryPolicy",
    "Sleep",
    "error_from_response",
    "exchange",
    "retry_after",
    "run_async",
    "run_sync",
]

RETRY_STATUSES = frozenset({429, 502, 503, 504})
T = TypeVar("T")


@dataclass(frozen=True)
class Sleep:
    """A step of a flow: pause before the next attempt."""

    seconds: float


@dataclass(frozen=True)
class OpenStream:
    """A step of a flow: send ``request``; the response comes back with its body unread (an error
    reply is read in full, so it can be reported)."""

    request: httpx.Request


@dataclass(frozen=True)
class ReadLine:
    """A step of a flow: the next line of an opened ``response`` (None at its end)."""

    response: httpx.Response


Flow = Generator["httpx.Request | Sleep | OpenStream | ReadLine", "httpx.Response | str | None", T]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently :func:`exchange` retries; ``gateway_url`` names it in errors."""

    gateway_url: str
    retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    read_timeout_s: float = 30.0

    def backoff(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = retry_after(response) if response is not None else None
        if hinted is None:
            hinted = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads retries
        return min(hinted, self.max_backoff_s)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), None if absent/invalid."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> GatewayError:
    """Map an error reply (``{"error": {"code", "message"}}`` or anything else) to GatewayError."""
    status = response.status_code
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().replace("\n", " ")[:200]
        code = f"http_{status}"
        message = f"gateway answered {status} {response.reason_phrase}" + (f": {text}" if text else "")
    return GatewayError(code, status, message)


def exchange(
    request: httpx.Request, policy: RetryPolicy, accept: frozenset[int] = frozenset(), *, stream: bool = False
) -> Flow[httpx.Response]:
    """Send with retries; returns a 2xx (or ``accept``-ed) response, else raises GatewayError.
    ``stream``: the 2xx response comes back with its body unread (read it with :class:`ReadLine`)."""
    target = f"{request.method} {request.url}"
    step = OpenStream(request) if stream else request
    for attempt in range(policy.retries + 1):
        final = attempt == policy.retries
        response = None
        try:
            sent = yield step
            assert isinstance(sent, httpx.Response)  # a driver answers a send with a response
            response = sent
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if final:
                raise GatewayUnreachableError(
                    f"cannot reach the gateway at {policy.gateway_url} ({type(exc).__name__}: {exc}) "
                    f"after {attempt + 1} attempt(s)"
                ) from exc
        except httpx.TimeoutException as exc:
            if final:
                raise GatewayTimeoutError(
                    f"no reply to {target} within {policy.read_timeout_s:g} s ({type(exc).__name__}) "
                    f"after {attempt + 1} attempt(s)"
                ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            if final:
                raise GatewayUnreachableError(
                    f"connection to the gateway at {policy.gateway_url} failed "
                    f"({type(exc).__name__}: {exc}) after {attempt + 1} attempt(s)"
                ) from exc
        except httpx.TransportError as exc:  # proxy or protocol misuse: retrying will not help
            raise GatewayUnreachableError(f"{target} failed: {type(exc).__name__}: {exc}") from exc
        else:
            assert response is not None  # a driver sends a response or throws
            if response.is_success or response.status_code in accept:
                return response
            if response.status_code not in RETRY_STATUSES or final:
                raise error_from_response(response)
        yield Sleep(policy.backoff(attempt, response))
    raise AssertionError("unreachable: the last attempt returns or raises")


def run_sync(http: httpx.Client, flow: Flow[T]) -> T:
    """Drive ``flow`` on a blocking client."""
    reply: httpx.Response | str | None = None
    error: Exception | None = None
    lines: dict[httpx.Response, Iterator[str]] = {}
    try:
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply, error = None, None
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            try:
                if isinstance(step, ReadLine):
                    reply = next(lines[step.response], None)
                elif isinstance(step, OpenStream):
                    reply = http.send(step.request, stream=True)
                    if reply.is_success:
                        lines[reply] = reply.iter_lines()
                    else:
                        reply.read()
                        reply.close()
                else:
                    reply = http.send(step)
            except httpx.TransportError as exc:
                error = exc
    finally:
        for response in lines:
            response.close()


async def run_async(http: httpx.AsyncClient, flow: Flow[T]) -> T:
    """Drive ``flow`` on an async client (the same steps as :func:`run_sync`)."""
    reply: httpx.Response | str | None = None
    error: Exception | None = None
    lines: dict[httpx.Response, AsyncIterator[str]] = {}
    try:
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            reply, error = None, None
            if isinstance(step, Sleep):
                await anyio.sleep(step.seconds)
                continue
            try:
                if isinstance(step, ReadLine):
                    reply = await anext(lines[step.response], None)
                elif isinstance(step, OpenStream):
                    reply = await http.send(step.request, stream=True)
                    if reply.is_success:
                        lines[reply] = reply.aiter_lines()
                    else:
                        await reply.aread()
                        await reply.aclose()
                else:
                    reply = await http.send(step)
            except httpx.TransportError as exc:
                error = exc
    finally:
        for response in lines:
            await response.aclose()
