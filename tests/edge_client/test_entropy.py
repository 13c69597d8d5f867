"""Tests for edge_client.entropy: frequency tables, table hashes and the rANS coder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.bitpack import bits_for, packed_size
from edge_client.entropy import PRECISION, normalize_freqs, rans_decode, rans_encode, table_hash
from edge_client.errors import AlignedVQError, CorruptStreamError, IndexRangeError, TruncatedStreamError

TOTAL = 1 << PRECISION


def skewed_counts(groups: int, stages: int, size: int, seed: int = 0) -> np.ndarray:
    """Zipf-like index counts, as a trained codebook's usage tends to be."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, size + 1, dtype=np.float64)
    counts = np.empty((groups, stages, size), dtype=np.int64)
    for group in range(groups):
        for stage in range(stages):
            counts[group, stage] = rng.permutation((1e6 / ranks**1.2).astype(np.int64))
    return counts


def sample(freqs: np.ndarray, tokens: int, seed: int = 0) -> np.ndarray:
    """Indices `(tokens, groups, stages)` drawn from the table's own distribution."""
    rng = np.random.default_rng(seed)
    groups, stages, size = freqs.shape
    out = np.empty((tokens, groups, stages), dtype=np.int64)
    for group in range(groups):
        for stage in range(stages):
            out[:, group, stage] = rng.choice(size, size=tokens, p=freqs[group, stage] / TOTAL)
    return out


def test_precision_covers_every_codebook_size() -> None:
    assert PRECISION == 24
    freqs = normalize_freqs(np.zeros((1, 1, 65536), dtype=np.int64))
    assert freqs.dtype == np.uint32 and freqs.min() >= 1
    assert int(freqs.sum()) == TOTAL


def test_normalize_freqs_pinned_example() -> None:
    # free = 2**24 - 3: shares 0, 4194303 r1, 12582909 r3; the unit left over goes to the largest remainder.
    freqs = normalize_freqs(np.array([[[0, 1, 3]]]))
    np.testing.assert_array_equal(freqs, [[[1, 4194304, 12582911]]])


def test_normalize_freqs_ties_go_to_lower_index() -> None:
    freqs = normalize_freqs(np.zeros((1, 1, 3), dtype=np.int64))  # free = 2**24 - 3, 1 left over
    np.testing.assert_array_equal(freqs, [[[5592406, 5592405, 5592405]]])


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 3),
    stages=st.integers(1, 3),
    size=st.integers(2, 600),
    high=st.sampled_from([1, 10, 10**6, 2**28]),  # rows stay below the documented 2**38 sum
    seed=st.integers(0, 2**32 - 1),
)
def test_normalize_freqs_rows_are_exact_and_positive(
    groups: int, stages: int, size: int, high: int, seed: int
) -> None:
    counts = np.random.default_rng(seed).integers(0, high, size=(groups, stages, size), endpoint=True)
    freqs = normalize_freqs(counts)
    assert freqs.shape == counts.shape and freqs.dtype == np.uint32
    assert freqs.min() >= 1
    np.testing.assert_array_equal(freqs.astype(np.int64).sum(axis=-1), TOTAL)
    # Monotone in the counts: a more frequent index never gets a smaller frequency.
    for row_counts, row_freqs in zip(counts.reshape(-1, size), freqs.reshape(-1, size), strict=True):
        order = np.lexsort((row_freqs, row_counts))  # by count, ties by frequency
        assert (np.diff(row_freqs[order].astype(np.int64)) >= 0).all()
    np.testing.assert_array_equal(normalize_freqs(counts.astype(np.uint32)), freqs)


@pytest.mark.parametrize(
    ("counts", "error"),
    [
        (np.ones((4, 4)), ValueError),
        (np.ones((1, 1, 4)), TypeError),
        (np.array([[[1, -1, 3]]]), ValueError),
        (np.ones((1, 1, 1), dtype=np.int64), ValueError),
        (np.ones((1, 1, 65537), dtype=np.int64), ValueError),
        (np.full((1, 1, 4), 2**40), ValueError),
    ],
)
def test_normalize_freqs_rejects_bad_counts(counts: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error):
        normalize_freqs(counts)


def test_table_hash_is_pinned_and_content_sensitive() -> None:
    freqs = normalize_freqs(np.array([[[0, 1, 3]]]))
    assert table_hash(freqs) == "41c86bda7e7570339fee0caea96890225d4b725ecdf10c34c280518da876992b"
    other = freqs.copy()
    other[0, 0, 1] -= 1
    other[0, 0, 2] += 1
    assert table_hash(other) != table_hash(freqs)
    assert table_hash(freqs.astype(np.int64)) == table_hash(freqs)
    with pytest.raises(ValueError, match="sum to"):
        table_hash(freqs + 1)


@settings(max_examples=80, deadline=None)
@given(
    groups=st.integers(1, 3),
    stages=st.integers(1, 3),
    size=st.sampled_from([2, 3, 7, 16, 255, 1000, 4096]),
    tokens=st.integers(0, 60),
    skewed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rans_round_trip(groups: int, stages: int, size: int, tokens: int, skewed: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = (
        skewed_counts(groups, stages, size, seed) if skewed else rng.integers(0, 50, (groups, stages, size))
    )
    freqs = normalize_freqs(counts)
    # Mostly in-distribution indices, plus arbitrary ones (including count-0 entries).
    indices = sample(freqs, tokens, seed)
    indices[rng.random(indices.shape) < 0.1] = rng.integers(0, size)
    data = rans_encode(indices, freqs)
    decoded = rans_decode(data, freqs, tokens)
    assert decoded.dtype == np.uint16 and decoded.shape == (tokens, groups, stages)
    np.testing.assert_array_equal(decoded, indices)


def test_rans_round_trip_largest_codebook() -> None:
    freqs = normalize_freqs(skewed_counts(1, 2, 65536))
    indices = sample(freqs, 300)
    indices[:3] = [[[0, 65535]], [[65535, 0]], [[12345, 54321]]]
    np.testing.assert_array_equal(rans_decode(rans_encode(indices, freqs), freqs, 300), indices)


def test_rans_is_near_the_ideal_code_length() -> None:
    freqs = normalize_freqs(skewed_counts(1, 1, 4096))
    indices = sample(freqs, 577)
    ideal_bytes = -np.log2(freqs[0, 0, indices.reshape(-1)] / TOTAL).sum() / 8
    size = len(rans_encode(indices, freqs))
    assert ideal_bytes <= size <= ideal_bytes * 1.005 + 6  # 5 bytes of final state, < 0.5 % coding loss
    assert size < packed_size(577, bits_for(4096))


def test_rans_size_matches_constriction() -> None:
    """constriction (an independent ANS implementation) needs about as many bytes for the same model."""
    constriction = pytest.importorskip("constriction")
    freqs = normalize_freqs(skewed_counts(1, 1, 4096))
    indices = sample(freqs, 577)
    model = constriction.stream.model.Categorical(freqs[0, 0].astype(np.float64), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(indices.reshape(-1).astype(np.int32), model)
    reference = coder.num_bits() // 8
    assert abs(len(rans_encode(indices, freqs)) - reference) <= 8


def test_rans_encode_rejects_out_of_range_and_bad_shapes() -> None:
    freqs = normalize_freqs(np.ones((2, 1, 10), dtype=np.int64))
    indices = np.zeros((4, 2, 1), dtype=np.int64)
    indices[2, 1, 0] = 10
    with pytest.raises(IndexRangeError, match=r"\[0, 10\), got 10 at token 2, group 1, stage 0"):
        rans_encode(indices, freqs)
    with pytest.raises(ValueError, match="shape"):
        rans_encode(np.zeros((4, 1, 1), dtype=np.int64), freqs)
    with pytest.raises(ValueError, match="sum to"):
        rans_encode(np.zeros((4, 2, 1), dtype=np.int64), freqs * 2)
    with pytest.raises(ValueError, match=">= 1"):
        rans_encode(np.zeros((4, 2, 1), dtype=np.int64), np.zeros((2, 1, 10), dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_rans_rejects_truncation(cut: int, seed: int) -> None:
    freqs = normalize_freqs(skewed_counts(1, 1, 256, seed=1))
    indices = sample(freqs, 100, seed)
    data = rans_encode(indices, freqs)
    with pytest.raises(TruncatedStreamError):
        rans_decode(data[: max(0, len(data) - cut)], freqs, 100)


def test_rans_rejects_extension_and_garbage() -> None:
    freqs = normalize_freqs(skewed_counts(1, 1, 256))
    indices = sample(freqs, 100)
    data = rans_encode(indices, freqs)
    with pytest.raises(CorruptStreamError):
        rans_decode(data + b"\x00", freqs, 100)
    with pytest.raises(CorruptStreamError, match="initial rANS state"):
        rans_decode(b"\x00" * len(data), freqs, 100)
    rng = np.random.default_rng(0)
    for _ in range(50):  # random bytes almost never end in the initial state with nothing left over
        with pytest.raises(AlignedVQError):
            rans_decode(rng.bytes(len(data)), freqs, 100)
