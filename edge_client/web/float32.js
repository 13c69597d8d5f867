// float32 arithmetic as numpy does it, and matrix products through the kernels.
//
// numpy rounds every elementwise float32 operation (here Math.fround) and sums a row with its
// pairwise algorithm (8 accumulators up to 128 terms, halves above); both are reproduced exactly.
// Products go through the gemm kernel (kernels.js) on weights packed once into 16-column panels.

import * as K from "./kernels.js";

export const fround = Math.fround;

/** `n` rounded up to a multiple of `m`. */
export const pad = (n, m) => Math.ceil(n / m) * m;

/** numpy's pairwise float32 sum of a[off], a[off + stride], ... (n terms): 8 accumulators up to
 * 128 terms, halves above (numpy/_core/src/umath/loops_utils.h.src). */
export function pairwiseSum(a, off, n, stride = 1) {
  if (n < 8) {
    let r = 0;
    for (let i = 0; i < n; i++) r = fround(r + a[off + i * stride]);
    return r;
  }
  if (n <= 128) {
    let r0 = a[off], r1 = a[off + stride], r2 = a[off + 2 * stride], r3 = a[off + 3 * stride];
    let r4 = a[off + 4 * stride], r5 = a[off + 5 * stride], r6 = a[off + 6 * stride], r7 = a[off + 7 * stride];
    let i = 8;
    for (; i < n - (n % 8); i += 8) {
      const p = off + i * stride;
      r0 = fround(r0 + a[p]); r1 = fround(r1 + a[p + stride]);
      r2 = fround(r2 + a[p + 2 * stride]); r3 = fround(r3 + a[p + 3 * stride]);
      r4 = fround(r4 + a[p + 4 * stride]); r5 = fround(r5 + a[p + 5 * stride]);
      r6 = fround(r6 + a[p + 6 * stride]); r7 = fround(r7 + a[p + 7 * stride]);
    }
    let res = fround(fround(fround(r0 + r1) + fround(r2 + r3)) + fround(fround(r4 + r5) + fround(r6 + r7)));
    for (; i < n; i++) res = fround(res + a[off + i * stride]);
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return fround(pairwiseSum(a, off, n2, stride) + pairwiseSum(a, off + n2 * stride, n - n2, stride));
}

/** sum of squares of a row, as einsum("td,td->t") (its own SIMD order: here exact, then rounded). */
export function squaredNorm(a, off, n) {
  let s = 0;
  for (let i = 0; i < n; i++) s += a[off + i] * a[off + i];
  return fround(s);
}

/** Pack a (k x n) row-major float matrix given by `get(row, col)` into 16-column panels. */
export function packPanels(k, n, get) {
  const panels = pad(n, 16) / 16;
  const ptr = K.alloc(panels * k * 16 * 4);
  const f = K.views().f32;
  for (let p = 0; p < panels; p++) {
    const base = (ptr >> 2) + p * k * 16;
    for (let r = 0; r < k; r++) {
      for (let j = 0; j < 16; j++) {
        const col = p * 16 + j;
        f[base + r * 16 + j] = col < n ? get(r, col) : 0;
      }
    }
  }
  return { ptr, k, n, panels };
}

/** rows x B for a packed B: `a` (Float32Array, rows x B.k) -> Float32Array rows x B.n, through the
 * gemm kernel (plus `bias` per column, rounded as numpy adds it). */
export function matmul(a, rows, packed, bias = null) {
  const { k, n, panels } = packed;
  const m = pad(Math.max(rows, 1), 2);
  const ldc = panels * 16;
  const pa = K.alloc(m * k * 4);
  const pc = K.alloc(m * ldc * 4);
  try {
    let f = K.views().f32;
    f.set(a.subarray(0, rows * k), pa >> 2);
    K.gemm(pa, k, packed.ptr, pc, ldc, m, k, panels);
    f = K.views().f32;
    const out = new Float32Array(rows * n);
    for (let r = 0; r < rows; r++) {
      const src = (pc >> 2) + r * ldc;
      if (bias) for (let j = 0; j < n; j++) out[r * n + j] = fround(f[src + j] + bias[j]);
      else out.set(f.subarray(src, src + n), r * n);
    }
    return out;
  } finally {
    K.release(pa);
    K.release(pc);
  }
}

/** residual[t] -= book[index], rounded per element (numpy's float32 subtraction). */
export function subtractCodeword(residual, t, book, index, d) {
  for (let k = 0; k < d; k++) residual[t * d + k] = fround(residual[t * d + k] - book[index * d + k]);
}
