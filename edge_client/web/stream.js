// The feature stream, byte for byte as edge_client/bitstream.py writes it (see its table):
//
//   "AVQ" | version 1 | n | model name (n bytes, utf-8) | codebook hash (8 bytes) | split kind |
//   split k | tokens u16 | groups u8 | stages u8 | K - 1 u16 | coder u8 | stat_bits u8 |
//   payload length u32 | CRC32 (header before it, then payload) u32        all big-endian
//
// then the index section (bit-packed MSB first at bits_for(K) bits, or rANS: edge_client/entropy.py)
// and, with stat_bits, the (tokens, 2) statistics packed at stat_bits each.

import { IndexRangeError } from "./errors.js";

export const MAGIC = [0x41, 0x56, 0x51]; // "AVQ"
export const FORMAT_VERSION = 1;
export const CODERS = { packed: 0, rans: 1, ranked: 2 };
const CODER_NAMES = ["packed", "rans", "ranked"];
const SPLIT_KINDS = { embed: 0, preln: 1, block: 2 };
const FIELDS_SIZE = 26; // hash .. CRC

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** zlib's crc32 of `bytes`, continuing from `crc` (0 to start). */
export function crc32(bytes, crc = 0) {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Bytes of `count` values at `bits` bits each. */
export function packedSize(count, bits) {
  return Math.ceil((count * bits) / 8);
}

/** Pack integer `values` (any array) at `bits` bits each, most significant bit first. */
export function packIndices(values, bits) {
  const out = new Uint8Array(packedSize(values.length, bits));
  const bound = 2 ** bits;
  let acc = 0; // pending bits, fewer than 8 + 16
  let filled = 0;
  let at = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!(v >= 0 && v < bound) || !Number.isInteger(v)) {
      throw new IndexRangeError(`expected indices in [0, ${bound}) for ${bits}-bit packing, got ${v} at flat position ${i}`);
    }
    acc = acc * bound + v;
    filled += bits;
    while (filled >= 8) {
      filled -= 8;
      const byte = Math.floor(acc / 2 ** filled);
      out[at++] = byte;
      acc -= byte * 2 ** filled;
    }
  }
  if (filled) out[at] = acc * 2 ** (8 - filled);
  return out;
}

const PRECISION = 24;
const TOTAL = 2 ** PRECISION;
const STATE_LOW = 2 ** 32;

/**
 * rANS-code `symbols` (a flat array in (token, group, stage) order) with per-(group, stage) rows:
 * `freqs[m]` and `starts[m]` for model m = flat position mod models. Returns the stream bytes:
 * the final 40-bit state big-endian, then the emitted bytes in reverse order (entropy.py). The
 * state stays below 2**40, so doubles hold it exactly.
 */
export function ransEncode(symbols, freqs, starts, models) {
  let state = STATE_LOW;
  let emitted = new Uint8Array(Math.max(64, symbols.length * 3));
  let count = 0;
  for (let i = symbols.length - 1; i >= 0; i--) {
    const m = i % models;
    const symbol = symbols[i];
    const freq = freqs[m][symbol];
    const start = starts[m][symbol];
    const stateMax = freq * 65536; // freq << (32 - 24 + 8)
    while (state >= stateMax) {
      if (count === emitted.length) {
        const bigger = new Uint8Array(emitted.length * 2);
        bigger.set(emitted);
        emitted = bigger;
      }
      const low = state % 256;
      emitted[count++] = low;
      state = (state - low) / 256;
    }
    const quotient = Math.floor(state / freq);
    state = quotient * TOTAL + (state - quotient * freq) + start;
  }
  const out = new Uint8Array(5 + count);
  let s = state;
  for (let b = 4; b >= 0; b--) {
    const low = s % 256;
    out[b] = low;
    s = (s - low) / 256;
  }
  for (let i = 0; i < count; i++) out[5 + i] = emitted[count - 1 - i];
  return out;
}

function splitKind(site) {
  if (site === "embed" || site === "preln") return [SPLIT_KINDS[site], 0];
  return [SPLIT_KINDS.block, Number(site.slice("block:".length))];
}

/** The header bytes for `payload` (CRC included). `header`: model, codebookHash, splitSite,
 * tokens, groups, stages, codebookSize, coder (name), statBits. */
export function headerBytes(header, payload) {
  const name = new TextEncoder().encode(header.model);
  const out = new Uint8Array(5 + name.length + FIELDS_SIZE);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  out[3] = FORMAT_VERSION;
  out[4] = name.length;
  out.set(name, 5);
  let at = 5 + name.length;
  for (let i = 0; i < 8; i++) out[at + i] = parseInt(header.codebookHash.slice(2 * i, 2 * i + 2), 16);
  at += 8;
  const [kind, k] = splitKind(header.splitSite);
  out[at] = kind;
  out[at + 1] = k;
  view.setUint16(at + 2, header.tokens);
  out[at + 4] = header.groups;
  out[at + 5] = header.stages;
  view.setUint16(at + 6, header.codebookSize - 1);
  out[at + 8] = CODERS[header.coder];
  out[at + 9] = header.statBits;
  view.setUint32(at + 10, payload.length);
  const crc = crc32(payload, crc32(out.subarray(0, at + 14)));
  view.setUint32(at + 14, crc);
  return out;
}

/** header + payload as one Uint8Array. */
export function assemble(header, payload) {
  const head = headerBytes(header, payload);
  const out = new Uint8Array(head.length + payload.length);
  out.set(head, 0);
  out.set(payload, head.length);
  return out;
}

/** The fixed fields of a stream's header (no CRC or payload check: the gateway does those). */
export function readHeader(stream) {
  if (stream.length < 5 || stream[0] !== MAGIC[0] || stream[1] !== MAGIC[1] || stream[2] !== MAGIC[2]) {
    throw new Error("expected an AlignedVQ feature stream (magic AVQ)");
  }
  const n = stream[4];
  const at = 5 + n;
  if (stream.length < at + FIELDS_SIZE) throw new Error(`expected at least ${at + FIELDS_SIZE} bytes of header, got ${stream.length}`);
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const kind = stream[at + 8];
  const k = stream[at + 9];
  let hash = "";
  for (let i = 0; i < 8; i++) hash += stream[at + i].toString(16).padStart(2, "0");
  return {
    model: new TextDecoder().decode(stream.subarray(5, at)),
    codebookHash: hash,
    splitSite: kind === 2 ? `block:${k}` : kind === 1 ? "preln" : "embed",
    tokens: view.getUint16(at + 10),
    groups: stream[at + 12],
    stages: stream[at + 13],
    codebookSize: view.getUint16(at + 14) + 1,
    coder: CODER_NAMES[stream[at + 16]],
    statBits: stream[at + 17],
    payloadBytes: view.getUint32(at + 18),
    nbytes: at + FIELDS_SIZE,
  };
}
