"""The request queue between the HTTP API and the model workers: Redis streams, or in-process.

See :mod:`gateway.queue.keys` for every key, TTL and status, :mod:`gateway.queue.base` for the
interface both implementations share.
"""

from .base import (
    Claimed,
    GatewayQueue,
    Job,
    PartialEntry,
    Reply,
    Standing,
    Ticket,
    WorkerQueue,
    entry_key,
    now_ms,
)
from .keys import GROUP, Keys, Status
from .memory import MemoryQueue, MemoryWorkerQueue
from .redis_queue import RedisGatewayQueue, RedisWorkerQueue, redis_errors

__all__ = [
    "GROUP",
    "Claimed",
    "GatewayQueue",
    "Job",
    "Keys",
    "MemoryQueue",
    "MemoryWorkerQueue",
    "PartialEntry",
    "RedisGatewayQueue",
    "RedisWorkerQueue",
    "Reply",
    "Standing",
    "Status",
    "Ticket",
    "WorkerQueue",
    "entry_key",
    "now_ms",
    "redis_errors",
]
