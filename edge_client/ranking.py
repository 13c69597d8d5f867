"""Neighbour-rank transform: code indices -> small integers that entropy-code well, and back.

Neighbouring image patches usually pick nearby codewords, but a static frequency table cannot see
that. So before rANS each index is replaced by its *rank*: how many codewords lie closer than the
chosen one to a prediction made from the already-coded neighbour,

    prediction(t) = codeword(index of neighbour(t)) + offset(t)      (offset alone if no neighbour)
    rank(t)       = #{j : d(j) < d(chosen)} + #{j < chosen : d(j) = d(chosen)}

with d the squared distance to the prediction. A background patch next to background gets rank
0..3 instead of a near-uniform 12-bit index. Each (group, stage) is predicted from the same
(group, stage) of the neighbour; ``offset`` is a per-position calibrated shift (position
embeddings move every token a little).

Edge and cloud must compute bit-identical ranks, or the cloud silently decodes other indices. So
the ranking geometry is integer: ``books`` and ``offsets`` are int16 tensors shipped in the edge
bundle (a scaled, rounded copy of the codebooks; they only order codewords and never reconstruct
features). Distances are then integers below 2**40, computed in float64, where every partial sum
is exact whatever order a BLAS sums in.

Neighbours: with a class token plus a square patch grid (every CLIP geometry), token 0 and the
first patch have none, a patch's neighbour is the one to its left, and a row's first patch takes
the one above. Other token counts chain each token to the previous one.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NeighbourRanks", "neighbours"]


def neighbours(tokens: int) -> np.ndarray:
    """``(tokens,)`` int64: the token each one is predicted from, -1 for none."""
    grid = math.isqrt(max(tokens - 1, 0))
    prev = np.arange(tokens, dtype=np.int64) - 1
    if tokens > 1 and grid * grid == tokens - 1:
        patch = np.arange(tokens - 1)
        prev[1:] = np.where(patch % grid > 0, patch, patch + 1 - grid)  # token ids: patch p is token p + 1
        prev[0] = prev[1] = -1
    else:
        prev[0] = -1
    return prev


def _levels(prev: np.ndarray) -> list[np.ndarray]:
    """Tokens grouped so that every token's neighbour lies in an earlier group (decode order)."""
    depth = np.zeros(len(prev), dtype=np.int64)
    for t in range(len(prev)):  # neighbours always precede a token, so one pass suffices
        depth[t] = depth[prev[t]] + 1 if prev[t] >= 0 else 0
    return [np.flatnonzero(depth == level) for level in range(int(depth.max()) + 1)] if len(prev) else []


class NeighbourRanks:
    """The rank transform for one quantizer geometry.

    ``books`` ``(G, S, K, d)`` and ``offsets`` ``(T, G, S, d)`` are int16; indices and ranks are
    ``(T, G, S)`` arrays.
    """

    def __init__(self, books: np.ndarray, offsets: np.ndarray) -> None:
        books, offsets = np.asarray(books), np.asarray(offsets)
        if books.dtype != np.int16 or books.ndim != 4:
            raise ValueError(f"expected int16 rank books (G, S, K, d), got {books.dtype} {books.shape}")
        groups, stages, _, dim = books.shape
        if offsets.dtype != np.int16 or offsets.ndim != 4 or offsets.shape[1:] != (groups, stages, dim):
            raise ValueError(
                f"expected int16 rank offsets (T, {groups}, {stages}, {dim}), "
                f"got {offsets.dtype} {offsets.shape}"
            )
        self.books = books.astype(np.float64)
        self.offsets = offsets.astype(np.float64)
        self.norms = (self.books * self.books).sum(-1)  # (G, S, K), exact integers
        self.prev = neighbours(offsets.shape[0])
        self.levels = _levels(self.prev)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(tokens, groups, stages)`` of the index arrays it transforms."""
        return (self.offsets.shape[0], *self.books.shape[:2])

    def _keys(self, tokens: np.ndarray, before: np.ndarray, g: int, s: int) -> np.ndarray:
        """Sort keys ``(len(tokens), K)`` int64, unique per row: distance * K + index.

        Distance = squared distance to the prediction minus |prediction|^2 (the same for every
        codeword), an exact integer below 2**40; times K <= 2**16 plus the index stays below 2**63, so
        comparing keys compares (distance, index) pairs, ties broken by index.
        """
        book = self.books[g, s]
        has = self.prev[tokens] >= 0
        pred = self.offsets[tokens, g, s].copy()
        pred[has] += book[before[self.prev[tokens][has]]]
        dist = (self.norms[g, s] - 2.0 * (pred @ book.T)).astype(np.int64)
        return dist * book.shape[0] + np.arange(book.shape[0])

    def _check(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != self.shape or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"expected integer {what} of shape {self.shape}, got {array.dtype} {array.shape}"
            )
        size = self.books.shape[2]
        if array.size and (array.min() < 0 or array.max() >= size):
            raise ValueError(f"expected {what} in [0, {size}), got {array.min()}..{array.max()}")
        return array.astype(np.int64)

    def ranks(self, indices: np.ndarray) -> np.ndarray:
        """Indices ``(T, G, S)`` -> ranks ``(T, G, S)`` int64 (the edge side; no loop over tokens)."""
        indices = self._check(indices, "indices")
        out = np.empty_like(indices)
        every = np.arange(indices.shape[0])
        for g in range(indices.shape[1]):
            for s in range(indices.shape[2]):
                keys = self._keys(every, indices[:, g, s], g, s)
                out[:, g, s] = (keys < keys[every, indices[:, g, s]][:, None]).sum(1)
        return out

    def indices(self, ranks: np.ndarray) -> np.ndarray:
        """Ranks ``(T, G, S)`` -> indices ``(T, G, S)`` uint16 (the cloud side; one step per level).

        Keys are unique, so the codeword of rank r is the one ``argpartition`` puts at position r:
        linear time per token, no sort.
        """
        ranks = self._check(ranks, "ranks")
        out = np.zeros_like(ranks)
        for g in range(ranks.shape[1]):
            for s in range(ranks.shape[2]):
                for tokens in self.levels:
                    keys = self._keys(tokens, out[:, g, s], g, s)
                    for row, (token, rank) in enumerate(zip(tokens, ranks[tokens, g, s], strict=True)):
                        out[token, g, s] = np.argpartition(keys[row], rank)[rank]
        return out.astype(np.uint16)
