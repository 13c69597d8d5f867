"""``benchmarks/compact_header.py``'s prototype layout round-trips and keeps version 1's checks
(synthetic streams only: no model, no torch)."""

from __future__ import annotations

import pytest

from benchmarks.compact_header import (
    CONSERVATIVE,
    RECOMMENDED,
    Mismatch,
    decode_compact,
    encode_compact,
    round_trip,
    self_check,
    synthetic_streams,
)
from edge_client.bitstream import read_header
from edge_client.errors import CorruptStreamError


@pytest.mark.parametrize("layout", [RECOMMENDED, CONSERVATIVE], ids=["recommended", "conservative"])
def test_round_trip_gives_the_same_header_and_payload(layout: dict) -> None:
    for stream, full_hash in synthetic_streams():
        h = read_header(stream)
        compact = round_trip(stream, full_hash, **layout)  # raises if any field or byte differs
        back, payload = decode_compact(compact, h.model, full_hash, **layout)
        assert back == h and payload == stream[h.nbytes :]


def test_sizes_and_refusals() -> None:
    stream, full_hash = next(  # llava-mini-scenes geometry: 65 tokens, 1 x 2 x 4096, packed
        (s, f) for s, f in synthetic_streams() if read_header(s).model == "llava-mini-scenes"
    )
    h = read_header(stream)
    compact = encode_compact(h, stream[h.nbytes :])
    assert h.nbytes == 48 and len(compact) - (len(stream) - h.nbytes) == 17
    with pytest.raises(Mismatch):
        decode_compact(compact, "llava-mini-shapes", full_hash)
    with pytest.raises(Mismatch):
        decode_compact(compact, h.model, "f" * 64)
    with pytest.raises(CorruptStreamError):
        decode_compact(compact[:-1], h.model, full_hash)  # truncated: the CRC no longer matches
    with pytest.raises(CorruptStreamError):
        decode_compact(stream, h.model, full_hash)  # a version-1 stream is told apart by its first byte
    assert self_check()["bit_flips_refused"] > 0  # every single-bit flip of one stream refused
