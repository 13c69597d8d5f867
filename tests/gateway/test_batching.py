"""Dynamic batching: fill up to max_batch, wait at most max_wait_ms, notice a stop request."""

from __future__ import annotations

import threading
import time

from gateway.worker.batching import collect_batch, split_expired


class Source:
    """A fake blocking read: ``arrivals`` are (seconds from start, item)."""

    def __init__(self, arrivals: list[tuple[float, int]]) -> None:
        self.start = time.monotonic()
        self.pending = list(arrivals)
        self.calls: list[tuple[int, int]] = []

    def read(self, count: int, block_ms: int) -> list[int]:
        self.calls.append((count, block_ms))
        deadline = time.monotonic() + block_ms / 1000
        while True:
            now = time.monotonic() - self.start
            ready = [item for at, item in self.pending if at <= now][:count]
            if ready or time.monotonic() >= deadline:
                self.pending = [(at, item) for at, item in self.pending if item not in ready]
                return ready
            time.sleep(0.001)


def test_full_batch_goes_without_waiting() -> None:
    source = Source([(0, i) for i in range(8)])
    start = time.monotonic()
    assert collect_batch(source.read, 4, 1000, 100) == [0, 1, 2, 3]
    assert time.monotonic() - start < 0.5


def test_waits_at_most_max_wait_for_company() -> None:
    source = Source([(0, 1), (0.03, 2), (5, 3)])
    start = time.monotonic()
    assert collect_batch(source.read, 4, 150, 100) == [1, 2]
    assert 0.12 < time.monotonic() - start < 1.0
    assert all(count <= 3 for count, _ in source.calls[1:])  # never asks for more than fits


def test_nothing_arrives_within_poll() -> None:
    source = Source([(5, 1)])
    start = time.monotonic()
    assert collect_batch(source.read, 4, 1000, 50) == []
    assert time.monotonic() - start < 0.5


def test_claimed_entries_come_first_and_zero_wait_returns_at_once() -> None:
    source = Source([(0, 7)])
    assert collect_batch(source.read, 4, 0, 100, first=[5, 6]) == [5, 6]
    assert source.calls == []


def test_stop_cuts_the_wait_short() -> None:
    source = Source([(0, 1)])
    stop = threading.Event()
    stop.set()
    start = time.monotonic()
    assert collect_batch(source.read, 4, 5000, 100, stop=stop) == [1]
    assert time.monotonic() - start < 0.5


def test_stop_during_the_wait_is_noticed_within_poll() -> None:
    source = Source([(0, 1)])
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    start = time.monotonic()
    assert collect_batch(source.read, 4, 10_000, 50, stop=stop) == [1]
    assert time.monotonic() - start < 1.0
    assert max(block for _, block in source.calls) <= 50


def test_split_expired() -> None:
    live, expired = split_expired([3, 10, 5, 20], lambda d: d, now_ms=5)
    assert live == [10, 20] and expired == [3, 5]


def test_filling_reads_never_block_so_redis_tick_granularity_cannot_stretch_the_wait() -> None:
    source = Source([(0, 1)])
    start = time.monotonic()
    assert collect_batch(source.read, 16, 10, 500) == [1]
    assert time.monotonic() - start < 0.08  # a blocking Redis read would end on the 100 ms hz tick
    assert [block for _, block in source.calls[1:]] == [0] * (len(source.calls) - 1)
