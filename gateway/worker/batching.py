"""Dynamic batching: gather up to ``max_batch`` entries, waiting at most ``max_wait_ms`` to fill.

Shared by the Redis worker and the in-process (memory) worker; ``read(count, block_ms)`` is the
queue's blocking read. Once something has arrived, the batch waits at most ``max_wait_ms`` more for
company; a batch that is already full, or ``max_wait_ms = 0``, goes without waiting. No single read
blocks longer than ``poll_ms``, so a stop request (SIGTERM) is noticed within that time even while
a batch is filling.

While a batch fills, reads do not block: Redis ends a timed-out ``XREADGROUP BLOCK`` only on its
``hz`` tick (100 ms at the default ``hz 10``; measured in benchmarks/results/serving_load_cpu.json),
so a 10 ms block would wait 100 ms. Non-blocking reads with 2 ms sleeps honour ``max_wait_ms``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["collect_batch", "split_expired"]

T = TypeVar("T")
FILL_POLL_S = 0.002  # sleep between non-blocking reads while a batch fills


def collect_batch(
    read: Callable[[int, int], list[T]],
    max_batch: int,
    max_wait_ms: int,
    poll_ms: int,
    *,
    first: Sequence[T] = (),
    stop: threading.Event | None = None,
) -> list[T]:
    """Up to ``max_batch`` items: ``first`` (e.g. claimed entries), then new ones from ``read``."""
    batch = list(first)[:max_batch]
    if not batch:
        batch = read(max_batch, max(1, poll_ms))
        if not batch:
            return []
    deadline = time.monotonic() + max_wait_ms / 1000
    while len(batch) < max_batch and not (stop is not None and stop.is_set()):
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms < 1:
            break
        more = read(max_batch - len(batch), 0)
        if more:
            batch += more
        else:
            time.sleep(min(FILL_POLL_S, remaining_ms / 1000))
    return batch


def split_expired(items: Sequence[T], deadline: Callable[[T], int], now_ms: int) -> tuple[list[T], list[T]]:
    """``(live, expired)``: items whose deadline (epoch ms) has passed are dropped before compute."""
    live: list[T] = []
    expired: list[T] = []
    for item in items:
        (expired if deadline(item) <= now_ms else live).append(item)
    return live, expired
