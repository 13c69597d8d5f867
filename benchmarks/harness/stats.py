"""Percentiles and wall-clock timing, one definition for every script."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values (JSON null)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def dist(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 / mean rounded to 0.01 (a latency column); nulls for no values."""
    out = {f"p{q}": rounded(percentile(values, q), 2) for q in (50, 95, 99)}
    return out | {"mean": round(statistics.fmean(values), 2) if values else None}


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds of ``repeats`` calls after one untimed warm-up call; ``sync`` (a CUDA
    synchronise) runs before each clock read so queued device work is counted."""

    def once() -> float:
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return (time.perf_counter() - start) * 1e3

    once()
    return [once() for _ in range(repeats)]
