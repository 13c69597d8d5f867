"""Failed authentication is rate limited per client address, in Redis: 401s, then 429 + Retry-After
for wrong keys while a valid key from the same address always passes; other addresses, replicas,
the refill and trusted proxies (VQA_FORWARDED_ALLOW_IPS) behave as documented.

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

from ..conftest import gateway_settings
from ..helpers import AUTH

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


def test_bad_keys_get_401_then_429_and_valid_keys_still_pass(redis_url, prefix) -> None:
    app = create_app(guarded(redis_url, prefix))  # 3 at once, then one per 10 s
    with TestClient(app, client=ATTACKER) as attacker:
        assert statuses(attacker, {}, 5) == [401] * 5  # no key is no guess: never counted, always 401
        assert statuses(attacker, BAD, 3) == [401, 401, 401]
        check_blocked(attacker.get("/v1/models", headers=BAD), "10")
        assert statuses(attacker, {}, 1) == [401]
        # A valid key from the same address (a NAT, a proxy) is never refused for others' failures.
        assert statuses(attacker, AUTH, 3) == [200, 200, 200]
        check_blocked(attacker.get("/v1/models", headers=BAD), "10")  # guessing stays throttled
        assert attacker.get("/healthz").status_code == 200  # probes need no key
        key = Keys(prefix).rate(f"authfail:ip:{ATTACKER[0]}")
        assert 20_000 < redis.Redis.from_url(redis_url).pttl(key) <= 30_000  # gone once refilled
        with TestClient(app, client=OTHER) as other:
            assert statuses(other, BAD, 1) == [401]  # another address is not affected


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
        check_blocked(first.get("/v1/models", headers=BAD), "10")
        assert statuses(second, AUTH, 1) == [200]


def test_attempts_are_allowed_again_after_the_window(redis_url, prefix) -> None:
    # 120 per minute, 2 at once: a token every 0.5 s; a full bucket again 1 s after the burst.
    with TestClient(create_app(guarded(redis_url, prefix, per_minute=120, burst=2)), client=ATTACKER) as c:
        assert statuses(c, BAD, 2) == [401, 401]
        check_blocked(c.get("/v1/models", headers=BAD), "1")
        time.sleep(1.05)
        assert statuses(c, BAD, 3) == [401, 401, 429]


def test_zero_turns_it_off(redis_url, prefix) -> None:
    with TestClient(create_app(guarded(redis_url, prefix, per_minute=0, burst=1)), client=ATTACKER) as c:
        assert statuses(c, BAD, 5) == [401] * 5


def test_redis_unreachable_is_the_usual_503(open_client) -> None:
    client = open_client(guarded("redis://127.0.0.1:1/0", "nowhere", retry_after_s=3))
    for headers in (BAD, AUTH):
        reply = client.get("/v1/models", headers=headers)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_unavailable"
        assert reply.headers["retry-after"] == "3"


PROXY = ("10.1.2.3", 40000)


def forwarded(address: str, key: dict) -> dict:
    return {**key, "X-Forwarded-For": address}


def test_devices_behind_a_trusted_proxy_are_counted_apart(redis_url, prefix) -> None:
    settings = guarded(redis_url, prefix, burst=2, forwarded_allow_ips="10.1.0.0/16")
    with TestClient(create_app(settings), client=PROXY) as proxy:
        revoked = [proxy.get("/v1/models", headers=forwarded("203.0.113.5", BAD)) for _ in range(3)]
        assert [r.status_code for r in revoked] == [401, 401, 429]
        # Another device through the same ingress: its own count, and its valid key passes.
        assert proxy.get("/v1/models", headers=forwarded("203.0.113.9", BAD)).status_code == 401
        assert proxy.get("/v1/models", headers=forwarded("203.0.113.9", AUTH)).status_code == 200
        # uvicorn's rule: the right-most address not itself a trusted proxy is the client, so a
        # device cannot hide behind a spoofed first entry.
        spoofed = forwarded("198.51.100.1, 203.0.113.5", BAD)
        check_blocked(proxy.get("/v1/models", headers=spoofed), "10")


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(redis_url, prefix) -> None:
    for trusted in ([], ["10.1.0.0/16"]):
        with TestClient(
            create_app(guarded(redis_url, f"{prefix}{len(trusted)}", burst=2, forwarded_allow_ips=trusted)),
            client=ATTACKER,
        ) as c:
            # Each request claims a fresh address; the peer is not a trusted proxy, so all count as its own.
            codes = [
                c.get("/v1/models", headers=forwarded(f"192.0.2.{n}", BAD)).status_code for n in range(3)
            ]
            assert codes == [401, 401, 429]


def test_memory_limiter_agrees_with_redis(redis_url, prefix) -> None:
    limit = RateLimit(per_s=4, burst=2, what="failed authentications")

    async def scenario(kind: str) -> list[object]:
        client = aioredis.Redis.from_url(redis_url)
        limiter = (
            RedisRateLimiter(client, Keys(f"{prefix}{kind}"), limit)
            if kind == "redis"
            else MemoryRateLimiter(limit)
        )

        async def outcome() -> object:
            try:
                await limiter.acquire("addr")
                return "ok"
            except RateLimited as exc:
                return exc.retry_after

        try:
            return [await outcome() for _ in range(4)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario("redis")) == asyncio.run(scenario("memory")) == ["ok", "ok", 1, 1]


def test_auth_failure_settings_are_validated() -> None:
    defaults = gateway_settings("redis://127.0.0.1:6379/0", "x")
    assert (defaults.auth_failures_per_minute, defaults.auth_failure_burst) == (10, 10)
    with pytest.raises(ValueError, match="auth_failure_burst"):
        guarded("redis://127.0.0.1:6379/0", "x", burst=0)
    with pytest.raises(ValueError, match="auth_failures_per_minute"):
        guarded("redis://127.0.0.1:6379/0", "x", per_minute=-1)
    assert defaults.forwarded_allow_ips == []
    with pytest.raises(ValueError, match="CIDR networks"):
        guarded("redis://127.0.0.1:6379/0", "x", forwarded_allow_ips="10.0.0.0/8, ingress-nginx")
