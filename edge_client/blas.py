"""How many BLAS threads an encode may use: one by default.

The edge half's matrices are small. A BLAS pool sized to the cores helps an idle desktop a little
and hurts a busy phone or camera a lot: its threads spin and wait for cores that other work holds
(the under-load rows of benchmarks/results/edge_cost.json). The cap applies to the calls inside
the ``with`` block only, so a host application's own numpy work keeps its settings.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import cache
from typing import Any

from threadpoolctl import ThreadpoolController

__all__ = ["limit_blas"]


@cache
def _controller() -> ThreadpoolController:
    # Built on first use, after numpy has loaded its BLAS; scanning the loaded libraries once keeps
    # each later limit() at microseconds.
    return ThreadpoolController()


def limit_blas(threads: int = 1) -> AbstractContextManager[Any]:
    """A context in which BLAS (OpenBLAS, MKL, BLIS) uses at most ``threads`` threads."""
    if threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    return _controller().limit(limits=threads, user_api="blas")  # type: ignore[no-any-return]
