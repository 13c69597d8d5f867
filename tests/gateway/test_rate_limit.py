"""Per-client rate limits (GCRA) over real Redis: burst, 429 + Retry-After, refill, replicas, keys.

``GET /v1/models`` is the probe: it is rate limited like every ``/v1`` route and needs no worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from gateway.api.main import create_app
from gateway.errors import RateLimited
from gateway.queue import Keys
from gateway.rate_limit import MemoryRateLimiter, RateLimit, RedisRateLimiter

from .conftest import gateway_settings
from .helpers import API_KEY, AUTH

OTHER_KEY = "other-key-0123456789abcdef"


def limited(redis_url: str, prefix: str, per_s: float, burst: int, **overrides):
    return gateway_settings(redis_url, prefix, rate_limit_per_s=per_s, rate_limit_burst=burst, **overrides)


def check_limited(reply, retry_after: str) -> None:
    assert reply.status_code == 429, reply.text
    assert reply.json()["error"]["code"] == "rate_limited"
    assert "rate limit" in reply.json()["error"]["message"]
    assert reply.headers["retry-after"] == retry_after


def test_burst_is_allowed_then_429_with_retry_after(redis_url, prefix, open_client) -> None:
    client = open_client(limited(redis_url, prefix, per_s=0.5, burst=3))
    for _ in range(3):
        assert client.get("/v1/models", headers=AUTH).status_code == 200
    # The 4th request passes one interval (2 s) after the burst began: Retry-After says 2.
    check_limited(client.get("/v1/models", headers=AUTH), "2")
    assert client.get("/healthz").status_code == 200  # probes are never limited
    key = Keys(prefix).rate(f"key:{hashlib.sha256(API_KEY.encode()).hexdigest()[:16]}")
    ttl_ms = redis.Redis.from_url(redis_url).pttl(key)
    assert 4_000 < ttl_ms <= 6_000  # the key lives until the bucket is full again: burst / rate


def test_the_bucket_refills_after_one_interval(redis_url, prefix, open_client) -> None:
    client = open_client(limited(redis_url, prefix, per_s=2, burst=2))
    assert [client.get("/v1/models", headers=AUTH).status_code for _ in range(2)] == [200, 200]
    check_limited(client.get("/v1/models", headers=AUTH), "1")  # 0.5 s, rounded up
    time.sleep(0.5)
    assert client.get("/v1/models", headers=AUTH).status_code == 200  # one token back
    check_limited(client.get("/v1/models", headers=AUTH), "1")  # and only one


def test_two_gateway_replicas_share_one_limit(redis_url, prefix, open_client) -> None:
    first = open_client(limited(redis_url, prefix, per_s=0.5, burst=3))
    second = open_client(limited(redis_url, prefix, per_s=0.5, burst=3))
    statuses = [c.get("/v1/models", headers=AUTH).status_code for c in (first, second, first)]
    assert statuses == [200, 200, 200]
    check_limited(second.get("/v1/models", headers=AUTH), "2")
    check_limited(first.get("/v1/models", headers=AUTH), "2")


def test_different_keys_are_independent(redis_url, prefix, open_client) -> None:
    client = open_client(limited(redis_url, prefix, per_s=0.5, burst=2, api_keys=f"{API_KEY},{OTHER_KEY}"))
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert [client.get("/v1/models", headers=AUTH).status_code for _ in range(3)] == [200, 200, 429]
    assert [client.get("/v1/models", headers=other).status_code for _ in range(3)] == [200, 200, 429]


def test_anonymous_clients_are_limited_per_address(redis_url, prefix) -> None:
    settings = limited(redis_url, prefix, per_s=0.5, burst=1, allow_anonymous=True, api_keys="")
    app = create_app(settings)
    with TestClient(app, client=("10.0.0.1", 1000)) as one:
        assert one.get("/v1/models").status_code == 200
        check_limited(one.get("/v1/models", headers=AUTH), "2")  # a key changes nothing here
        with TestClient(app, client=("10.0.0.2", 1000)) as two:
            assert two.get("/v1/models").status_code == 200


def test_redis_unreachable_is_the_usual_503(open_client) -> None:
    client = open_client(limited("redis://127.0.0.1:1/0", "nowhere", per_s=1, burst=1, retry_after_s=3))
    reply = client.get("/v1/models", headers=AUTH)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_unavailable"
    assert reply.headers["retry-after"] == "3"


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_redis_and_memory_limiters_have_the_same_semantics(kind, redis_url, prefix) -> None:
    limit = RateLimit(per_s=4, burst=2)  # 250 ms between requests once the burst is spent

    async def scenario() -> list[object]:
        client = aioredis.Redis.from_url(redis_url)
        limiter = (
            RedisRateLimiter(client, Keys(prefix), limit) if kind == "redis" else MemoryRateLimiter(limit)
        )
        outcomes: list[object] = []

        async def attempt() -> None:
            try:
                await limiter.acquire("client")
                outcomes.append("ok")
            except RateLimited as exc:
                outcomes.append(exc.retry_after)

        try:
            await attempt()
            await attempt()
            await attempt()
            await asyncio.sleep(0.26)
            await attempt()
            await attempt()
            await limiter.acquire("someone-else")  # another client has its own bucket
        finally:
            await client.aclose()
        return outcomes

    assert asyncio.run(scenario()) == ["ok", "ok", 1, "ok", 1]


def test_memory_limiter_arithmetic_on_a_fake_clock() -> None:
    now = [0]
    limiter = MemoryRateLimiter(RateLimit(per_s=0.25, burst=3), clock=lambda: now[0])

    def attempt() -> object:
        try:
            asyncio.run(limiter.acquire("c"))
            return "ok"
        except RateLimited as exc:
            return exc.retry_after

    assert [attempt() for _ in range(4)] == ["ok", "ok", "ok", 4]
    now[0] = 3_000_000_000  # 3 s later: the next token is 1 s away
    assert attempt() == 1
    now[0] = 4_000_000_000
    assert [attempt(), attempt()] == ["ok", 4]
    now[0] = 100_000_000_000  # long idle: a full burst again, not more
    assert [attempt() for _ in range(4)] == ["ok", "ok", "ok", 4]


def test_rate_limit_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="rate_limit_burst"):
        gateway_settings("redis://127.0.0.1:6379/0", "x", rate_limit_per_s=1, rate_limit_burst=0)
    with pytest.raises(ValueError, match="rate_limit_per_s"):
        gateway_settings("redis://127.0.0.1:6379/0", "x", rate_limit_per_s=-1)
