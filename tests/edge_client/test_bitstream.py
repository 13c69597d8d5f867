"""Tests for edge_client.bitstream (and the error tree it raises): header, round trips, rejection."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.bitpack import packed_size
from edge_client.bitstream import StreamHeader, decode_stream, encode_stream, read_header
from edge_client.entropy import normalize_freqs
from edge_client.errors import (
    AlignedVQError,
    BitstreamError,
    CorruptStreamError,
    EntropyModelError,
    IndexRangeError,
    TruncatedStreamError,
    UnsupportedVersionError,
    all_error_codes,
)

HASH = "3f2a9c0e55d1b7a48e6f0c1d2b3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4"

# Golden streams: if one of these changes, the wire format changed; bump FORMAT_VERSION instead.
GOLDEN_PACKED = bytes.fromhex(
    "415651"  # magic
    "01"  # version
    "04"  # model name length
    "74696e79"  # "tiny"
    "0123456789abcdef"  # codebook hash prefix
    "02"  # split kind block
    "02"  # k = 2
    "0003"  # tokens
    "01"  # groups
    "02"  # stages
    "0009"  # K - 1
    "00"  # coder packed
    "04"  # stat_bits
    "00000006"  # payload length
    "0594e9e0"  # CRC32
    "190573"  # indices 1 9 0 5 7 3 at 4 bits
    "1f0833"  # stats 1 15 0 8 3 3 at 4 bits
)
GOLDEN_RANS = bytes.fromhex(
    "415651"  # magic
    "01"  # version
    "04"  # model name length
    "74696e79"  # "tiny"
    "fedcba9876543210"  # codebook hash prefix
    "01"  # split kind preln
    "00"  # k
    "0020"  # tokens
    "01"  # groups
    "01"  # stages
    "000f"  # K - 1
    "01"  # coder rans
    "00"  # stat_bits
    "00000008"  # payload length
    "3deb1b61"  # CRC32
    "01fb911c21"  # final rANS state (5 bytes)
    "a67ac4"  # renormalisation bytes
)


def golden_rans_inputs() -> tuple[StreamHeader, np.ndarray, np.ndarray]:
    counts = np.zeros((1, 1, 16), dtype=np.int64)
    counts[0, 0, :4] = [1000, 10, 5, 1]
    indices = np.zeros((32, 1, 1), dtype=np.int64)
    indices[[3, 10, 20], 0, 0] = [1, 3, 2]
    header = StreamHeader(
        "tiny", "fedcba9876543210", "preln", tokens=32, groups=1, stages=1, codebook_size=16
    )
    return header, indices, normalize_freqs(counts)


def make_header(**changes: object) -> StreamHeader:
    fields: dict[str, object] = dict(
        model="llava-1.5-7b",
        codebook_hash=HASH,
        split_site="preln",
        tokens=577,
        groups=1,
        stages=1,
        codebook_size=4096,
    )
    fields.update(changes)
    return StreamHeader(**fields)  # type: ignore[arg-type]


def resign(data: bytes | bytearray) -> bytes:
    """Recompute the CRC after editing a stream, to reach the checks behind it."""
    header_size = 5 + data[4] + 26
    crc = zlib.crc32(bytes(data[header_size:]), zlib.crc32(bytes(data[: header_size - 4])))
    return bytes(data[: header_size - 4]) + struct.pack(">I", crc) + bytes(data[header_size:])


# Error tree


def test_error_codes_are_unique_and_stable() -> None:
    codes = all_error_codes()
    assert codes["bad_bitstream"] is BitstreamError
    assert codes["truncated_stream"] is TruncatedStreamError
    assert codes["corrupt_stream"] is CorruptStreamError
    assert codes["unsupported_version"] is UnsupportedVersionError
    assert codes["entropy_model_mismatch"] is EntropyModelError
    assert codes["index_out_of_range"] is IndexRangeError
    assert all(issubclass(cls, AlignedVQError) for cls in codes.values())
    error = TruncatedStreamError("expected 866 bytes, got 865")
    assert isinstance(error, BitstreamError) and str(error) == "expected 866 bytes, got 865"


# Header


def test_header_fits_in_64_bytes() -> None:
    data = encode_stream(make_header(), np.zeros((577, 1, 1), dtype=np.int64))
    header = read_header(data)
    assert header.nbytes == 43 <= 64
    assert len(data) == header.nbytes + 866
    assert make_header(model="x" * 20, split_site="block:255", stat_bits=16).nbytes <= 64


def test_llava_geometry() -> None:
    header = make_header()
    assert (header.bits_per_index, header.index_count, header.bits_per_token) == (12, 577, 12)
    indices = np.random.default_rng(0).integers(0, 4096, size=(577, 1, 1))
    data = encode_stream(header, indices)
    assert len(data) - header.nbytes == 866
    block = make_header(split_site="block:2", stat_bits=8)
    assert block.bits_per_token == 12 + 16


def test_header_normalises_the_codebook_hash() -> None:
    header = make_header(codebook_hash=HASH.upper())
    assert header.codebook_hash == HASH[:16]
    assert header.matches_codebook(HASH) and header.matches_codebook(HASH[:16].upper())
    assert not header.matches_codebook("0" * 64)
    assert header == make_header(codebook_hash=HASH[:16])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": ""}, "model"),
        ({"model": "m" * 49}, "48 utf-8 bytes"),
        ({"model": "é" * 25}, "48 utf-8 bytes"),
        ({"codebook_hash": "abc"}, "16 chars"),
        ({"codebook_hash": "g" * 16}, "hex"),
        ({"split_site": "block:0"}, "split_site"),
        ({"split_site": "block:256"}, "split_site"),
        ({"split_site": "block:02"}, "split_site"),
        ({"split_site": "post"}, "split_site"),
        ({"tokens": 0}, "tokens"),
        ({"tokens": 65536}, "tokens"),
        ({"tokens": 1.0}, "tokens"),
        ({"groups": 256}, "groups"),
        ({"stages": 0}, "stages"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"codebook_size": 65537}, "codebook_size"),
        ({"coder": "huffman"}, "coder"),
        ({"stat_bits": 17}, "stat_bits"),
        ({"stat_bits": True}, "stat_bits"),
    ],
)
def test_header_rejects_invalid_fields(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_header(**changes)


def test_header_accepts_numpy_ints_as_ints() -> None:
    header = make_header(tokens=np.int64(577), codebook_size=np.uint32(65536))
    assert type(header.tokens) is int and header.codebook_size == 65536 and header.bits_per_index == 16


# Golden bytes


def test_golden_packed_stream() -> None:
    header = StreamHeader("tiny", "0123456789ABCDEF", "block:2", 3, 1, 2, 10, stat_bits=4)
    indices = np.array([[[1, 9]], [[0, 5]], [[7, 3]]])
    stats = np.array([[1, 15], [0, 8], [3, 3]])
    assert encode_stream(header, indices, stats) == GOLDEN_PACKED
    decoded = decode_stream(GOLDEN_PACKED)
    assert decoded.header == header
    np.testing.assert_array_equal(decoded.indices, indices)
    np.testing.assert_array_equal(decoded.stats, stats)


def test_golden_rans_stream() -> None:
    header, indices, freqs = golden_rans_inputs()
    data = encode_stream(header, indices, freqs=freqs)
    assert data == GOLDEN_RANS
    decoded = decode_stream(GOLDEN_RANS, freqs)
    assert decoded.header == replace(header, coder="rans")
    np.testing.assert_array_equal(decoded.indices, indices)
    assert decoded.stats is None


# Round trips

split_sites = st.sampled_from(["preln", "embed"]) | st.integers(1, 255).map(lambda k: f"block:{k}")


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    tokens=st.integers(1, 40),
    groups=st.integers(1, 3),
    stages=st.integers(1, 3),
    bits=st.integers(1, 16),
    stat_bits=st.integers(0, 16),
    split_site=split_sites,
    model=st.text(min_size=1, max_size=12),
    entropy=st.booleans(),
)
def test_round_trip(
    data: st.DataObject,
    tokens: int,
    groups: int,
    stages: int,
    bits: int,
    stat_bits: int,
    split_site: str,
    model: str,
    entropy: bool,
) -> None:
    codebook_size = data.draw(st.integers(max(2, (1 << (bits - 1)) + 1), 1 << bits), label="codebook_size")
    header = StreamHeader(model, HASH, split_site, tokens, groups, stages, codebook_size, stat_bits=stat_bits)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    freqs = None
    if entropy:
        counts = rng.integers(0, 2, size=(groups, stages, codebook_size)) * rng.integers(0, 1000)
        counts[..., 0] += rng.integers(0, 10**6)  # sometimes very skewed, so rANS wins
        freqs = normalize_freqs(counts)
        indices = np.empty((tokens, groups, stages), dtype=np.int64)
        for group in range(groups):
            for stage in range(stages):
                p = freqs[group, stage] / freqs[group, stage].sum()
                indices[:, group, stage] = rng.choice(codebook_size, size=tokens, p=p)
    else:
        indices = rng.integers(0, codebook_size, size=(tokens, groups, stages))
    stats = rng.integers(0, 1 << stat_bits, size=(tokens, 2)) if stat_bits else None

    stream = encode_stream(header, indices, stats, freqs=freqs, entropy=entropy)
    written = read_header(stream)
    assert written == replace(header, coder=written.coder)
    stats_size = packed_size(2 * tokens, stat_bits) if stat_bits else 0
    packed_length = header.nbytes + packed_size(header.index_count, bits) + stats_size
    assert len(stream) <= packed_length and (len(stream) == packed_length) == (written.coder == "packed")
    decoded = decode_stream(stream, freqs)
    assert decoded.header == written
    assert decoded.indices.dtype == np.uint16
    np.testing.assert_array_equal(decoded.indices, indices)
    if stat_bits:
        assert decoded.stats is not None and decoded.stats.dtype == np.uint16
        np.testing.assert_array_equal(decoded.stats, stats)
    else:
        assert decoded.stats is None


def test_rans_is_used_when_smaller_and_skipped_when_not() -> None:
    rng = np.random.default_rng(0)
    counts = (1e6 / np.arange(1, 4097) ** 1.5).astype(np.int64)[rng.permutation(4096)][None, None]
    freqs = normalize_freqs(counts)
    header = make_header()
    skewed = rng.choice(4096, size=(577, 1, 1), p=freqs[0, 0] / freqs.sum())
    stream = encode_stream(header, skewed, freqs=freqs)
    assert read_header(stream).coder == "rans"
    assert len(stream) - header.nbytes < 866 / 2
    np.testing.assert_array_equal(decode_stream(stream, freqs).indices, skewed)

    uniform = rng.integers(0, 4096, size=(577, 1, 1))
    for table in (freqs, normalize_freqs(np.ones((1, 1, 4096), dtype=np.int64))):
        stream = encode_stream(header, uniform, freqs=table)
        assert read_header(stream).coder == "packed"
        assert len(stream) == header.nbytes + 866
    assert read_header(encode_stream(header, skewed, freqs=freqs, entropy=False)).coder == "packed"
    assert read_header(encode_stream(header, skewed)).coder == "packed"


# Rejection of damaged streams


@pytest.fixture(scope="module")
def streams() -> list[tuple[bytes, np.ndarray | None]]:
    """A packed stream with statistics and a rANS stream, with the table each needs."""
    rng = np.random.default_rng(1)
    header = make_header(tokens=20, groups=2, stages=1, codebook_size=3000, split_site="block:3", stat_bits=7)
    packed = encode_stream(header, rng.integers(0, 3000, size=(20, 2, 1)), rng.integers(0, 128, size=(20, 2)))
    rans_header, indices, freqs = golden_rans_inputs()
    return [(packed, None), (encode_stream(rans_header, indices, freqs=freqs), freqs)]


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, 1), cut=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_rejected(streams: list, which: int, cut: float) -> None:
    data, freqs = streams[which]
    with pytest.raises(TruncatedStreamError):
        decode_stream(data[: int(cut * len(data))], freqs)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 1), position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_is_rejected(streams: list, which: int, position: float, bit: int) -> None:
    data, freqs = streams[which]
    damaged = bytearray(data)
    damaged[int(position * len(data))] ^= 1 << bit
    with pytest.raises(AlignedVQError):
        decode_stream(bytes(damaged), freqs)


@settings(max_examples=50, deadline=None)
@given(which=st.integers(0, 1), extra=st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_rejected(streams: list, which: int, extra: bytes) -> None:
    data, freqs = streams[which]
    with pytest.raises(CorruptStreamError, match="trailing"):
        decode_stream(data + extra, freqs)


def test_read_header_rejects_what_decode_rejects(streams: list) -> None:
    data, _ = streams[0]
    for damaged in (data[:-1], data + b"\x00", data[:-1] + bytes([data[-1] ^ 0x10])):
        with pytest.raises(BitstreamError):
            read_header(damaged)


def test_bad_magic_and_version() -> None:
    with pytest.raises(CorruptStreamError, match="magic"):
        decode_stream(b"GIF89a" + GOLDEN_PACKED[6:])
    with pytest.raises(UnsupportedVersionError, match="got version 2"):
        decode_stream(GOLDEN_PACKED[:3] + b"\x02" + GOLDEN_PACKED[4:])
    with pytest.raises(TruncatedStreamError, match="expected 41 bytes, got 40"):
        decode_stream(GOLDEN_PACKED[:-1])
    with pytest.raises(CorruptStreamError, match="CRC32"):
        decode_stream(GOLDEN_PACKED[:-1] + b"\x34")


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({5: 0xFF}, "utf-8"),  # model name
        ({17: 9}, "split kind"),
        ({17: 1}, "split kind"),  # preln with k = 2
        ({18: 0}, "split_site"),  # block:0
        ({19: 0, 20: 0}, "tokens"),
        ({23: 0, 24: 0}, "codebook_size"),  # K - 1 = 0
        ({25: 3}, "coder"),
        ({26: 17}, "stat_bits"),
    ],
)
def test_well_formed_but_invalid_headers_are_rejected(edits: dict[int, int], match: str) -> None:
    damaged = bytearray(GOLDEN_PACKED)
    for offset, value in edits.items():
        damaged[offset] = value
    with pytest.raises(CorruptStreamError, match=match):
        decode_stream(resign(damaged))


def test_section_sizes_must_match_the_header() -> None:
    damaged = bytearray(GOLDEN_PACKED)
    damaged[26] = 1  # stat_bits 4 -> 1: stats take 1 byte, leaving 5 for 3 bytes of packed indices
    with pytest.raises(CorruptStreamError, match="packed indices"):
        decode_stream(resign(damaged))
    damaged = bytearray(GOLDEN_PACKED)
    damaged[25] = 1  # packed -> rans: 3 bytes is not fewer than the 3 packing needs
    with pytest.raises(CorruptStreamError, match="rANS"):
        decode_stream(resign(damaged))


def test_indices_beyond_the_codebook_are_rejected() -> None:
    damaged = bytearray(GOLDEN_PACKED)
    damaged[-6] = 0x1C  # first two indices 1, 9 -> 1, 12 with K = 10
    with pytest.raises(IndexRangeError, match=r"\[0, 10\), got 12 at \(token, group, stage\) \(0, 0, 1\)"):
        decode_stream(resign(damaged))


def test_dirty_padding_is_rejected() -> None:
    header = StreamHeader("tiny", HASH, "preln", tokens=3, groups=1, stages=1, codebook_size=8)
    damaged = bytearray(encode_stream(header, np.array([[[1]], [[2]], [[3]]])))
    damaged[-1] |= 0x01  # 9 bits used, 7 bits of padding
    with pytest.raises(CorruptStreamError, match="padding"):
        decode_stream(resign(damaged))


def test_rans_streams_need_a_matching_table() -> None:
    _, _, freqs = golden_rans_inputs()
    with pytest.raises(EntropyModelError, match=r"\(1, 1, 16\).*got none"):
        decode_stream(GOLDEN_RANS)
    with pytest.raises(EntropyModelError, match=r"got shape \(1, 1, 32\)"):
        decode_stream(GOLDEN_RANS, normalize_freqs(np.ones((1, 1, 32), dtype=np.int64)))
    wrong = normalize_freqs(np.ones((1, 1, 16), dtype=np.int64))
    with pytest.raises(CorruptStreamError):  # same shape, different table: the coder's end state exposes it
        decode_stream(GOLDEN_RANS, wrong)
    assert read_header(GOLDEN_RANS).coder == "rans"  # the header alone needs no table


def test_encode_rejects_bad_inputs() -> None:
    header = make_header(tokens=4, split_site="block:1", stat_bits=8)
    indices = np.zeros((4, 1, 1), dtype=np.int64)
    stats = np.zeros((4, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"shape \(4, 1, 1\)"):
        encode_stream(header, np.zeros((4, 1), dtype=np.int64), stats)
    with pytest.raises(ValueError, match="integer"):
        encode_stream(header, indices.astype(np.float32), stats)
    bad = indices.copy()
    bad[2, 0, 0] = 4096
    with pytest.raises(IndexRangeError, match=r"got 4096 at \(token, group, stage\) \(2, 0, 0\)"):
        encode_stream(header, bad, stats)
    with pytest.raises(ValueError, match="stats of shape"):
        encode_stream(header, indices)
    bad_stats = stats.copy()
    bad_stats[3, 1] = 256
    with pytest.raises(IndexRangeError, match="got 256 at token 3, column 1"):
        encode_stream(header, indices, bad_stats)
    with pytest.raises(ValueError, match="stat_bits is 0"):
        encode_stream(make_header(tokens=4), indices, stats)
    with pytest.raises(ValueError, match="frequency table"):
        encode_stream(make_header(tokens=4), indices, freqs=np.ones((1, 1, 16), dtype=np.uint32))
