"""Tests for edge_client.bitpack: bit widths, exact layout, round trips, rejection, speed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_client.bitpack import bits_for, pack_indices, packed_size, unpack_indices
from edge_client.errors import CorruptStreamError, IndexRangeError, TruncatedStreamError


@pytest.mark.parametrize(
    ("codebook_size", "bits"),
    [(2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5), (256, 8), (4096, 12), (4097, 13), (65536, 16)],
)
def test_bits_for(codebook_size: int, bits: int) -> None:
    assert bits_for(codebook_size) == bits


@pytest.mark.parametrize("codebook_size", [0, 1, 65537, -4])
def test_bits_for_rejects_out_of_range_sizes(codebook_size: int) -> None:
    with pytest.raises(ValueError, match="codebook_size"):
        bits_for(codebook_size)


@pytest.mark.parametrize("codebook_size", [True, 4096.0, "4096"])
def test_bits_for_rejects_non_ints(codebook_size: object) -> None:
    with pytest.raises(TypeError):
        bits_for(codebook_size)  # type: ignore[arg-type]


def test_packed_size() -> None:
    assert packed_size(577, 12) == 866  # LLaVA-1.5: 577 tokens, one 4096-entry code each
    assert packed_size(0, 7) == 0
    assert packed_size(1, 1) == 1
    assert packed_size(3, 3) == 2
    assert packed_size(8, 1) == 1


def test_llava_geometry_packs_to_866_bytes() -> None:
    indices = np.random.default_rng(0).integers(0, 4096, size=(577, 1, 1))
    data = pack_indices(indices, bits_for(4096))
    assert len(data) == 866
    np.testing.assert_array_equal(unpack_indices(data, 12, 577), indices.reshape(-1))


@pytest.mark.parametrize(
    ("values", "bits", "expected"),
    [
        ([1, 2, 3], 4, b"\x12\x30"),
        ([5], 3, b"\xa0"),
        ([0xABC, 0x123], 12, b"\xab\xc1\x23"),
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, b"\xb0\x80"),
        ([0xFFFF, 0x0001], 16, b"\xff\xff\x00\x01"),
        ([], 5, b""),
    ],
)
def test_layout_is_msb_first_with_zero_padding(values: list[int], bits: int, expected: bytes) -> None:
    assert pack_indices(np.array(values, dtype=np.int64), bits) == expected
    np.testing.assert_array_equal(unpack_indices(expected, bits, len(values)), values)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.integers(1, 16))
def test_round_trip_all_bit_widths(data: st.DataObject, bits: int) -> None:
    dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.int64, np.uint64]))
    high = min((1 << bits) - 1, int(np.iinfo(dtype).max))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9))
    indices = data.draw(hnp.arrays(dtype, shape, elements=st.integers(0, high)))
    packed = pack_indices(indices, bits)
    assert len(packed) == packed_size(indices.size, bits)
    unpacked = unpack_indices(packed, bits, indices.size)
    assert unpacked.dtype == np.uint16
    np.testing.assert_array_equal(unpacked, indices.reshape(-1))


def test_out_of_range_names_first_bad_value_and_bound() -> None:
    with pytest.raises(IndexRangeError, match=r"\[0, 16\).*got 16 at flat position 2"):
        pack_indices(np.array([3, 15, 16, 99]), 4)
    with pytest.raises(IndexRangeError, match="got -1 at flat position 1"):
        pack_indices(np.array([[0, -1]]), 4)


def test_pack_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="integer dtype"):
        pack_indices(np.array([1.0, 2.0]), 4)
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            pack_indices(np.array([1]), bits)


def test_unpack_rejects_short_long_and_dirty_padding() -> None:
    data = pack_indices(np.array([1, 2, 3]), 4)  # 12 bits -> 2 bytes, 4 padding bits
    with pytest.raises(TruncatedStreamError, match="expected 2 bytes .* got 1"):
        unpack_indices(data[:1], 4, 3)
    with pytest.raises(CorruptStreamError, match="expected 2 bytes .* got 3"):
        unpack_indices(data + b"\x00", 4, 3)
    with pytest.raises(CorruptStreamError, match="padding"):
        unpack_indices(data[:1] + bytes([data[1] | 0x01]), 4, 3)


@settings(max_examples=100, deadline=None)
@given(
    bits=st.integers(1, 16),
    count=st.integers(1, 40),
    cut=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_unpack_rejects_any_truncation(bits: int, count: int, cut: int, seed: int) -> None:
    indices = np.random.default_rng(seed).integers(0, 1 << bits, size=count)
    data = pack_indices(indices, bits)
    with pytest.raises(TruncatedStreamError):
        unpack_indices(data[: max(0, len(data) - cut)], bits, count)
