"""Rate-distortion optimised choice of code indices for neighbour-ranked streams.

The nearest codeword is the best reconstruction, but in a ranked stream (``edge_client.ranking``)
it may cost 12 bits where a codeword almost as close to the feature, and close to what the
neighbours predict, costs 2. So, as video encoders do, the edge picks for every index

    argmin over candidates c of   |z - c|^2 + lambda * bits(rank(c))

with ``bits`` the code length of the rank in the stream's own rANS table (``-log2 f/2**24``) and
``lambda`` the quantizer's ``rate_lambda`` (0: plain nearest search). The candidates are the
nearest codeword, the :data:`LOW_RANKS` codewords of lowest rank (the cheap ones) and, in a gated
refinement stage, code 0 ("no refinement"); a stage's residual within ``refine_threshold`` still
sends code 0 outright. Only the encoder changes: the cloud decodes whatever ranks arrive, so old
and new edges talk to the same workers.

Tokens are chosen in the rank transform's decode order (one anti-diagonal of the patch grid at a
time: their left and upper neighbours are already chosen, so every candidate's rank is exact) and
all images of a batch at once. Per level that is two GEMMs over the codebook, one
``argpartition`` per row, and no Python loop over tokens or images. Deterministic: edge (numpy)
and cloud evaluation (torch, through this module) choose the same indices up to float summation
order in the projection, as for the nearest search; unlike there, a choice flipped by rounding
can move the ranks, and so the choices, of the tokens after it (measured on the bundled model:
100 % agreement).
"""

from __future__ import annotations

import numpy as np

from .ranking import NeighbourRanks

__all__ = ["LOW_RANKS", "code_lengths", "rdo_search"]

LOW_RANKS = 64  # cheapest codewords considered per index (besides the nearest one and code 0)
_IMAGES_PER_CHUNK = 64  # bounds the (images x tokens of one level, K) int64 keys: 48 MiB at 577 x 4096


def code_lengths(freqs: np.ndarray) -> np.ndarray:
    """Bits each symbol costs under a normalised rANS table ``(G, S, K)`` uint32 (rows sum to 2**24)."""
    return -np.log2(np.asarray(freqs, dtype=np.float64) / float(1 << 24))


def rdo_search(
    z: np.ndarray,
    books: np.ndarray,
    ranking: NeighbourRanks,
    lengths: np.ndarray,
    rate_lambda: float,
    refine_threshold: float = 0.0,
) -> np.ndarray:
    """Projected features ``z`` ``(N, T, G, d)`` float32 -> indices ``(N, T, G, S)`` uint16.

    ``books`` ``(G, S, K, d)`` float32 are the codebooks as the cloud sums them (pinned codewords
    zero), ``lengths`` ``(G, S, K)`` the code length of each rank (:func:`code_lengths`).
    """
    if not np.isfinite(lengths).all():
        raise ValueError("expected finite code lengths (from a normalised table: every entry >= 1)")
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 4 or z.shape[1] != ranking.shape[0] or z.shape[2:] != (books.shape[0], books.shape[3]):
        raise ValueError(
            f"expected features (N, {ranking.shape[0]}, {books.shape[0]}, {books.shape[3]}), got {z.shape}"
        )
    out = np.empty((*z.shape[:3], books.shape[1]), dtype=np.uint16)
    for start in range(0, z.shape[0], _IMAGES_PER_CHUNK):
        part = slice(start, start + _IMAGES_PER_CHUNK)
        out[part] = _search_chunk(z[part], books, ranking, lengths, rate_lambda, refine_threshold)
    return out


def _search_chunk(
    z: np.ndarray,
    books: np.ndarray,
    ranking: NeighbourRanks,
    lengths: np.ndarray,
    rate_lambda: float,
    refine_threshold: float,
) -> np.ndarray:
    images, _, groups, dim = z.shape
    stages, size = books.shape[1:3]
    chosen = np.zeros((*z.shape[:3], stages), dtype=np.int64)
    low = min(LOW_RANKS, size)
    books_m2t = np.float32(-2.0) * books.transpose(0, 1, 3, 2)  # (G, S, d, K)
    norms = (books * books).sum(-1)  # (G, S, K)
    for g in range(groups):
        for tokens in ranking.levels:
            residual = z[:, tokens, g].reshape(-1, dim)  # (images * n, d), image-major
            for s in range(stages):
                pick = np.zeros(len(residual), dtype=np.int64)
                gated = bool(s and refine_threshold)
                # Within the threshold a gated stage sends code 0 outright: only the rest are priced.
                live = (
                    np.einsum("rd,rd->r", residual, residual) > refine_threshold
                    if gated
                    else np.ones(len(residual), dtype=bool)
                )
                if live.any():
                    pred = ranking.twice_predictions(tokens, chosen[..., g, s], g, s).reshape(-1, dim)
                    keys = ranking.keys(ranking.distances(pred[live], g, s))  # (m, K), unique per row
                    # |r - c|^2 less the row's constant |r|^2: enough to compare codewords.
                    dist = residual[live] @ books_m2t[g, s]
                    dist += norms[g, s]
                    cheapest = np.argpartition(keys, low - 1, axis=-1)[:, :low]
                    candidates = np.concatenate(
                        [dist.argmin(-1)[:, None], cheapest]
                        + ([np.zeros_like(cheapest[:, :1])] if gated else []),
                        axis=-1,
                    )
                    ranks = _ranks(keys, np.take_along_axis(keys, candidates, -1), cheapest)
                    cost = np.take_along_axis(dist, candidates, -1) + rate_lambda * lengths[g, s][ranks]
                    pick[live] = np.take_along_axis(candidates, cost.argmin(-1)[:, None], -1)[:, 0]
                chosen[:, tokens, g, s] = pick.reshape(images, -1)
                residual = residual - books[g, s][pick]
    return chosen.astype(np.uint16)


def _ranks(keys: np.ndarray, mine: np.ndarray, cheapest: np.ndarray) -> np.ndarray:
    """Exact ranks of the candidates' keys ``mine`` ``(m, C)`` in rows of ``keys`` ``(m, K)``: a key
    within the row's ``cheapest`` (the lowest keys) ranks among them; the others (a far nearest
    codeword, code 0) are counted over the whole row."""
    low_keys = np.sort(np.take_along_axis(keys, cheapest, -1), axis=-1)  # (m, L)
    inside = mine <= low_keys[:, -1:]
    ranks: np.ndarray = (low_keys[:, None, :] < mine[:, :, None]).sum(-1)
    rows, cols = np.nonzero(~inside)
    ranks[rows, cols] = (keys[rows] < mine[rows, cols][:, None]).sum(-1)
    return ranks
