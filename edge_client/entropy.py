"""Optional static entropy coding of code indices: rANS over fixed integer frequency tables.

A frequency table holds one row of K integer frequencies per codebook, shape `(groups, stages, K)`,
computed once from index counts on a calibration set and shipped with the codebook. Every row
sums to exactly `2**PRECISION` and every entry is >= 1, so any index stays encodable.

PRECISION is 24 for every codebook size: K <= 65536 = 2**16 leaves at least 2**24 - 2**16 of the
total to distribute by counts, and 24 bits still lets the coder state below stay a 40-bit integer.

Why a hand-written coder and not `constriction`: constriction's Python models take floating-point
probabilities and quantize them with an internal, version-dependent algorithm; no documented entry
point takes exact integer frequencies. Edge and cloud must agree on every frequency bit-for-bit,
or the cloud decodes wrong indices without noticing, so the format is specified here instead and
uses only Python integers (identical on every platform).

The coder is byte-wise rANS (Duda 2013; layout as in ryg_rans):

- state `x` lives in [L, 256 L) with L = 2**32, so it fits in 40 bits;
- encoding symbol with frequency `f` and cumulative start `c`: while x >= f * 2**16, emit the low
  byte of x and shift it out; then x = (x // f) * 2**24 + (x % f) + c;
- symbols are encoded in reverse order, starting from x = L; the stream is the final state as
  5 big-endian bytes followed by the emitted bytes in reverse order of emission;
- decoding runs forward: slot = x mod 2**24 selects the symbol s with c_s <= slot < c_s + f_s,
  x = f_s * (x >> 24) + slot - c_s, then bytes are shifted in while x < L.

Model order: symbols are taken token-major, then group, then stage (C order of a
`(tokens, groups, stages)` array); position (t, g, s) uses row `freqs[g, s]`. After the last symbol
the decoder must be back at x = L with every byte consumed; anything else raises
CorruptStreamError, so most corruption is caught here as well as by the stream CRC.
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_right

import numpy as np

from .bitpack import MAX_CODEBOOK_SIZE
from .errors import CorruptStreamError, IndexRangeError, TruncatedStreamError

__all__ = ["PRECISION", "normalize_freqs", "rans_decode", "rans_encode", "table_hash"]

PRECISION = 24
_TOTAL = 1 << PRECISION
_STATE_LOW = 1 << 32  # L: lower bound of the normalised state interval [L, 256 L)
_STATE_BYTES = 5  # the state is < 2**40
_SLOT_MASK = _TOTAL - 1
_RENORM_FACTOR_SHIFT = 32 - PRECISION + 8  # x_max(f) = (L >> PRECISION << 8) * f = f << 16
_MAX_COUNT_SUM = 1 << 38  # keeps counts * (2**24 - K) below 2**63 in int64 arithmetic


def normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """Turn index counts `(groups, stages, K)` into a frequency table `(groups, stages, K)` uint32.

    Each entry is 1 plus its share of the remaining `2**24 - K`, proportional to its count, rounded
    down; the rounding leftover goes one unit each to the largest remainders (lowest index first
    on ties). A row of all zero counts becomes (nearly) uniform. Integer arithmetic only, so every
    platform computes the same table.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"expected counts of shape (groups, stages, K), got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise TypeError(f"expected integer counts, got dtype {counts.dtype}")
    groups, stages, size = counts.shape
    if not 2 <= size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"expected a codebook size K in 2..{MAX_CODEBOOK_SIZE}, got {size}")
    if groups < 1 or stages < 1:
        raise ValueError(f"expected at least one group and stage, got shape {counts.shape}")
    if counts.min() < 0:
        raise ValueError(f"expected non-negative counts, got {counts.min()}")
    if counts.max() >= _MAX_COUNT_SUM:
        raise ValueError(f"expected counts below 2**38, got {counts.max()}")
    rows = counts.reshape(-1, size).astype(np.int64)
    sums = rows.sum(axis=1)
    if sums.max() >= _MAX_COUNT_SUM:
        raise ValueError(f"expected each row of counts to sum below 2**38, got {sums.max()}")

    free = _TOTAL - size
    out = np.empty_like(rows)
    for row, (count_row, total) in enumerate(zip(rows, sums.tolist(), strict=True)):
        if total == 0:
            count_row = np.ones(size, dtype=np.int64)
            total = size
        scaled = count_row * free
        share, remainder = scaled // total, scaled % total
        leftover = free - int(share.sum())  # < K because each row lost less than 1 per entry
        # Largest remainder first, lower index first among equals (lexsort: last key is primary).
        order = np.lexsort((np.arange(size), -remainder))
        share[order[:leftover]] += 1
        out[row] = share + 1
    return out.reshape(groups, stages, size).astype(np.uint32)


def _check_table(freqs: np.ndarray) -> np.ndarray:
    """Validate a normalised frequency table and return it as uint32 `(groups, stages, K)`."""
    freqs = np.asarray(freqs)
    if freqs.ndim != 3:
        raise ValueError(f"expected a frequency table of shape (groups, stages, K), got {freqs.shape}")
    if not np.issubdtype(freqs.dtype, np.integer):
        raise TypeError(f"expected an integer frequency table, got dtype {freqs.dtype}")
    groups, stages, size = freqs.shape
    if groups < 1 or stages < 1 or not 2 <= size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"expected groups, stages >= 1 and K in 2..{MAX_CODEBOOK_SIZE}, got {freqs.shape}")
    if freqs.min() < 1:
        raise ValueError(f"expected every frequency >= 1, got {freqs.min()}")
    sums = freqs.reshape(-1, size).astype(np.int64).sum(axis=1)
    if (sums != _TOTAL).any():
        bad = int(np.flatnonzero(sums != _TOTAL)[0])
        raise ValueError(
            f"expected every row to sum to 2**{PRECISION} = {_TOTAL} (use normalize_freqs), "
            f"got {int(sums[bad])} in row {bad}"
        )
    return freqs.astype(np.uint32, copy=False)


def table_hash(freqs: np.ndarray) -> str:
    """sha256 hex digest of a frequency table's canonical bytes.

    Canonical bytes: b"AVQF", PRECISION as u8, groups u8, stages u8, K u32 (big-endian), then the
    table as big-endian u32 in C order.
    """
    freqs = _check_table(freqs)
    groups, stages, size = freqs.shape
    prefix = struct.pack(">4sBBBI", b"AVQF", PRECISION, groups, stages, size)
    return hashlib.sha256(prefix + freqs.astype(">u4").tobytes()).hexdigest()


def _starts(freqs: np.ndarray) -> np.ndarray:
    """Cumulative start of each symbol, `(groups * stages, K)` int64."""
    rows = freqs.reshape(-1, freqs.shape[-1]).astype(np.int64)
    return np.cumsum(rows, axis=1) - rows


def rans_encode(indices: np.ndarray, freqs: np.ndarray) -> bytes:
    """Entropy-code indices `(tokens, groups, stages)` with the table `freqs` `(groups, stages, K)`."""
    freqs = _check_table(freqs)
    groups, stages, size = freqs.shape
    indices = np.asarray(indices)
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"expected integer indices, got dtype {indices.dtype}")
    if indices.ndim != 3 or indices.shape[1:] != (groups, stages):
        raise ValueError(f"expected indices of shape (tokens, {groups}, {stages}), got {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        token, group, stage = (int(i) for i in np.argwhere((indices < 0) | (indices >= size))[0])
        raise IndexRangeError(
            f"expected indices in [0, {size}), got {int(indices[token, group, stage])} "
            f"at token {token}, group {group}, stage {stage}"
        )
    flat = indices.reshape(indices.shape[0], groups * stages).astype(np.int64)
    models = np.arange(groups * stages)[None, :]
    symbol_freqs = freqs.reshape(groups * stages, size).astype(np.int64)[models, flat].reshape(-1).tolist()
    symbol_starts = _starts(freqs)[models, flat].reshape(-1).tolist()

    state = _STATE_LOW
    emitted = bytearray()
    for freq, start in zip(reversed(symbol_freqs), reversed(symbol_starts), strict=True):
        state_max = freq << _RENORM_FACTOR_SHIFT
        while state >= state_max:
            emitted.append(state & 0xFF)
            state >>= 8
        quotient, remainder = divmod(state, freq)
        state = (quotient << PRECISION) + remainder + start
    emitted.reverse()
    return state.to_bytes(_STATE_BYTES, "big") + bytes(emitted)


def rans_decode(data: bytes, freqs: np.ndarray, tokens: int) -> np.ndarray:
    """Inverse of `rans_encode`: indices `(tokens, groups, stages)` uint16.

    Raises TruncatedStreamError if the bytes run out before `tokens` tokens are decoded and
    CorruptStreamError if the state is invalid or bytes are left over at the end.
    """
    freqs = _check_table(freqs)
    groups, stages, size = freqs.shape
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
        raise ValueError(f"expected a non-negative token count, got {tokens!r}")
    data = bytes(data)
    if len(data) < _STATE_BYTES:
        raise TruncatedStreamError(f"expected at least {_STATE_BYTES} bytes of rANS state, got {len(data)}")
    state = int.from_bytes(data[:_STATE_BYTES], "big")
    if state < _STATE_LOW:
        raise CorruptStreamError(f"expected an initial rANS state >= 2**32, got {state}")

    model_freqs = freqs.reshape(groups * stages, size).tolist()
    model_starts = _starts(freqs).tolist()
    models = list(zip(model_freqs, model_starts, strict=True))
    out = np.empty(int(tokens) * groups * stages, dtype=np.uint16)
    position, end = _STATE_BYTES, len(data)
    for i in range(out.size):
        freq_row, start_row = models[i % len(models)]
        slot = state & _SLOT_MASK
        symbol = bisect_right(start_row, slot) - 1
        state = freq_row[symbol] * (state >> PRECISION) + slot - start_row[symbol]
        while state < _STATE_LOW:
            if position == end:
                raise TruncatedStreamError(
                    f"rANS data ended after {end} bytes with {out.size - i} of {out.size} symbols to go"
                )
            state = (state << 8) | data[position]
            position += 1
        out[i] = symbol
    if position != end:
        raise CorruptStreamError(f"expected {position} bytes of rANS data, got {end}")
    if state != _STATE_LOW:
        raise CorruptStreamError(
            "rANS data did not decode back to the initial state (corrupt or wrong table)"
        )
    return out.reshape(int(tokens), groups, stages)
