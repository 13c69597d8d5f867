"""Rate-distortion optimised index choice: nearest at lambda 0, never worse than the nearest code in
its own objective, fewer bits as lambda grows, and streams that decode to exactly what was chosen."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.bitstream import StreamHeader, decode_stream, encode_stream, read_header
from edge_client.entropy import normalize_freqs
from edge_client.ranking import NeighbourRanks, max_book
from edge_client.rdo import LOW_RANKS, code_lengths, rdo_search

TOKENS, SIZE, DIM = 17, 96, 4  # class token + 4x4 grid; more codes than LOW_RANKS


def _geometry(seed: int, stages: int = 2):
    """Float codebooks, their integer rank copy, and a rank table that favours low ranks."""
    rng = np.random.default_rng(seed)
    books = rng.normal(size=(1, stages, SIZE, DIM)).astype(np.float32)
    books[:, 1:] *= 0.3
    books[:, 1:, 0] = 0  # a gated stage's pinned "no refinement" code
    peak = np.abs(books).max(axis=(-2, -1), keepdims=True)
    ints = np.round(books / peak * max_book(DIM)).astype(np.int16)
    ranking = NeighbourRanks(ints, np.zeros((TOKENS, 1, stages, DIM), np.int16))
    counts = np.stack([np.stack([(1000 / (1 + np.arange(SIZE)) ** 1.5).astype(np.int64)] * stages)])
    freqs = normalize_freqs(counts)
    return books, ranking, freqs


def _smooth_features(seed: int, images: int = 6) -> np.ndarray:
    """Patch features that drift slowly across the grid, plus noise: neighbours predict well."""
    rng = np.random.default_rng(seed)
    grid = np.cumsum(rng.normal(scale=0.3, size=(images, TOKENS, 1, DIM)), axis=1)
    return (grid + rng.normal(scale=0.2, size=grid.shape)).astype(np.float32)


def _nearest(z: np.ndarray, books: np.ndarray, threshold: float) -> np.ndarray:
    out = np.zeros((*z.shape[:3], books.shape[1]), dtype=np.int64)
    residual = z[:, :, 0].astype(np.float64)
    for s in range(books.shape[1]):
        dist = ((residual[..., None, :] - books[0, s]) ** 2).sum(-1)
        idx = dist.argmin(-1)
        if s and threshold:
            idx[(residual * residual).sum(-1) <= threshold] = 0
        out[:, :, 0, s] = idx
        residual = residual - books[0, s][idx]
    return out


def _bits(ranking: NeighbourRanks, freqs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Code length per image of ``indices`` ``(N, T, 1, S)`` as a ranked stream sends it."""
    lengths = code_lengths(freqs)
    ranks = np.stack([ranking.ranks(image) for image in indices])
    return lengths[0, np.arange(indices.shape[-1]), ranks].sum(axis=(1, 2, 3))


def _error(z: np.ndarray, books: np.ndarray, indices: np.ndarray) -> np.ndarray:
    approx = sum(books[0, s][indices[:, :, 0, s]] for s in range(books.shape[1]))
    return ((z[:, :, 0] - approx) ** 2).sum(-1)  # (N, T)


@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_lambda_zero_is_the_nearest_search(threshold: float) -> None:
    books, ranking, freqs = _geometry(0)
    z = _smooth_features(1)
    chosen = rdo_search(z, books, ranking, code_lengths(freqs), 0.0, threshold)
    assert chosen.dtype == np.uint16
    np.testing.assert_array_equal(chosen, _nearest(z, books, threshold))


def test_each_choice_is_no_worse_than_the_nearest_code_in_its_own_objective() -> None:
    books, ranking, freqs = _geometry(2, stages=1)
    lengths, lam = code_lengths(freqs), 0.5
    z = _smooth_features(3)
    chosen = rdo_search(z, books, ranking, lengths, lam).astype(np.int64)
    nearest = _nearest(z, books, 0.0)
    assert 0 < (chosen != nearest).mean() < 1  # some indices trade error for bits
    for image in range(z.shape[0]):
        for token in range(TOKENS):
            options = {}
            for name, code in (("chosen", chosen[image, token]), ("nearest", nearest[image, token])):
                trial = chosen[image].copy()
                trial[token] = code  # same neighbours: only this token's rank and error change
                rank = ranking.ranks(trial)[token, 0, 0]
                error = ((z[image, token, 0] - books[0, 0, code[0, 0]]) ** 2).sum()
                options[name] = error + lam * lengths[0, 0, rank]
            assert options["chosen"] <= options["nearest"] + 1e-4


def test_bits_fall_and_error_rises_as_lambda_grows() -> None:
    books, ranking, freqs = _geometry(4)
    z = _smooth_features(5, images=8)
    lengths = code_lengths(freqs)
    runs = [rdo_search(z, books, ranking, lengths, lam, 0.05) for lam in (0.0, 0.2, 2.0)]
    bits = [_bits(ranking, freqs, r.astype(np.int64)).sum() for r in runs]
    errors = [_error(z, books, r.astype(np.int64)).sum() for r in runs]
    assert bits[0] > bits[1] > bits[2]
    assert errors[0] < errors[1] < errors[2]


def _brute_force(z, books, ranking, lengths, lam, threshold) -> np.ndarray:
    """The definition, one index at a time: every codeword's exact rank from ``ranking.ranks`` with
    it in place, the same candidates (nearest, ranks below LOW_RANKS, code 0 if gated), least cost."""
    tokens, groups, _ = z.shape
    stages, size = books.shape[1:3]
    chosen = np.zeros((tokens, groups, stages), dtype=np.int64)
    for g in range(groups):
        for level in ranking.levels:
            for t in level:
                residual = z[t, g].astype(np.float64)
                for s in range(stages):
                    gated = bool(s and threshold)
                    code = 0
                    if not (gated and residual @ residual <= threshold):
                        ranks = np.empty(size, dtype=np.int64)
                        for k in range(size):
                            trial = chosen.copy()
                            trial[t, g, s] = k
                            ranks[k] = ranking.ranks(trial)[t, g, s]
                        error = ((residual - books[g, s]) ** 2).sum(-1)
                        options = (
                            set(np.flatnonzero(ranks < LOW_RANKS))
                            | {int(error.argmin())}
                            | ({0} if gated else set())
                        )
                        options = sorted(options)
                        code = options[
                            int(np.argmin([error[c] + lam * lengths[g, s, ranks[c]] for c in options]))
                        ]
                    chosen[t, g, s] = code
                    residual = residual - books[g, s, code]
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_groups_stages_and_tied_ranks_match_the_definition(threshold: float) -> None:
    """Two groups, three stages, a chain of 10 tokens, rank books in {-2..2} (many tied distances)
    and non-zero offsets: the batched search equals the one-index-at-a-time definition."""
    rng = np.random.default_rng(int(threshold * 100))
    tokens, groups, stages, size, dim = 10, 2, 3, 80, 3
    ints = rng.integers(-2, 3, (groups, stages, size, dim)).astype(np.int16)
    ranking = NeighbourRanks(ints, rng.integers(-2, 3, (tokens, groups, stages, dim)).astype(np.int16))
    books = ints / np.float32(2) + rng.normal(scale=0.01, size=ints.shape).astype(np.float32)
    books[:, 1:] *= 0.4
    if threshold:
        books[:, 1:, 0] = 0
    counts = rng.integers(0, 50, (groups, stages, size))
    counts[..., :8] += 500
    lengths = code_lengths(normalize_freqs(counts))
    z = np.cumsum(rng.normal(scale=0.3, size=(3, tokens, groups, dim)), axis=1).astype(np.float32)
    chosen = rdo_search(z, books, ranking, lengths, 0.7, threshold)
    for image in range(3):
        expected = _brute_force(z[image], books, ranking, lengths, 0.7, threshold)
        np.testing.assert_array_equal(chosen[image], expected)
        np.testing.assert_array_equal(
            rdo_search(z[image : image + 1], books, ranking, lengths, 0.7, threshold)[0], expected
        )


def test_rate_controlled_indices_decode_exactly_from_a_ranked_stream() -> None:
    books, ranking, freqs = _geometry(6)
    chosen = rdo_search(_smooth_features(7, images=3), books, ranking, code_lengths(freqs), 1.0, 0.05)
    header = StreamHeader(
        model="m",
        codebook_hash="0" * 64,
        split_site="preln",
        tokens=TOKENS,
        groups=1,
        stages=2,
        codebook_size=SIZE,
    )
    for indices in chosen:
        stream = encode_stream(header, indices, None, freqs=freqs, ranking=ranking, entropy=True)
        assert read_header(stream).coder == "ranked"
        np.testing.assert_array_equal(decode_stream(stream, freqs, ranking).indices, indices)


def test_small_codebooks_rank_every_codeword_and_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(8)
    books = rng.normal(size=(1, 1, 8, DIM)).astype(np.float32)  # fewer codes than LOW_RANKS
    assert books.shape[2] < LOW_RANKS
    ints = np.round(books / np.abs(books).max() * max_book(DIM)).astype(np.int16)
    ranking = NeighbourRanks(ints, np.zeros((TOKENS, 1, 1, DIM), np.int16))
    lengths = code_lengths(normalize_freqs(np.arange(8, 0, -1).reshape(1, 1, 8)))
    z = _smooth_features(9)
    assert rdo_search(z, books, ranking, lengths, 0.3).max() < 8
    with pytest.raises(ValueError, match="expected features"):
        rdo_search(z[:, :5], books, ranking, lengths, 0.3)
    infinite = lengths.copy()
    infinite[0, 0, 3] = np.inf  # what a raw table with a zero count would give
    with pytest.raises(ValueError, match="finite code lengths"):
        rdo_search(z, books, ranking, infinite, 0.3)
