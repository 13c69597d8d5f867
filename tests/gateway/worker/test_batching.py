"""Dynamic batching: fill up to max_batch, wait at most max_wait_ms, notice a stop request.

Time is virtual: the batching module's clock and sleep are replaced by :class:`Clock`, and the fake
queue read advances the same clock while it "blocks", so every wait is asserted exactly and no test
depends on how busy the machine is.
"""

from __future__ import annotations

import threading

import pytest

from gateway.worker import batching
from gateway.worker.batching import collect_batch, split_expired


class Clock:
    """Virtual seconds; ``at`` runs callbacks once the clock passes their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, threading.Event]] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when, event in self.timers:
            if self.now >= when:
                event.set()


class Source:
    """A blocking read on the virtual clock: ``arrivals`` are (seconds from start, item)."""

    def __init__(self, clock: Clock, arrivals: list[tuple[float, int]]) -> None:
        self.clock = clock
        self.pending = list(arrivals)
        self.calls: list[tuple[int, int]] = []

    def read(self, count: int, block_ms: int) -> list[int]:
        self.calls.append((count, block_ms))
        ready = [item for at, item in self.pending if at <= self.clock.now][:count]
        if not ready and block_ms:
            later = [at for at, _ in self.pending if at <= self.clock.now + block_ms / 1000]
            self.clock.sleep((min(later) if later else self.clock.now + block_ms / 1000) - self.clock.now)
            ready = [item for at, item in self.pending if at <= self.clock.now][:count]
        self.pending = [(at, item) for at, item in self.pending if item not in ready]
        return ready


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(batching, "time", fake)
    return fake


def test_full_batch_goes_without_waiting(clock: Clock) -> None:
    source = Source(clock, [(0, i) for i in range(8)])
    assert collect_batch(source.read, 4, 1000, 100) == [0, 1, 2, 3]
    assert clock.now == 0 and source.calls == [(4, 100)]


def test_waits_at_most_max_wait_for_company(clock: Clock) -> None:
    source = Source(clock, [(0, 1), (0.03, 2), (5, 3)])
    assert collect_batch(source.read, 4, 150, 100) == [1, 2]
    assert 0.149 <= clock.now <= 0.151
    assert all(count <= 3 for count, _ in source.calls[1:])  # never asks for more than fits


def test_nothing_arrives_within_poll(clock: Clock) -> None:
    source = Source(clock, [(5, 1)])
    assert collect_batch(source.read, 4, 1000, 50) == []
    assert clock.now == pytest.approx(0.05) and source.calls == [(4, 50)]


def test_claimed_entries_come_first_and_zero_wait_returns_at_once(clock: Clock) -> None:
    source = Source(clock, [(0, 7)])
    assert collect_batch(source.read, 4, 0, 100, first=[5, 6]) == [5, 6]
    assert source.calls == []


def test_stop_cuts_the_wait_short(clock: Clock) -> None:
    source = Source(clock, [(0, 1)])
    stop = threading.Event()
    stop.set()
    assert collect_batch(source.read, 4, 5000, 100, stop=stop) == [1]
    assert clock.now == 0


def test_stop_during_the_wait_is_noticed_within_poll(clock: Clock) -> None:
    source = Source(clock, [(0, 1)])
    stop = threading.Event()
    clock.timers.append((0.1, stop))
    assert collect_batch(source.read, 4, 10_000, 50, stop=stop) == [1]
    assert 0.1 <= clock.now <= 0.1 + batching.FILL_POLL_S + 1e-9
    assert max(block for _, block in source.calls) <= 50


def test_split_expired() -> None:
    live, expired = split_expired([3, 10, 5, 20], lambda d: d, now_ms=5)
    assert live == [10, 20] and expired == [3, 5]


def test_filling_reads_never_block_so_redis_tick_granularity_cannot_stretch_the_wait(clock: Clock) -> None:
    # A blocking Redis read would end on the 100 ms hz tick: while filling, every read is non-blocking.
    source = Source(clock, [(0, 1)])
    assert collect_batch(source.read, 16, 10, 500) == [1]
    assert 0.009 <= clock.now <= 0.011
    assert [block for _, block in source.calls[1:]] == [0] * (len(source.calls) - 1)
