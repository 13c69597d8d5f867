"""The per-key image cache: a byte cap per tenant with least-recently-used eviction, a TTL that
each use restarts, tenants that never see each other's streams; in Redis (Lua) and in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gateway.api.image_cache import ImageCache, MemoryImageCache, RedisImageCache
from gateway.queue import Keys

STREAM = 100  # bytes per stream below
CAP = 3 * STREAM
Scenario = Callable[[Callable[..., ImageCache]], Awaitable[None]]


def ref(i: int) -> bytes:
    return bytes([i]) * 16


def stream(i: int, size: int = STREAM) -> bytes:
    return bytes([i]) * size


@pytest.fixture(params=["redis", "memory"])
def run(request, redis_url, prefix) -> Callable[[Scenario], None]:
    """Runs a scenario with a cache factory of one kind, closing the Redis clients it made."""

    def run_(scenario: Scenario) -> None:
        async def main() -> None:
            clients: list[aioredis.Redis] = []

            def make(ttl_s: int = 60, cap: int = CAP) -> ImageCache:
                if request.param == "memory":
                    return MemoryImageCache(ttl_s, cap)
                clients.append(aioredis.Redis.from_url(redis_url))
                return RedisImageCache(clients[-1], Keys(prefix), ttl_s, cap)

            try:
                await scenario(make)
            finally:
                for client in clients:
                    await client.aclose()

        asyncio.run(main())

    return run_


def test_each_tenant_keeps_at_most_its_bytes_least_recently_used_first(run) -> None:
    async def scenario(make: Callable[..., ImageCache]) -> None:
        cache = make()
        for i in range(3):
            assert await cache.put("key:a", ref(i), stream(i))
        assert await cache.get("key:a", ref(0)) == stream(0)  # 0 is now the most recently used
        assert await cache.put("key:a", ref(3), stream(3))  # over the cap: 1 goes
        assert [await cache.get("key:a", ref(i)) is not None for i in range(4)] == [True, False, True, True]
        assert await cache.put("key:a", ref(3), stream(3))  # the same stream again: nothing more goes
        assert await cache.get("key:a", ref(2)) == stream(2)
        assert await cache.put("key:a", ref(9), stream(9, 2 * STREAM))  # a larger one: two go
        assert [await cache.get("key:a", ref(i)) is not None for i in (0, 2, 3, 9)] == [
            False,
            True,
            False,
            True,
        ]

    run(scenario)


def test_tenants_are_apart_and_a_stream_over_the_cap_is_not_kept(run) -> None:
    async def scenario(make: Callable[..., ImageCache]) -> None:
        cache = make()
        assert await cache.put("key:a", ref(1), stream(1))
        assert await cache.get("key:b", ref(1)) is None
        for i in range(5):  # b fills its own cap; a keeps its stream
            await cache.put("key:b", ref(i), stream(i))
        assert await cache.get("key:a", ref(1)) == stream(1)
        assert not await cache.put("key:a", ref(7), stream(7, CAP + 1))
        assert await cache.get("key:a", ref(7)) is None and await cache.get("key:a", ref(1)) == stream(1)

    run(scenario)


def test_a_stream_expires_unless_used_and_its_bytes_come_back(run) -> None:
    async def scenario(make: Callable[..., ImageCache]) -> None:
        cache = make(ttl_s=1)
        await cache.put("key:a", ref(1), stream(1))
        await cache.put("key:a", ref(2), stream(2))
        for _ in range(3):
            await asyncio.sleep(0.5)
            assert await cache.get("key:a", ref(1)) == stream(1)  # each use restarts its TTL
        assert await cache.get("key:a", ref(2)) is None  # unused: gone
        await asyncio.sleep(1.1)
        assert await cache.get("key:a", ref(1)) is None
        for i in range(3):  # the expired streams no longer count against the cap
            await cache.put("key:a", ref(10 + i), stream(10 + i))
        assert all([await cache.get("key:a", ref(10 + i)) for i in range(3)])

    run(scenario)
