"""Failed authentication is rate limited per client address, in Redis: 401s, then 429 + Retry-After
before the key is even compared; other addresses, replicas and the refill behave as documented.

``GET /v1/models`` is the probe: it needs the API key like every ``/v1`` route, and no worker.
"""

from __future__ import annotations

import asyncio
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
from .helpers import AUTH

BAD = {"Authorization": "Bearer wrong-key-0123456789abcdef"}
ATTACKER, OTHER = ("10.0.0.66", 40000), ("10.0.0.7", 40000)


def guarded(redis_url: str, prefix: str, per_minute: float = 6, burst: int = 3, **overrides):
    fields = dict(auth_failures_per_minute=per_minute, auth_failure_burst=burst)
    return gateway_settings(redis_url, prefix, **fields, **overrides)


def statuses(client: TestClient, headers: dict, count: int) -> list[int]:
    return [client.get("/v1/models", headers=headers).status_code for _ in range(count)]


def check_blocked(reply, retry_after: str) -> None:
    assert reply.status_code == 429, reply.text
    assert reply.json()["error"]["code"] == "rate_limited"
    assert "failed authentications" in reply.json()["error"]["message"]
    assert reply.headers["retry-after"] == retry_after


def test_bad_keys_get_401_then_429_even_with_the_right_key(redis_url, prefix) -> None:
    app = create_app(guarded(redis_url, prefix))  # 3 at once, then one per 10 s
    with TestClient(app, client=ATTACKER) as attacker:
        assert statuses(attacker, BAD, 2) + statuses(attacker, {}, 1) == [401, 401, 401]  # no header counts
        check_blocked(attacker.get("/v1/models", headers=BAD), "10")
        check_blocked(attacker.get("/v1/models", headers=AUTH), "10")  # the key is not even compared
        assert attacker.get("/healthz").status_code == 200  # probes need no key
        key = Keys(prefix).rate(f"authfail:ip:{ATTACKER[0]}")
        assert 20_000 < redis.Redis.from_url(redis_url).pttl(key) <= 30_000  # gone once refilled
        with TestClient(app, client=OTHER) as other:
            assert statuses(other, AUTH, 3) == [200, 200, 200]  # another address is not affected


def test_valid_keys_are_never_counted(redis_url, prefix) -> None:
    with TestClient(create_app(guarded(redis_url, prefix, burst=1)), client=ATTACKER) as client:
        assert statuses(client, AUTH, 5) == [200] * 5
        assert statuses(client, BAD, 2) == [401, 429]


def test_two_gateway_replicas_share_the_count(redis_url, prefix) -> None:
    settings = guarded(redis_url, prefix)
    with (
        TestClient(create_app(settings), client=ATTACKER) as first,
        TestClient(create_app(settings), client=ATTACKER) as second,
    ):
        assert [c.get("/v1/models", headers=BAD).status_code for c in (first, second, first)] == [401] * 3
        check_blocked(second.get("/v1/models", headers=BAD), "10")
        check_blocked(first.get("/v1/models", headers=AUTH), "10")


def test_attempts_are_allowed_again_after_the_window(redis_url, prefix) -> None:
    # 120 per minute, 2 at once: a token every 0.5 s; a full bucket again 1 s after the burst.
    with TestClient(create_app(guarded(redis_url, prefix, per_minute=120, burst=2)), client=ATTACKER) as c:
        assert statuses(c, BAD, 2) == [401, 401]
        check_blocked(c.get("/v1/models", headers=AUTH), "1")
        time.sleep(1.05)
        assert statuses(c, AUTH, 1) + statuses(c, BAD, 3) == [200, 401, 401, 429]


def test_zero_turns_it_off(redis_url, prefix) -> None:
    with TestClient(create_app(guarded(redis_url, prefix, per_minute=0, burst=1)), client=ATTACKER) as c:
        assert statuses(c, BAD, 5) == [401] * 5


def test_redis_unreachable_is_the_usual_503(open_client) -> None:
    client = open_client(guarded("redis://127.0.0.1:1/0", "nowhere", retry_after_s=3))
    for headers in (BAD, AUTH):
        reply = client.get("/v1/models", headers=headers)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_unavailable"
        assert reply.headers["retry-after"] == "3"


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_check_counts_nothing_and_agrees_with_acquire(kind, redis_url, prefix) -> None:
    limit = RateLimit(per_s=4, burst=2, what="failed authentications")

    async def scenario() -> list[object]:
        client = aioredis.Redis.from_url(redis_url)
        limiter = (
            RedisRateLimiter(client, Keys(prefix), limit) if kind == "redis" else MemoryRateLimiter(limit)
        )

        async def outcome(step) -> object:
            try:
                await step("addr")
                return "ok"
            except RateLimited as exc:
                return exc.retry_after

        try:
            checks = [await outcome(limiter.check) for _ in range(5)]  # nothing counted
            spent = [await outcome(limiter.acquire) for _ in range(2)]
            return [*checks, *spent, await outcome(limiter.check), await outcome(limiter.acquire)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == ["ok"] * 7 + [1, 1]


def test_auth_failure_settings_are_validated() -> None:
    defaults = gateway_settings("redis://127.0.0.1:6379/0", "x")
    assert (defaults.auth_failures_per_minute, defaults.auth_failure_burst) == (10, 10)
    with pytest.raises(ValueError, match="auth_failure_burst"):
        guarded("redis://127.0.0.1:6379/0", "x", burst=0)
    with pytest.raises(ValueError, match="auth_failures_per_minute"):
        guarded("redis://127.0.0.1:6379/0", "x", per_minute=-1)
