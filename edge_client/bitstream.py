"""The versioned feature stream: what the edge sends as the `features` bytes of a request.

A stream is a fixed binary header, the index section, then an optional statistics section.
All integers are big-endian. `n` is the byte length of the utf-8 model name.

    offset  size  field
    0       3     magic b"AVQ"
    3       1     format version (1)
    4       1     n, model name length (1..48)
    5       n     model name, utf-8
    5+n     8     codebook hash: its first 8 bytes (16 hex chars)
    13+n    1     split kind: 0 = embed, 1 = preln, 2 = block
    14+n    1     split k: the block index for "block:k" (1..255), else 0
    15+n    2     tokens (1..65535)
    17+n    1     groups (1..255)
    18+n    1     stages (1..255)
    19+n    2     codebook size K minus 1 (so K = 65536 fits)
    21+n    1     coder: 0 = packed, 1 = rans, 2 = ranked (rANS over neighbour ranks)
    22+n    1     stat_bits: 0 = no statistics, else 1..16
    23+n    4     payload length: bytes after the header
    27+n    4     CRC32 of header bytes [0, 27+n) followed by the payload
    31+n          end of header (43 bytes for "llava-1.5-7b"; <= 64 for names up to 33 bytes)

Payload:

- index section: the `(tokens, groups, stages)` indices in C order, either bit-packed at
  `bits_for(K)` bits each (`edge_client.bitpack`, exactly `ceil(tokens*G*S*bits/8)` bytes) or rANS
  coded (`edge_client.entropy`, strictly fewer bytes than packing, else the encoder packs), either
  the indices themselves (`rans`) or their neighbour ranks (`ranked`, `edge_client.ranking`; the
  bundle's table then counts ranks);
- statistics section (only if stat_bits > 0): `(tokens, 2)` values (quantized mean, log-std per
  token), bit-packed at stat_bits each, `ceil(tokens*2*stat_bits/8)` bytes. Its size is fixed by the
  header, so the index section is whatever precedes it.

The CRC covers the header as well as the payload (not only the payload), so that any single
flipped bit anywhere in the stream is rejected instead of silently changing, say, the model name.

Codebook hashes are compared on their first 16 hex chars (64 bits): `StreamHeader` lower-cases
and truncates the hash it is given, and `StreamHeader.matches_codebook` compares a full hash.

`read_header` checks the whole container (magic, version, lengths, CRC, field ranges, section
sizes) without decoding the payload, so the gateway can reject a request before queuing it.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np

from .bitpack import MAX_CODEBOOK_SIZE, bits_for, pack_indices, packed_size, unpack_indices
from .entropy import rans_decode, rans_encode
from .errors import (
    CorruptStreamError,
    EntropyModelError,
    IndexRangeError,
    TruncatedStreamError,
    UnsupportedVersionError,
)
from .ranking import NeighbourRanks

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "DecodedStream",
    "StreamHeader",
    "decode_stream",
    "encode_stream",
    "header_bytes",
    "read_header",
]

MAGIC = b"AVQ"
FORMAT_VERSION = 1
MAX_MODEL_NAME_BYTES = 48
HASH_HEX_CHARS = 16  # 8 bytes on the wire

_PREFIX = struct.Struct(">3sBB")  # magic, version, model name length
_FIELDS = struct.Struct(">8sBBHBBHBBII")  # hash .. CRC, see the table above
_CRC_SIZE = 4
_SPLIT_KINDS = {"embed": 0, "preln": 1, "block": 2}
_SPLIT_NAMES = {code: name for name, code in _SPLIT_KINDS.items()}
_CODERS = {"packed": 0, "rans": 1, "ranked": 2}
_CODER_NAMES = {code: name for name, code in _CODERS.items()}
_BLOCK_SITE = re.compile(r"block:([1-9][0-9]*)")
_HEX = re.compile(r"[0-9a-f]+")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def _parse_split_site(split_site: str) -> tuple[int, int]:
    """`split_site` -> (kind code, k); ValueError if it is not embed, preln or block:k (0<k<256)."""
    if split_site in ("embed", "preln"):
        return _SPLIT_KINDS[split_site], 0
    match = _BLOCK_SITE.fullmatch(split_site)
    if match is None or int(match.group(1)) > 255:
        raise ValueError(
            f"split_site must be 'embed', 'preln' or 'block:k' with 0 < k < 256, got {split_site!r}"
        )
    return _SPLIT_KINDS["block"], int(match.group(1))


@dataclass(frozen=True)
class StreamHeader:
    """Everything the cloud needs to interpret a feature stream, validated on construction.

    `codebook_hash` is stored as its first 16 hex chars, lower-cased. `coder` records how the index
    section is coded; `encode_stream` chooses it (see there).
    """

    model: str
    codebook_hash: str
    split_site: str
    tokens: int
    groups: int
    stages: int
    codebook_size: int
    coder: str = "packed"
    stat_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty str, got {self.model!r}")
        if len(self.model.encode("utf-8")) > MAX_MODEL_NAME_BYTES:
            raise ValueError(
                f"model name must be at most {MAX_MODEL_NAME_BYTES} utf-8 bytes, "
                f"got {len(self.model.encode('utf-8'))} ({self.model!r})"
            )
        digest = self.codebook_hash.lower() if isinstance(self.codebook_hash, str) else ""
        if len(digest) < HASH_HEX_CHARS or not _HEX.fullmatch(digest):
            raise ValueError(
                f"codebook_hash must be a hex string of at least {HASH_HEX_CHARS} chars, "
                f"got {self.codebook_hash!r}"
            )
        object.__setattr__(self, "codebook_hash", digest[:HASH_HEX_CHARS])
        if not isinstance(self.split_site, str):
            raise ValueError(f"split_site must be a str, got {type(self.split_site).__name__}")
        _parse_split_site(self.split_site)
        for name, low, high in (
            ("tokens", 1, 0xFFFF),
            ("groups", 1, 0xFF),
            ("stages", 1, 0xFF),
            ("codebook_size", 2, MAX_CODEBOOK_SIZE),
            ("stat_bits", 0, 16),
        ):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), low, high))
        if self.coder not in _CODERS:
            raise ValueError(f"coder must be one of {sorted(_CODERS)}, got {self.coder!r}")

    @property
    def bits_per_index(self) -> int:
        return bits_for(self.codebook_size)

    @property
    def index_count(self) -> int:
        """tokens * groups * stages."""
        return self.tokens * self.groups * self.stages

    @property
    def bits_per_token(self) -> int:
        """Nominal (packed) bits per token: groups * stages * bits_per_index + 2 * stat_bits."""
        return self.groups * self.stages * self.bits_per_index + 2 * self.stat_bits

    @property
    def nbytes(self) -> int:
        """Bytes taken by this header on the wire."""
        return _PREFIX.size + len(self.model.encode("utf-8")) + _FIELDS.size

    def matches_codebook(self, codebook_hash: str) -> bool:
        """Whether a full hex `codebook_hash` starts with this header's 16-char prefix."""
        return codebook_hash.lower()[:HASH_HEX_CHARS] == self.codebook_hash


@dataclass(frozen=True, eq=False)
class DecodedStream:
    """A decoded stream: `indices` `(tokens, groups, stages)` uint16, `stats` `(tokens, 2)` or None."""

    header: StreamHeader
    indices: np.ndarray
    stats: np.ndarray | None


def _stats_size(header: StreamHeader) -> int:
    return packed_size(header.tokens * 2, header.stat_bits) if header.stat_bits else 0


def header_bytes(header: StreamHeader, payload: bytes) -> bytes:
    """The header for `payload`, CRC included (public so tools and tests can frame a payload they built)."""
    name = header.model.encode("utf-8")
    kind, k = _parse_split_site(header.split_site)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(name)) + name
    fields = _FIELDS.pack(
        bytes.fromhex(header.codebook_hash),
        kind,
        k,
        header.tokens,
        header.groups,
        header.stages,
        header.codebook_size - 1,
        _CODERS[header.coder],
        header.stat_bits,
        len(payload),
        0,
    )[:-_CRC_SIZE]
    crc = zlib.crc32(payload, zlib.crc32(prefix + fields))
    return prefix + fields + crc.to_bytes(_CRC_SIZE, "big")


def _parse(data: bytes) -> tuple[StreamHeader, memoryview]:
    """Validate the container and return its header and payload (not decoded)."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise TruncatedStreamError(f"expected at least {_PREFIX.size} bytes of header, got {len(view)}")
    magic, version, name_size = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptStreamError(f"expected magic {MAGIC!r}, got {magic!r}: not an AlignedVQ feature stream")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"expected stream format version {FORMAT_VERSION}, got version {version}"
        )
    header_size = _PREFIX.size + name_size + _FIELDS.size
    if len(view) < header_size:
        raise TruncatedStreamError(f"expected at least {header_size} bytes of header, got {len(view)}")
    (digest, kind, k, tokens, groups, stages, size_minus_one, coder, stat_bits, payload_size, crc) = (
        _FIELDS.unpack_from(view, _PREFIX.size + name_size)
    )
    if len(view) < header_size + payload_size:
        raise TruncatedStreamError(f"expected {header_size + payload_size} bytes, got {len(view)}")
    if len(view) > header_size + payload_size:
        raise CorruptStreamError(
            f"expected {header_size + payload_size} bytes, got {len(view)} "
            f"({len(view) - header_size - payload_size} trailing bytes)"
        )
    payload = view[header_size:]
    actual_crc = zlib.crc32(payload, zlib.crc32(view[: header_size - _CRC_SIZE]))
    if actual_crc != crc:
        raise CorruptStreamError(f"expected CRC32 {crc:08x}, got {actual_crc:08x}: the stream was altered")

    # From here on the bytes are as sent; what remains to catch is a well-formed but invalid header.
    try:
        model = bytes(view[_PREFIX.size : _PREFIX.size + name_size]).decode("utf-8")
        if kind not in _SPLIT_NAMES or (kind != _SPLIT_KINDS["block"] and k != 0):
            raise ValueError(f"split kind must be 0, 1 or 2 (with k = 0 unless 2), got kind {kind}, k {k}")
        if coder not in _CODER_NAMES:
            raise ValueError(f"coder must be 0 (packed), 1 (rans) or 2 (ranked), got {coder}")
        header = StreamHeader(
            model=model,
            codebook_hash=digest.hex(),
            split_site=f"block:{k}" if kind == _SPLIT_KINDS["block"] else _SPLIT_NAMES[kind],
            tokens=tokens,
            groups=groups,
            stages=stages,
            codebook_size=size_minus_one + 1,
            coder=_CODER_NAMES[coder],
            stat_bits=stat_bits,
        )
    except (UnicodeDecodeError, ValueError) as error:
        raise CorruptStreamError(f"invalid stream header: {error}") from error

    index_size = payload_size - _stats_size(header)
    packed = packed_size(header.index_count, header.bits_per_index)
    if header.coder == "packed" and index_size != packed:
        raise CorruptStreamError(
            f"expected {packed} bytes of packed indices "
            f"({header.index_count} x {header.bits_per_index} bits), got {index_size}"
        )
    if header.coder != "packed" and not 0 < index_size < packed:
        raise CorruptStreamError(
            f"expected 1..{packed - 1} bytes of rANS-coded indices (fewer than packing), got {index_size}"
        )
    return header, payload


def read_header(data: bytes) -> StreamHeader:
    """Validate a stream's container (magic, version, lengths, CRC, fields) and return its header.

    Does not decode the index section; cheap enough to run on every request before queuing it.
    """
    return _parse(data)[0]


def encode_stream(
    header: StreamHeader,
    indices: np.ndarray,
    stats: np.ndarray | None = None,
    *,
    freqs: np.ndarray | None = None,
    ranking: NeighbourRanks | None = None,
    entropy: bool = True,
) -> bytes:
    """Encode indices `(tokens, groups, stages)` and optional stats `(tokens, 2)` as a stream.

    `header.coder` is not read: with `entropy` and a frequency table `freqs` `(groups, stages, K)`
    the indices (or, given `ranking`, their neighbour ranks, which `freqs` then counts) are rANS
    coded when that is strictly smaller than packing, otherwise packed; the written header records
    the coder used (see `read_header`). `stats` are required exactly when
    `header.stat_bits > 0` and hold values in [0, 2**stat_bits).
    """
    indices = np.asarray(indices)
    expected = (header.tokens, header.groups, header.stages)
    if indices.shape != expected or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"expected integer indices of shape {expected}, got {indices.dtype} {indices.shape}")
    if indices.min() < 0 or indices.max() >= header.codebook_size:
        position = tuple(int(i) for i in np.argwhere((indices < 0) | (indices >= header.codebook_size))[0])
        raise IndexRangeError(
            f"expected indices in [0, {header.codebook_size}), got {int(indices[position])} "
            f"at (token, group, stage) {position}"
        )
    stats_bytes = _encode_stats(header, stats)

    index_bytes = pack_indices(indices, header.bits_per_index)
    coder = "packed"
    if entropy and freqs is not None:
        table_shape = (header.groups, header.stages, header.codebook_size)
        if np.shape(freqs) != table_shape:
            raise ValueError(f"expected a frequency table of shape {table_shape}, got {np.shape(freqs)}")
        symbols = indices if ranking is None else ranking.ranks(indices)
        coded = rans_encode(symbols, freqs)
        if len(coded) < len(index_bytes):
            index_bytes, coder = coded, "rans" if ranking is None else "ranked"
    payload = index_bytes + stats_bytes
    return header_bytes(replace(header, coder=coder), payload) + payload


def _encode_stats(header: StreamHeader, stats: np.ndarray | None) -> bytes:
    if header.stat_bits == 0:
        if stats is not None:
            raise ValueError("got stats, but header.stat_bits is 0 (no statistics section)")
        return b""
    if stats is None:
        raise ValueError(
            f"expected stats of shape ({header.tokens}, 2) since stat_bits is {header.stat_bits}"
        )
    stats = np.asarray(stats)
    if stats.shape != (header.tokens, 2) or not np.issubdtype(stats.dtype, np.integer):
        raise ValueError(
            f"expected integer stats of shape ({header.tokens}, 2), got {stats.dtype} {stats.shape}"
        )
    bound = 1 << header.stat_bits
    if stats.min() < 0 or stats.max() >= bound:
        token, column = (int(i) for i in np.argwhere((stats < 0) | (stats >= bound))[0])
        raise IndexRangeError(
            f"expected statistics in [0, {bound}) for stat_bits {header.stat_bits}, "
            f"got {int(stats[token, column])} at token {token}, column {column}"
        )
    return pack_indices(stats, header.stat_bits)


def decode_stream(
    data: bytes,
    freqs: np.ndarray | None = None,
    ranking: NeighbourRanks | None = None,
    *,
    resolve_ranks: bool = True,
) -> DecodedStream:
    """Inverse of `encode_stream`. `freqs` `(groups, stages, K)` is needed for rANS-coded streams,
    and `ranking` as well for ranked ones. With `resolve_ranks=False` a ranked stream is checked
    completely (every rank decodes, the coder ends in its initial state) but its `indices` hold the
    ranks: every rank maps to a valid index, so a gateway that only validates skips the mapping.

    Raises a `BitstreamError` subclass for a malformed stream, `EntropyModelError` for a rANS
    stream without a matching table (or ranking) and `IndexRangeError` for indices >= codebook_size.
    """
    header, payload = _parse(data)
    stats_size = _stats_size(header)
    index_section = bytes(payload[: len(payload) - stats_size])
    if header.coder == "packed":
        indices = unpack_indices(index_section, header.bits_per_index, header.index_count)
        indices = indices.reshape(header.tokens, header.groups, header.stages)
    else:
        table_shape = (header.groups, header.stages, header.codebook_size)
        if freqs is None or np.shape(freqs) != table_shape:
            got = "none" if freqs is None else f"shape {np.shape(freqs)}"
            raise EntropyModelError(
                f"expected a frequency table of shape {table_shape} for this rANS stream, got {got}"
            )
        expected_ranks = (header.tokens, header.groups, header.stages)
        if header.coder == "rans" and ranking is not None:
            raise EntropyModelError("this codebook's table counts neighbour ranks: expected a ranked stream")
        if header.coder == "ranked" and (ranking is None or ranking.shape != expected_ranks):
            raise EntropyModelError(
                f"expected a neighbour ranking of shape {expected_ranks} for this ranked stream, "
                f"got {'none' if ranking is None else ranking.shape}"
            )
        try:
            indices = rans_decode(index_section, freqs, header.tokens)
        except TruncatedStreamError as error:  # the container length was right, so the content is wrong
            raise CorruptStreamError(f"inconsistent rANS index section: {error}") from error
        if header.coder == "ranked" and resolve_ranks:
            assert ranking is not None  # a ranked stream without a ranking was refused above
            indices = ranking.indices(indices)
    if indices.max() >= header.codebook_size:
        position = tuple(int(i) for i in np.argwhere(indices >= header.codebook_size)[0])
        raise IndexRangeError(
            f"expected indices in [0, {header.codebook_size}), got {int(indices[position])} "
            f"at (token, group, stage) {position}"
        )
    stats = None
    if header.stat_bits:
        stats_section = bytes(payload[len(payload) - stats_size :])
        stats = unpack_indices(stats_section, header.stat_bits, header.tokens * 2).reshape(header.tokens, 2)
    return DecodedStream(header=header, indices=indices, stats=stats)
