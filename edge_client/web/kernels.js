// The codec's numeric kernels and the memory they work in.
//
// kernels.wat (WebAssembly SIMD, assembled into kernels.wasm.js by `make wasm`) does the heavy
// loops; this module compiles it synchronously (it is 1.5 KB, under every browser's limit for
// main-thread compilation), owns its linear memory through a small first-fit allocator, and holds
// a plain-JS twin of every kernel, used where WebAssembly SIMD is unavailable (or forced with
// `setBackend("js")`). The twins compute bit-identical results: the same float32 operations in
// the same order (gemm, argmin) or exact integer arithmetic (rank distances, counts).
//
// Pointers are byte offsets, 16-byte aligned. Views (`f32()`, `i32()`, ...) must be re-read after
// any `alloc`: growing the memory replaces its buffer.

import wasmBase64 from "./kernels.wasm.js";

const PAGE = 65536;
const ALIGN = 16;

function decodeBase64(text) {
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

function instantiate() {
  try {
    if (typeof WebAssembly !== "object") return null;
    const module = new WebAssembly.Module(decodeBase64(wasmBase64));
    return new WebAssembly.Instance(module, {}).exports;
  } catch {
    return null; // no SIMD support, or a CSP without 'wasm-unsafe-eval': the JS twins take over
  }
}

const wasm = instantiate();

/** Growable memory: the wasm module's own, or a plain ArrayBuffer copied on growth. */
class Memory {
  constructor() {
    if (wasm) {
      this.wasm = wasm.memory;
    } else {
      this.plain = new ArrayBuffer(16 * PAGE);
    }
    this._views = null;
  }

  get buffer() {
    return this.wasm ? this.wasm.buffer : this.plain;
  }

  grow(pages) {
    if (this.wasm) {
      this.wasm.grow(pages);
    } else {
      const bigger = new ArrayBuffer(this.plain.byteLength + pages * PAGE);
      new Uint8Array(bigger).set(new Uint8Array(this.plain));
      this.plain = bigger;
    }
  }

  views() {
    const buffer = this.buffer;
    if (this._views === null || this._views.buffer !== buffer) {
      this._views = {
        buffer,
        u8: new Uint8Array(buffer),
        i16: new Int16Array(buffer),
        i32: new Int32Array(buffer),
        f32: new Float32Array(buffer),
      };
    }
    return this._views;
  }
}

const memory = new Memory();
// First-fit free list of [offset, size] blocks, sorted by offset; offset 0 stays unused (null).
const free = [[ALIGN, memory.buffer.byteLength - ALIGN]];
const sizes = new Map();

/** Allocate `bytes` (zero-filled), 16-byte aligned; returns the byte offset. */
export function alloc(bytes) {
  const size = Math.max(ALIGN, Math.ceil(bytes / ALIGN) * ALIGN);
  for (;;) {
    for (let i = 0; i < free.length; i++) {
      const [offset, room] = free[i];
      if (room >= size) {
        if (room === size) free.splice(i, 1);
        else free[i] = [offset + size, room - size];
        sizes.set(offset, size);
        memory.views().u8.fill(0, offset, offset + size);
        return offset;
      }
    }
    const end = memory.buffer.byteLength;
    const last = free[free.length - 1];
    const tail = last && last[0] + last[1] === end ? last[1] : 0;
    const pages = Math.ceil((size - tail) / PAGE) + 16;
    memory.grow(pages);
    if (tail) last[1] += pages * PAGE;
    else free.push([end, pages * PAGE]);
  }
}

/** Give back a block from `alloc` (0 is ignored). */
export function release(offset) {
  if (!offset) return;
  const size = sizes.get(offset);
  if (size === undefined) throw new Error(`release of unknown block ${offset}`);
  sizes.delete(offset);
  let i = 0;
  while (i < free.length && free[i][0] < offset) i++;
  free.splice(i, 0, [offset, size]);
  if (i + 1 < free.length && offset + size === free[i + 1][0]) {
    free[i][1] += free[i + 1][1];
    free.splice(i + 1, 1);
  }
  if (i > 0 && free[i - 1][0] + free[i - 1][1] === offset) {
    free[i - 1][1] += free[i][1];
    free.splice(i, 1);
  }
}

/** Bytes currently allocated (for tests: every encode must give back its scratch). */
export function allocatedBytes() {
  let total = 0;
  for (const size of sizes.values()) total += size;
  return total;
}

export function views() {
  return memory.views();
}

// ---- plain-JS twins --------------------------------------------------------------------------

const fround = Math.fround;

function gemmJs(a, lda, b, c, ldc, m, k, panels) {
  const f = memory.views().f32;
  const a4 = a >> 2, b4 = b >> 2, c4 = c >> 2;
  const acc = new Float32Array(16);
  for (let p = 0; p < panels; p++) {
    const bp = b4 + p * k * 16;
    for (let i = 0; i < m; i++) {
      acc.fill(0);
      const ai = a4 + i * lda;
      for (let kk = 0; kk < k; kk++) {
        const x = f[ai + kk];
        const row = bp + kk * 16;
        for (let j = 0; j < 16; j++) acc[j] = fround(acc[j] + fround(x * f[row + j]));
      }
      f.set(acc, c4 + i * ldc + p * 16);
    }
  }
}

function argminRowsJs(d, ld, norms, n, m, out) {
  const { f32, i32 } = memory.views();
  const d4 = d >> 2, n4 = norms >> 2, o4 = out >> 2;
  for (let r = 0; r < m; r++) {
    let best = Infinity;
    let index = 0;
    const row = d4 + r * ld;
    for (let j = 0; j < n; j++) {
      const v = fround(f32[row + j] + f32[n4 + j]);
      if (v < best) {
        best = v;
        index = j;
      }
    }
    i32[o4 + r] = index;
  }
}

function rankDistJs(books, norms, s, out, quads, pairs) {
  const { i16, i32 } = memory.views();
  const b2 = books >> 1, n4 = norms >> 2, s4 = s >> 2, o4 = out >> 2;
  const sLow = new Int32Array(pairs);
  const sHigh = new Int32Array(pairs);
  for (let kp = 0; kp < pairs; kp++) {
    const packed = i32[s4 + kp];
    sLow[kp] = (packed << 16) >> 16;
    sHigh[kp] = packed >> 16;
  }
  for (let j = 0; j < quads * 4; j++) {
    const base = b2 + (j >> 2) * pairs * 8 + (j & 3) * 2;
    let dot = 0;
    for (let kp = 0; kp < pairs; kp++) dot += i16[base + kp * 8] * sLow[kp] + i16[base + kp * 8 + 1] * sHigh[kp];
    i32[o4 + j] = i32[n4 + j] - dot;
  }
}

function countLtJs(v, n, x) {
  const i32 = memory.views().i32;
  const v4 = v >> 2;
  let count = 0;
  for (let j = 0; j < n; j++) if (i32[v4 + j] < x) count++;
  return count;
}

// ---- dispatch ----------------------------------------------------------------------------------

let useWasm = wasm !== null;

/** "wasm" (WebAssembly SIMD) or "js" (the plain-JS twins). */
export function backend() {
  return useWasm ? "wasm" : "js";
}

/** Force a backend: "js" always works; "wasm" only where the module compiled. */
export function setBackend(name) {
  if (name === "wasm" && wasm === null) throw new Error("WebAssembly SIMD is not available here");
  if (name !== "wasm" && name !== "js") throw new Error(`expected backend "wasm" or "js", got ${name}`);
  useWasm = name === "wasm";
}

/** C[i, 16p + j] = sum_k A[i, k] B_p[k, j]: A m x k (lda floats a row, m even), B `panels` panels of
 * k x 16 floats, C rows of ldc floats. */
export function gemm(a, lda, b, c, ldc, m, k, panels) {
  if (useWasm) wasm.gemm(a, lda, b, c, ldc, m, k, panels);
  else gemmJs(a, lda, b, c, ldc, m, k, panels);
}

/** out[r] = argmin_j (D[r, j] + norms[j]) in float32, first index on ties; n a multiple of 4. */
export function argminRows(d, ld, norms, n, m, out) {
  if (useWasm) wasm.argmin_rows(d, ld, norms, n, m, out);
  else argminRowsJs(d, ld, norms, n, m, out);
}

/** out[j] = norms[j] - books[j] . s over 4 * quads codewords (quads a multiple of 4), exact int32. */
export function rankDist(books, norms, s, out, quads, pairs) {
  if (useWasm) wasm.rank_dist(books, norms, s, out, quads, pairs);
  else rankDistJs(books, norms, s, out, quads, pairs);
}

/** #{j < n : v[j] < x}, n a multiple of 8. */
export function countLt(v, n, x) {
  return useWasm ? wasm.count_lt(v, n, x) : countLtJs(v, n, x);
}
