"""The worker's prefix cache: keys and values of recent images' prompt prefixes, an LRU by bytes.

Every prompt about one image starts with the same tokens (BOS, template text, the image tokens),
so a follow-up question needs neither the vision tower, nor the projector, nor the prefix's
prefill again: the runner keeps their keys and values (:class:`models.generation.PrefixKV`) here,
keyed by the SHA-256 of the tenant and the request's payload (the feature stream; a cloud-only
request's image bytes): tenants never share an entry, so a hit's speed tells no one what another
tenant asked about. The cache holds at most ``VQA_PREFIX_CACHE_MB`` of them (0: off) in the model's device
memory. Generic over what it holds (anything with ``nbytes``), so this module needs no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

__all__ = ["PrefixCache"]


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=_Sized)


class PrefixCache(Generic[V]):
    """An LRU bounded by ``budget`` bytes; an entry larger than the whole budget is not kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> V | None:
        """The entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: V) -> None:
        """Keep ``entry``, evicting the least recently used ones until it fits."""
        if entry.nbytes > self.budget:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.nbytes -= previous.nbytes
        while self.nbytes + entry.nbytes > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
