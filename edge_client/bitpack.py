"""Dense bit packing of code indices: `bits` bits per index, MSB first, no per-value padding.

The values are laid out one after another as a big-endian bit string (the most significant bit of
the first index is the most significant bit of byte 0); the last byte is padded with zero bits.
LLaVA-1.5 at `preln` with one 4096-entry codebook: 577 indices x 12 bits = 6924 bits = 866 bytes.

Both directions are vectorised through `np.unpackbits`/`np.packbits` on a big-endian `uint16`
view, so packing 577 indices takes tens of microseconds.
"""

from __future__ import annotations

import numpy as np

from .errors import CorruptStreamError, IndexRangeError, TruncatedStreamError

__all__ = ["MAX_BITS", "MAX_CODEBOOK_SIZE", "bits_for", "pack_indices", "packed_size", "unpack_indices"]

MAX_BITS = 16  # indices travel as uint16; 2**16 entries is more than any codebook we train
MAX_CODEBOOK_SIZE = 1 << MAX_BITS


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """Return `value` as an int in [low, high], or raise ValueError/TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def bits_for(codebook_size: int) -> int:
    """Bits needed to address `codebook_size` entries: ceil(log2 K), at least 1. K in 2..65536."""
    codebook_size = _check_int("codebook_size", codebook_size, 2, MAX_CODEBOOK_SIZE)
    return max(1, (codebook_size - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by `count` values of `bits` bits each: ceil(count * bits / 8)."""
    count = _check_int("count", count, 0, 1 << 40)
    bits = _check_int("bits", bits, 1, MAX_BITS)
    return (count * bits + 7) // 8


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Pack an integer array of any shape (flattened in C order) at `bits` bits per value.

    Raises IndexRangeError naming the first value outside [0, 2**bits).
    """
    bits = _check_int("bits", bits, 1, MAX_BITS)
    values = np.asarray(indices)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"indices must have an integer dtype, got {values.dtype}")
    values = values.reshape(-1)
    bound = 1 << bits
    if values.size and (values.min() < 0 or values.max() >= bound):
        position = int(np.flatnonzero((values < 0) | (values >= bound))[0])
        raise IndexRangeError(
            f"expected indices in [0, {bound}) for {bits}-bit packing, "
            f"got {int(values[position])} at flat position {position}"
        )
    # (count, 16) bit matrix of the big-endian uint16 values; keep the low `bits` columns.
    as_bytes = values.astype(">u2").view(np.uint8).reshape(-1, 2)
    bit_matrix = np.unpackbits(as_bytes, axis=1)[:, MAX_BITS - bits :]
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_indices(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_indices`: `(count,)` uint16 values from exactly `packed_size(count, bits)` bytes.

    Raises TruncatedStreamError if `data` is shorter, CorruptStreamError if it is longer or if the
    padding bits of the last byte are not zero.
    """
    bits = _check_int("bits", bits, 1, MAX_BITS)
    expected = packed_size(count, bits)
    if len(data) < expected:
        raise TruncatedStreamError(
            f"expected {expected} bytes for {count} {bits}-bit indices, got {len(data)}"
        )
    if len(data) > expected:
        raise CorruptStreamError(f"expected {expected} bytes for {count} {bits}-bit indices, got {len(data)}")
    bit_string = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    used = count * bits
    if bit_string[used:].any():
        raise CorruptStreamError(f"expected zero padding after {used} bits, got non-zero padding bits")
    bit_matrix = np.zeros((count, MAX_BITS), dtype=np.uint8)
    bit_matrix[:, MAX_BITS - bits :] = bit_string[:used].reshape(count, bits)
    return np.packbits(bit_matrix, axis=1).view(">u2").reshape(count).astype(np.uint16)
