"""Neighbour-rank transform: exact round trips, small ranks for smooth images, strict inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.bitstream import StreamHeader, decode_stream, encode_stream, read_header
from edge_client.entropy import normalize_freqs
from edge_client.errors import EntropyModelError
from edge_client.ranking import NeighbourRanks, max_book, neighbours


def test_neighbours_follow_the_patch_grid() -> None:
    # class token + 3x3 grid (tokens 1..9): (left, above) of each patch.
    left, above = neighbours(10).T.tolist()
    assert left == [-1, -1, 1, 2, -1, 4, 5, -1, 7, 8]
    assert above == [-1, -1, -1, -1, 1, 2, 3, 4, 5, 6]
    assert neighbours(6)[:, 0].tolist() == [-1, 0, 1, 2, 3, 4]  # no square grid: previous token
    assert (neighbours(6)[:, 1] == -1).all() and neighbours(1).tolist() == [[-1, -1]]


def _ranking(rng: np.random.Generator, tokens=10, groups=2, stages=2, size=64, dim=4, spread=3):
    books = rng.integers(-spread, spread + 1, (groups, stages, size, dim)).astype(np.int16)
    offsets = rng.integers(-4, 5, (tokens, groups, stages, dim)).astype(np.int16)
    return NeighbourRanks(books, offsets)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_round_trip_exactly_even_with_tied_codewords(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranking = _ranking(rng)  # +-3 in 4 dims over 64 codes: many equal distances and duplicate rows
    indices = rng.integers(0, 64, ranking.shape)
    ranks = ranking.ranks(indices)
    assert ranks.min() >= 0 and ranks.max() < 64
    np.testing.assert_array_equal(ranking.indices(ranks), indices)


def test_a_token_equal_to_its_neighbour_gets_rank_zero() -> None:
    rng = np.random.default_rng(0)
    books = rng.integers(-max_book(8), max_book(8) + 1, (1, 1, 64, 8)).astype(np.int16)
    ranking = NeighbourRanks(books, np.zeros((17, 1, 1, 8), np.int16))  # class token + 4x4 grid
    indices = np.full((17, 1, 1), 5)
    ranks = ranking.ranks(indices)
    assert ranks[2:].max() == 0  # every patch but the first repeats its neighbour
    np.testing.assert_array_equal(ranking.indices(ranks), indices)


def test_bad_geometry_and_inputs_are_refused() -> None:
    rng = np.random.default_rng(0)
    ranking = _ranking(rng)
    with pytest.raises(ValueError, match="int16 rank books"):
        NeighbourRanks(np.zeros((1, 1, 4, 2), np.float32), np.zeros((3, 1, 1, 2), np.int16))
    with pytest.raises(ValueError, match="rank offsets"):
        NeighbourRanks(np.zeros((1, 1, 4, 2), np.int16), np.zeros((3, 1, 2, 2), np.int16))
    bound = max_book(2)
    with pytest.raises(ValueError, match=rf"\|books\| <= {bound}"):  # beyond it float32 could round
        NeighbourRanks(np.full((1, 1, 4, 2), bound + 1, np.int16), np.zeros((3, 1, 1, 2), np.int16))
    with pytest.raises(ValueError, match="shape"):
        ranking.ranks(np.zeros((9, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        ranking.indices(np.full(ranking.shape, 64))


def test_ranked_streams_need_the_ranking_and_round_trip() -> None:
    rng = np.random.default_rng(1)
    ranking = _ranking(rng, tokens=10, groups=1, stages=1, size=256, spread=100)
    smooth = np.repeat(rng.integers(0, 256, (1, 1, 1)), 10, axis=0)  # one code everywhere
    freqs = normalize_freqs(np.bincount(ranking.ranks(smooth).ravel(), minlength=256).reshape(1, 1, -1))
    header = StreamHeader(
        model="m",
        codebook_hash="ab" * 8,
        split_site="preln",
        tokens=10,
        groups=1,
        stages=1,
        codebook_size=256,
    )
    stream = encode_stream(header, smooth, freqs=freqs, ranking=ranking)
    assert read_header(stream).coder == "ranked"
    np.testing.assert_array_equal(decode_stream(stream, freqs, ranking).indices, smooth)
    checked = decode_stream(stream, freqs, ranking, resolve_ranks=False)  # the gateway's validation
    np.testing.assert_array_equal(checked.indices, ranking.ranks(smooth))
    with pytest.raises(EntropyModelError, match="neighbour ranking"):
        decode_stream(stream, freqs)
    index_freqs = normalize_freqs(np.bincount(smooth.ravel(), minlength=256).reshape(1, 1, -1))
    plain = encode_stream(header, smooth, freqs=index_freqs)
    assert read_header(plain).coder == "rans"
    with pytest.raises(EntropyModelError, match="ranked stream"):  # a ranked model refuses raw indices
        decode_stream(plain, index_freqs, ranking)
