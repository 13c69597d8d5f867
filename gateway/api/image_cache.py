"""Feature streams kept per tenant, so a follow-up names one by ``image_ref`` instead of resending it.

docs/conversations.md ("Features sent once") is the contract. Every stream the gateway accepts is
stored under its ref (:func:`edge_client.protocol.image_ref`), scoped to the tenant that sent it:
the client id of :mod:`gateway.api.deps` (``key:<digest prefix>``, or ``ip:<address>`` when
anonymous), so a ref never resolves for another key and a refusal looks the same whether the ref
exists elsewhere or not. Each stream lives ``VQA_IMAGE_TTL_S`` after its last use; each tenant
keeps at most ``VQA_IMAGE_CACHE_BYTES``, least recently used first out.

:class:`RedisImageCache` keeps them in Redis (shared by every replica; the IMAGE_PUT and IMAGE_GET
scripts of :mod:`gateway.queue.scripts` update a stream, the tenant's LRU order and its byte total
in one step); :class:`MemoryImageCache` keeps the same structure in this process for
``VQA_QUEUE=memory``. The queue entry always carries the whole stream, so workers never read this.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

import redis.asyncio as aioredis

from ..queue import GatewayQueue, RedisGatewayQueue, redis_errors
from ..queue.keys import Keys
from ..queue.scripts import IMAGE_GET, IMAGE_PUT

__all__ = ["ImageCache", "MemoryImageCache", "RedisImageCache", "image_cache_for"]


class ImageCache(Protocol):
    async def put(self, tenant: str, ref: bytes, features: bytes) -> bool:
        """Keep ``features`` under ``ref`` for ``tenant``, evicting its least recently used streams;
        False if the stream alone is over the cap (nothing is kept)."""

    async def get(self, tenant: str, ref: bytes) -> bytes | None:
        """The stream, its lifetime restarted; None if this tenant holds no such ref."""


class RedisImageCache:
    """``{prefix}:img:{tenant}:{ref}`` per stream, ``imgs:{tenant}`` (LRU zset) and ``imgsize:{tenant}``."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_s: int, cap_bytes: int) -> None:
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        self.cap_bytes = cap_bytes
        self._put = client.register_script(IMAGE_PUT)
        self._get = client.register_script(IMAGE_GET)

    def _keys(self, tenant: str, ref: str) -> list[str]:
        return [self.keys.image(tenant, ref), self.keys.images(tenant), self.keys.image_sizes(tenant)]

    async def put(self, tenant: str, ref: bytes, features: bytes) -> bool:
        ref_hex = ref.hex()
        args: list[bytes | str | int] = [
            ref_hex,
            features,
            self.ttl_ms,
            self.cap_bytes,
            self.keys.image(tenant, ""),
        ]
        with redis_errors():
            evicted = await self._put(keys=self._keys(tenant, ref_hex), args=args)
        return int(evicted) >= 0

    async def get(self, tenant: str, ref: bytes) -> bytes | None:
        ref_hex = ref.hex()
        with redis_errors():
            data = await self._get(keys=self._keys(tenant, ref_hex), args=[ref_hex, self.ttl_ms])
        return data if isinstance(data, bytes) else None


class MemoryImageCache:
    """The same per-tenant LRU in this process (``VQA_QUEUE=memory``); used on the event loop only."""

    def __init__(self, ttl_s: int, cap_bytes: int) -> None:
        self.ttl_s = ttl_s
        self.cap_bytes = cap_bytes
        # tenant -> ref -> (expiry on the monotonic clock, stream), least recently used first
        self._tenants: dict[str, OrderedDict[bytes, tuple[float, bytes]]] = {}
        self._bytes: dict[str, int] = {}

    def _drop(self, tenant: str, streams: OrderedDict[bytes, tuple[float, bytes]], ref: bytes) -> None:
        entry = streams.pop(ref, None)
        if entry is not None:
            self._bytes[tenant] -= len(entry[1])

    async def put(self, tenant: str, ref: bytes, features: bytes) -> bool:
        now = time.monotonic()
        streams = self._tenants.setdefault(tenant, OrderedDict())
        self._bytes.setdefault(tenant, 0)
        # Least recently used first, and a use restarts the TTL: the expired ones lead.
        while streams and next(iter(streams.values()))[0] < now:
            self._drop(tenant, streams, next(iter(streams)))
        self._drop(tenant, streams, ref)
        kept = len(features) <= self.cap_bytes
        if kept:
            streams[ref] = (now + self.ttl_s, features)
            self._bytes[tenant] += len(features)
            while self._bytes[tenant] > self.cap_bytes:
                self._drop(tenant, streams, next(iter(streams)))
        if not streams:
            del self._tenants[tenant], self._bytes[tenant]
        return kept

    async def get(self, tenant: str, ref: bytes) -> bytes | None:
        streams = self._tenants.get(tenant)
        entry = streams.get(ref) if streams is not None else None
        if streams is None or entry is None:
            return None
        now = time.monotonic()
        if entry[0] < now:
            self._drop(tenant, streams, ref)
            return None
        streams[ref] = (now + self.ttl_s, entry[1])
        streams.move_to_end(ref)
        return entry[1]


def image_cache_for(queue: GatewayQueue, ttl_s: int, cap_bytes: int) -> ImageCache:
    """A cache held where ``queue`` keeps its state: Redis (shared by replicas) or this process."""
    if isinstance(queue, RedisGatewayQueue):
        return RedisImageCache(queue.client, queue.keys, ttl_s, cap_bytes)
    return MemoryImageCache(ttl_s, cap_bytes)
