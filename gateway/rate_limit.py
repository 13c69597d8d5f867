"""Per-client rate limits: GCRA in Redis (shared by every gateway replica) or in-process.

A client is an API key (``key:<first 16 hex of its sha256>``) or, with ``VQA_ALLOW_ANONYMOUS``,
a client address (``ip:<address>``; behind a proxy, list it in ``VQA_FORWARDED_ALLOW_IPS`` so the
address is the client's, not the proxy's). Each may send ``VQA_RATE_LIMIT_BURST`` requests at
once and ``VQA_RATE_LIMIT_PER_S`` per second sustained; past that it gets 429 ``rate_limited``
with ``Retry-After`` (whole seconds, rounded up) naming when its next request will pass.

GCRA (ITU-T I.371) is a token bucket stored as one timestamp, the client's theoretical arrival
time: no refill job, one key per active client. :class:`RedisRateLimiter` runs it as the
``RATE_LIMIT`` Lua script on Redis's clock (replicas need no clock agreement, and a Redis error is
the usual 503 ``queue_unavailable``); :class:`MemoryRateLimiter` runs the same arithmetic for
``VQA_QUEUE=memory``, where there is only one process.

Failed authentication is limited the same way, per client address (``authfail:ip:<address>``,
``VQA_AUTH_FAILURE_BURST`` at once, ``VQA_AUTH_FAILURES_PER_MINUTE`` sustained). Only failures are
counted, and a valid key is never refused by it (see :func:`gateway.api.deps.require_api_key`).
The address is the TCP peer's unless the peer is a proxy listed in ``VQA_FORWARDED_ALLOW_IPS``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from .errors import RateLimited
from .queue import GatewayQueue, RedisGatewayQueue
from .queue.keys import Keys
from .queue.redis_queue import redis_errors
from .queue.scripts import RATE_LIMIT

__all__ = ["MemoryRateLimiter", "RateLimit", "RateLimiter", "RedisRateLimiter", "limiter_for"]

# The in-process table is pruned of clients whose bucket is full again once it holds this many.
_MEMORY_PRUNE_AT = 10_000


@dataclass(frozen=True)
class RateLimit:
    """``per_s`` requests per second sustained, ``burst`` at once (a full bucket); ``what`` names
    the counted events in the 429 message."""

    per_s: float
    burst: int
    what: str = "requests"

    def __post_init__(self) -> None:
        if not (self.per_s > 0 and self.burst >= 1):
            raise ValueError(f"expected per_s > 0 and burst >= 1, got per_s={self.per_s}, burst={self.burst}")

    @property
    def interval_us(self) -> int:
        """Microseconds between two requests at the sustained rate."""
        return max(1, round(1_000_000 / self.per_s))

    def advance(self, client_id: str, tat: int | None, now: int) -> int:
        """GCRA at ``now`` (us) on the stored ``tat`` (None: none stored): the client's next TAT,
        or RateLimited if this event would be refused. The RATE_LIMIT script is its Redis twin."""
        next_tat = max(now if tat is None else tat, now) + self.interval_us
        allow_at = next_tat - self.burst * self.interval_us
        if allow_at > now:
            raise self.refusal(client_id, allow_at - now)
        return next_tat

    def refusal(self, client_id: str, wait_us: int) -> RateLimited:
        return RateLimited(
            f"client {client_id} is over its rate limit of {self.per_s:g} {self.what}/s (burst "
            f"{self.burst}); the next request is allowed in {math.ceil(wait_us / 1000)} ms",
            retry_after=max(1, math.ceil(wait_us / 1_000_000)),
        )


class RateLimiter(Protocol):
    limit: RateLimit

    async def acquire(self, client_id: str) -> None:
        """Count one request of ``client_id``; raise RateLimited (with retry_after) if over its limit."""


class RedisRateLimiter:
    """GCRA in Redis: one ``{prefix}:rate:{client}`` key per client, shared by all replicas."""

    def __init__(self, client: aioredis.Redis, keys: Keys, limit: RateLimit) -> None:
        self.limit = limit
        self.keys = keys
        self._client = client
        self._script = client.register_script(RATE_LIMIT)

    async def acquire(self, client_id: str) -> None:
        with redis_errors():
            allowed, wait_us = await self._script(
                keys=[self.keys.rate(client_id)], args=[self.limit.interval_us, self.limit.burst]
            )
        if not allowed:
            raise self.limit.refusal(client_id, int(wait_us))


class MemoryRateLimiter:
    """The same GCRA in this process (``VQA_QUEUE=memory``); called on the event loop only."""

    def __init__(self, limit: RateLimit, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.limit = limit
        self._clock = clock
        self._tat: dict[str, int] = {}

    async def acquire(self, client_id: str) -> None:
        now = self._clock() // 1000
        self._tat[client_id] = self.limit.advance(client_id, self._tat.get(client_id), now)
        if len(self._tat) > _MEMORY_PRUNE_AT:
            self._tat = {client: tat for client, tat in self._tat.items() if tat > now}


def limiter_for(queue: GatewayQueue, limit: RateLimit) -> RateLimiter:
    """A limiter held where ``queue`` keeps its state: Redis (shared by replicas) or this process."""
    if isinstance(queue, RedisGatewayQueue):
        return RedisRateLimiter(queue.client, queue.keys, limit)
    return MemoryRateLimiter(limit)
