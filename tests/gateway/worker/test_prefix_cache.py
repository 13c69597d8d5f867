"""The prefix cache: an LRU bounded by bytes."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.worker.prefix_cache import PrefixCache


@dataclass(frozen=True)
class Entry:
    nbytes: int


def test_least_recently_used_entries_go_first_and_the_budget_holds() -> None:
    cache: PrefixCache[Entry] = PrefixCache(100)
    a, b, c = Entry(40), Entry(40), Entry(30)
    cache.put(b"a", a)
    cache.put(b"b", b)
    assert cache.get(b"a") is a  # now b is the least recently used
    cache.put(b"c", c)
    assert b"b" not in cache and cache.get(b"a") is a and cache.get(b"c") is c
    assert cache.nbytes == 70 and len(cache) == 2
    cache.put(b"d", Entry(100))  # fits only alone
    assert [key for key in (b"a", b"b", b"c", b"d") if key in cache] == [b"d"] and cache.nbytes == 100
    assert (cache.hits, cache.misses) == (3, 0)
    assert cache.get(b"a") is None and cache.misses == 1


def test_replacing_an_entry_counts_its_bytes_once_and_oversized_entries_are_not_kept() -> None:
    cache: PrefixCache[Entry] = PrefixCache(100)
    cache.put(b"a", Entry(60))
    cache.put(b"a", Entry(50))
    assert cache.nbytes == 50 and len(cache) == 1
    cache.put(b"big", Entry(101))
    assert b"big" not in cache and b"a" in cache
    cache.clear()
    assert cache.nbytes == 0 and not len(cache)


def test_a_zero_budget_keeps_nothing() -> None:
    cache: PrefixCache[Entry] = PrefixCache(0)
    cache.put(b"a", Entry(1))
    assert cache.get(b"a") is None and not len(cache)
