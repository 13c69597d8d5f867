"""Neighbour-rank transform: code indices -> small integers that entropy-code well, and back.

Neighbouring image patches usually pick nearby codewords, but a static frequency table cannot see
that. So before rANS each index is replaced by its *rank*: how many codewords lie closer than the
chosen one to a prediction made from already-coded neighbours (left and above),

    prediction(t) = mean of the neighbours' codewords + offset(t)   (offset alone without neighbours)
    rank(t)       = #{j : d(j) < d(chosen)} + #{j < chosen : d(j) = d(chosen)}

with d the squared distance to the prediction. A background patch among background gets rank
0..3 instead of a near-uniform 12-bit index. Each (group, stage) is predicted from the same
(group, stage) of its neighbours; ``offset`` is a per-position calibrated shift (position
embeddings move every token a little).

Edge and cloud must compute bit-identical ranks, or the cloud silently decodes other indices. So
the ranking geometry is small integers: ``books`` (|value| <= B) and ``offsets`` (twice the shift,
|value| <= 2B) are int16 tensors shipped in the edge bundle (a scaled, rounded copy of the
codebooks; they only order codewords and never reconstruct features). Distances are taken as
``|c|^2 - c.s`` with ``s`` = twice the prediction (left + above, or twice the one neighbour, plus
the offset, so |s| <= 4B): with ``B = max_book(d) = isqrt(2**24 // (5 d))`` (323 for code_dim 32)
every product, partial sum and distance is an integer below 2**24, exact in float32 whatever
order a BLAS sums in, so the edge ranks 577 tokens with one single-precision GEMM.

Neighbours: with a class token plus a square patch grid (every CLIP geometry) a patch's neighbours
are the patches to its left and above; the class token and the first patch have none. Other token
counts chain each token to the previous one.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NeighbourRanks", "max_book", "neighbour_weights", "neighbours", "twice_base"]


def max_book(dim: int) -> int:
    """Largest |value| of an integer codebook of ``dim`` dims whose distances stay exact in float32."""
    return math.isqrt((1 << 24) // (5 * dim))


def neighbours(tokens: int) -> np.ndarray:
    """``(tokens, 2)`` int64: the tokens each one is predicted from (left, above), -1 for none."""
    grid = math.isqrt(max(tokens - 1, 0))
    out = np.full((tokens, 2), -1, dtype=np.int64)
    if tokens > 1 and grid * grid == tokens - 1:
        patch = np.arange(tokens - 1)  # patch p is token p + 1
        out[1:, 0] = np.where(patch % grid > 0, patch, -1)
        out[1:, 1] = np.where(patch >= grid, patch + 1 - grid, -1)
    else:
        out[1:, 0] = np.arange(tokens - 1)
    return out


def neighbour_weights(nbrs: np.ndarray) -> np.ndarray:
    """``(n, 2)`` int64 weights of each token's (left, above) neighbour in twice its prediction:
    1 and 1 for two, 2 for the only one, 0 for none (rows of :func:`neighbours`)."""
    has = nbrs >= 0
    weight: np.ndarray = np.where(has.sum(1, keepdims=True) == 1, 2, 1) * has
    return weight


def twice_base(vectors: np.ndarray, nbrs: np.ndarray) -> np.ndarray:
    """Twice the mean of the neighbour vectors of some tokens: ``vectors`` ``(..., T, d)`` of every
    token and those tokens' ``nbrs`` ``(n, 2)`` (rows of :func:`neighbours`) -> ``(..., n, d)``.

    Left + above, or twice the only neighbour, or zero: an integer when the vectors are.
    """
    picked = vectors[..., np.maximum(nbrs, 0), :]  # (..., n, 2, d)
    summed: np.ndarray = (picked * neighbour_weights(nbrs)[..., None].astype(vectors.dtype)).sum(-2)
    return summed


def _levels(nbrs: np.ndarray) -> list[np.ndarray]:
    """Tokens grouped so that every token's neighbours lie in earlier groups (decode order)."""
    depth = np.zeros(len(nbrs), dtype=np.int64)
    for t in range(len(nbrs)):  # neighbours always precede a token, so one pass suffices
        before = [depth[n] for n in nbrs[t] if n >= 0]
        depth[t] = max(before) + 1 if before else 0
    return [np.flatnonzero(depth == level) for level in range(int(depth.max()) + 1)] if len(nbrs) else []


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
        bound = max_book(dim)
        if np.abs(books).max() > bound or np.abs(offsets).max() > 2 * bound:
            raise ValueError(
                f"expected |books| <= {bound} and |offsets| <= {2 * bound} for code_dim {dim} (exact float32 "
                f"distances), got {np.abs(books).max()} and {np.abs(offsets).max()}"
            )
        self.books = books.astype(np.float32)
        self.offsets = offsets.astype(np.float32)
        self.norms = (self.books * self.books).sum(-1)  # (G, S, K), exact integers
        # -c^T per (group, stage), (G, S, d, K): one GEMM plus an in-place add gives the distances.
        self.books_mt = np.ascontiguousarray(-self.books.transpose(0, 1, 3, 2))
        self.nbrs = neighbours(offsets.shape[0])
        self.levels = _levels(self.nbrs)
        self._offset_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(tokens, groups, stages)`` of the index arrays it transforms."""
        return (self.offsets.shape[0], *self.books.shape[:2])

    def twice_predictions(self, tokens: np.ndarray, before: np.ndarray, g: int, s: int) -> np.ndarray:
        """``(..., len(tokens), d)`` float32 exact integers: twice each token's prediction (its
        neighbours' codewords summed, or twice the one, plus its offset). ``before`` ``(..., T)``
        holds the indices of the tokens already chosen (leading axes: several images at once)."""
        twice: np.ndarray = self.offsets[tokens, g, s] + twice_base(
            self.books[g, s][before], self.nbrs[tokens]
        )
        return twice

    def distances(self, twice_predictions: np.ndarray, g: int, s: int) -> np.ndarray:
        """``(..., K)`` float32 holding exact integers below 2**24: ``|c|^2 - c.p`` for every codeword
        c and twice-prediction p ``(..., d)`` (the squared distance, up to a factor and a constant
        per row)."""
        dist: np.ndarray = twice_predictions @ self.books_mt[g, s]
        dist += self.norms[g, s]
        return dist

    @staticmethod
    def keys(distances: np.ndarray) -> np.ndarray:
        """Sort keys ``(..., K)`` int64 of :meth:`distances`, unique per row: distance * K + index,
        so comparing keys compares (distance, index) pairs, ties broken by index, and a codeword's
        rank is the number of smaller keys in its row."""
        keys = distances.astype(np.int64)
        keys *= distances.shape[-1]
        keys += np.arange(distances.shape[-1])
        return keys

    def _decoder_keys(self, tokens: np.ndarray, before: np.ndarray, g: int, s: int) -> np.ndarray:
        """:meth:`keys` for some tokens of one image. Tokens whose neighbours all chose a zero
        codeword (a gated stage's "no refinement", most tokens) or have none predict their offset
        alone, and take their rows from a table computed once; only the rest are multiplied."""
        pred = self.twice_predictions(tokens, before, g, s)
        alone = (pred == self.offsets[tokens, g, s]).all(1)
        dist = np.empty((len(tokens), self.books.shape[2]), dtype=np.float32)
        dist[alone] = self._offset_rows(g, s)[tokens[alone]]
        if not alone.all():
            dist[~alone] = self.distances(pred[~alone], g, s)
        return self.keys(dist)

    def _offset_rows(self, g: int, s: int) -> np.ndarray:
        """``(T, K)``: every position's distances when its prediction is its offset alone (cached)."""
        if (g, s) not in self._offset_cache:
            self._offset_cache[g, s] = self.distances(self.offsets[:, g, s], g, s)
        return self._offset_cache[g, s]

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
        """Indices ``(T, G, S)`` -> ranks ``(T, G, S)`` int64 (the edge side; no loop over tokens).

        Counts strictly closer codewords; only the rare rows with a tied distance pay for the
        index tie-break.
        """
        indices = self._check(indices, "indices")
        out = np.empty_like(indices)
        every = np.arange(indices.shape[0])
        for g in range(indices.shape[1]):
            for s in range(indices.shape[2]):
                chosen = indices[:, g, s]
                dist = self.distances(self.twice_predictions(every, chosen, g, s), g, s)
                mine = dist[every, chosen][:, None]
                closer = np.count_nonzero(dist < mine, axis=1)
                tied = np.flatnonzero(np.count_nonzero(dist <= mine, axis=1) - closer > 1)
                for t in tied:
                    closer[t] += np.count_nonzero(dist[t, : chosen[t]] == mine[t])
                out[:, g, s] = closer
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
                    keys = self._decoder_keys(tokens, out[:, g, s], g, s)
                    for row, (token, rank) in enumerate(zip(tokens, ranks[tokens, g, s], strict=True)):
                        out[token, g, s] = np.argpartition(keys[row], rank)[rank]
        return out.astype(np.uint16)
