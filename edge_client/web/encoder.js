// The edge half in the browser: RGB -> CLIP embeddings (+ blocks) -> AlignedVQ indices -> stream.
//
// Mirrors edge_client/encoder.py (and rdo.py, ranking.py) operation for operation in float32:
// every elementwise step is rounded with Math.fround as numpy rounds it, and reductions over a
// row (LayerNorm means, codeword norms) follow numpy's pairwise summation exactly. Matrix
// products go through the gemm kernel (kernels.js), which sums in order where BLAS blocks, so a
// projection may differ from numpy's in its last bits: an index then flips only where two
// codewords are within rounding of each other (tests/web measures how often: far below 0.1 %).
// The neighbour ranks are exact integers, so the same indices always give the same bytes.
//
// Speed: weights are packed for the kernels once per bundle (prepare), scratch comes from the
// kernels' memory and goes back after each image. A gated refinement stage searches only the
// tokens whose residual exceeds the threshold (the rest send code 0 either way), and ranks of
// tokens predicted by their offset alone reuse one distance row per position.

import * as K from "./kernels.js";
import { ImageError } from "./errors.js";
import { checkPixels, resizeAndCrop, roundHalfEven } from "./preprocess.js";
import { assemble, packIndices, ransEncode, readHeader } from "./stream.js";

const fround = Math.fround;
const STATS_EPS = fround(1e-6);
const SEARCH_CHUNK = 64; // rows per distance block: 64 x 4096 float32 = 1 MiB
const LOW_RANKS = 64; // edge_client.rdo.LOW_RANKS
const INT32_MAX = 2147483647;
const prepared = new WeakMap();

// ---- float32 helpers ---------------------------------------------------------------------------

/** numpy's pairwise float32 sum of a[off], a[off + stride], ... (n terms): 8 accumulators up to
 * 128 terms, halves above (numpy/_core/src/umath/loops_utils.h.src). */
function pairwiseSum(a, off, n, stride = 1) {
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
function squaredNorm(a, off, n) {
  let s = 0;
  for (let i = 0; i < n; i++) s += a[off + i] * a[off + i];
  return fround(s);
}

function layerNorm(x, rows, dim, weight, bias, eps) {
  const out = new Float32Array(rows * dim);
  const centred = new Float32Array(dim);
  for (let t = 0; t < rows; t++) {
    const o = t * dim;
    const mean = fround(pairwiseSum(x, o, dim) / dim);
    for (let i = 0; i < dim; i++) centred[i] = fround(x[o + i] - mean);
    const variance = fround(squaredNorm(centred, 0, dim) / dim);
    const denom = fround(Math.sqrt(fround(variance + eps)));
    for (let i = 0; i < dim; i++) out[o + i] = fround(fround(fround(centred[i] / denom) * weight[i]) + bias[i]);
  }
  return out;
}

const ERFC_COEFFICIENTS = [0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
  0.37409196, 1.00002368];

/** encoder.py's _erf: Numerical Recipes' erfc fit in float64, cast to float32. */
function erf(x) {
  const z = Math.abs(x);
  const t = 1.0 / (1.0 + 0.5 * z);
  let horner = 0;
  for (const coef of ERFC_COEFFICIENTS) horner = horner * t + coef;
  const erfc = t * Math.exp(-z * z - 1.26551223 + t * horner);
  return fround(x >= 0 ? 1.0 - erfc : erfc - 1.0);
}

const GELU_TANH_C = fround(Math.sqrt(2.0 / Math.PI));
const GELU_TANH_K = fround(0.044715);
const QUICK_K = fround(-1.702);
const INV_SQRT2 = fround(1.0 / Math.sqrt(2.0));
const ACTIVATIONS = {
  quick_gelu: (x) => fround(x / fround(1 + fround(Math.exp(fround(QUICK_K * x))))),
  gelu_new: geluTanh,
  gelu_pytorch_tanh: geluTanh,
  gelu: (x) => fround(fround(0.5 * x) * fround(1 + erf(fround(x * INV_SQRT2)))),
};

function geluTanh(x) {
  const cube = fround(fround(fround(GELU_TANH_K * x) * x) * x);
  const inner = fround(GELU_TANH_C * fround(x + cube));
  return fround(fround(0.5 * x) * fround(1 + fround(Math.tanh(inner))));
}

// ---- kernel plumbing ---------------------------------------------------------------------------

const pad = (n, m) => Math.ceil(n / m) * m;

/** Pack a (k x n) row-major float matrix given by `get(row, col)` into 16-column panels. */
function packPanels(k, n, get) {
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
function matmul(a, rows, packed, bias = null) {
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

// ---- per-bundle preparation --------------------------------------------------------------------

function transposedGetter(weight, cols) {
  // numpy keeps W (out, in) and multiplies by W.T: B[r][c] = W[c][r].
  return (r, c) => weight[c * cols + r];
}

function prepareLayer(t, prefix, vision) {
  const D = vision.hiddenSize;
  const F = vision.intermediateSize;
  const g = (name) => t[prefix + name];
  const q = g("self_attn.q_proj.weight"), k = g("self_attn.k_proj.weight"), v = g("self_attn.v_proj.weight");
  const qkvBias = new Float32Array(3 * D);
  qkvBias.set(g("self_attn.q_proj.bias"), 0);
  qkvBias.set(g("self_attn.k_proj.bias"), D);
  qkvBias.set(g("self_attn.v_proj.bias"), 2 * D);
  return {
    ln1: [g("layer_norm1.weight"), g("layer_norm1.bias")],
    ln2: [g("layer_norm2.weight"), g("layer_norm2.bias")],
    qkv: packPanels(D, 3 * D, (r, c) => (c < D ? q[c * D + r] : c < 2 * D ? k[(c - D) * D + r] : v[(c - 2 * D) * D + r])),
    qkvBias,
    out: packPanels(D, D, transposedGetter(g("self_attn.out_proj.weight"), D)),
    outBias: g("self_attn.out_proj.bias"),
    fc1: packPanels(D, F, transposedGetter(g("mlp.fc1.weight"), D)),
    fc1Bias: g("mlp.fc1.bias"),
    fc2: packPanels(F, D, transposedGetter(g("mlp.fc2.weight"), F)),
    fc2Bias: g("mlp.fc2.bias"),
  };
}

/** Neighbours (left, above) of each token, -1 for none (ranking.py's `neighbours`). */
function neighbours(tokens) {
  const grid = Math.floor(Math.sqrt(Math.max(tokens - 1, 0)));
  const out = new Int32Array(tokens * 2).fill(-1);
  if (tokens > 1 && grid * grid === tokens - 1) {
    for (let p = 0; p < tokens - 1; p++) {
      out[2 * (p + 1)] = p % grid > 0 ? p : -1;
      out[2 * (p + 1) + 1] = p >= grid ? p + 1 - grid : -1;
    }
  } else {
    for (let t = 1; t < tokens; t++) out[2 * t] = t - 1;
  }
  return out;
}

/** Tokens grouped so that each one's neighbours lie in earlier groups (ranking.py's `_levels`). */
function levels(nbrs, tokens) {
  const depth = new Int32Array(tokens);
  let deepest = 0;
  for (let t = 0; t < tokens; t++) {
    let d = -1;
    for (const n of [nbrs[2 * t], nbrs[2 * t + 1]]) if (n >= 0) d = Math.max(d, depth[n]);
    depth[t] = d + 1;
    deepest = Math.max(deepest, depth[t]);
  }
  const out = Array.from({ length: tokens ? deepest + 1 : 0 }, () => []);
  for (let t = 0; t < tokens; t++) out[depth[t]].push(t);
  return out.map((list) => Int32Array.from(list));
}

function prepareRanking(b, books, G, S, Kc, d) {
  const t = b.tensors;
  const rankBooks = t["quantizer.rank_books"];
  const offsets = Int32Array.from(t["quantizer.rank_offsets"]);
  const Kp = pad(Kc, 16);
  const pairs = Math.ceil(d / 2);
  const rows = [];
  for (let g = 0; g < G; g++) {
    rows.push([]);
    for (let s = 0; s < S; s++) {
      const base = ((g * S + s) * Kc) * d;
      const ints = Int32Array.from(rankBooks.subarray(base, base + Kc * d));
      const il = K.alloc(Kp * pairs * 2 * 2); // Kp/4 blocks x pairs x 8 int16
      const norms = K.alloc(Kp * 4);
      const { i16, i32 } = K.views();
      for (let j = 0; j < Kp; j++) {
        let norm = 0;
        for (let kk = 0; kk < d; kk++) {
          const value = j < Kc ? ints[j * d + kk] : 0;
          norm += value * value;
          i16[(il >> 1) + (j >> 2) * pairs * 8 + (kk >> 1) * 8 + (j & 3) * 2 + (kk & 1)] = value;
        }
        i32[(norms >> 2) + j] = j < Kc ? norm : INT32_MAX;
      }
      rows[g].push({ books: ints, il, norms, aloneRows: new Map() });
    }
  }
  const nbrs = neighbours(b.tokens);
  return { rows, offsets, nbrs, levels: levels(nbrs, b.tokens), pairs, Kp };
}

function prepare(b) {
  let p = prepared.get(b);
  if (p) return p;
  const t = b.tensors;
  const v = b.vision;
  const D = v.hiddenSize, C = v.numChannels, P = v.patchSize, grid = v.imageSize / P;
  const CPP = C * P * P;
  const G = b.groups, S = b.stages, Kc = b.codebookSize, d = b.codeDim;
  const allocated = [];
  const track = (packed) => {
    allocated.push(packed.ptr ?? packed);
    return packed;
  };
  const lut = new Float32Array(C * 256);
  for (let c = 0; c < C; c++) {
    const mean = fround(b.imageSpec.mean[c]);
    const std = fround(b.imageSpec.std[c]);
    for (let x = 0; x < 256; x++) lut[c * 256 + x] = fround(fround(fround(x / 255) - mean) / std);
  }
  const patch = t["embeddings.patch_embedding.weight"]; // (D, C, P, P) -> B[(c, py, px)][D]
  const position = t["embeddings.position_embedding.weight"];
  const classRow = new Float32Array(D);
  for (let i = 0; i < D; i++) classRow[i] = fround(t["embeddings.class_embedding"][i] + position[i]);

  const books = []; // per (g, s): Float32Array K x d, pinned zeros as the cloud sums them
  const search = [];
  for (let g = 0; g < G; g++) {
    books.push([]);
    search.push([]);
    for (let s = 0; s < S; s++) {
      const base = ((g * S + s) * Kc) * d;
      const book = t["quantizer.codebooks"].slice(base, base + Kc * d);
      if (b.refineThreshold && s > 0) book.fill(0, 0, d);
      books[g].push(book);
      const norms = new Float32Array(pad(Kc, 16)).fill(Infinity);
      for (let j = 0; j < Kc; j++) {
        const squares = new Float32Array(d);
        for (let kk = 0; kk < d; kk++) squares[kk] = fround(book[j * d + kk] * book[j * d + kk]);
        norms[j] = pairwiseSum(squares, 0, d);
      }
      const normsPtr = track(K.alloc(norms.length * 4));
      K.views().f32.set(norms, normsPtr >> 2);
      const m2t = track(packPanels(d, Kc, (r, c) => fround(-2 * book[c * d + r])));
      search[g].push({ m2t, norms, normsPtr });
    }
  }
  let freqs = null;
  if (t["quantizer.freqs"]) {
    const table = t["quantizer.freqs"];
    freqs = { freqs: [], starts: [], lengths: [] };
    for (let m = 0; m < G * S; m++) {
      const row = table.subarray(m * Kc, (m + 1) * Kc);
      const starts = new Float64Array(Kc);
      const lengths = new Float64Array(Kc);
      let c = 0;
      for (let j = 0; j < Kc; j++) {
        starts[j] = c;
        c += row[j];
        lengths[j] = -Math.log2(row[j] / 2 ** 24);
      }
      freqs.freqs.push(row);
      freqs.starts.push(starts);
      freqs.lengths.push(lengths);
    }
  }
  const ranking = b.ranked ? prepareRanking(b, books, G, S, Kc, d) : null;
  if (ranking) {
    for (const row of ranking.rows.flat()) allocated.push(row.il, row.norms);
  }
  const layers = [];
  for (let i = 0; i < b.edgeBlocks; i++) {
    const layer = prepareLayer(t, `encoder.layers.${i}.`, v);
    for (const key of ["qkv", "out", "fc1", "fc2"]) allocated.push(layer[key].ptr);
    layers.push(layer);
  }
  p = {
    D, C, P, grid, CPP, G, S, Kc, d, lut, classRow,
    positions: position.subarray(D),
    patchW: track(packPanels(CPP, D, (r, c) => patch[c * CPP + r])),
    preLn: t["pre_layrnorm.weight"] ? [t["pre_layrnorm.weight"], t["pre_layrnorm.bias"]] : null,
    eps: fround(v.layerNormEps),
    layers,
    act: ACTIVATIONS[v.hiddenAct],
    statsRange: t["quantizer.stats_range"],
    statsTop: fround(2 ** b.statBits - 1),
    centre: t["quantizer.token_mean"],
    perPosition: b.quantizerTokens > 0,
    down: track(packPanels(D, G * d, (r, c) => t["quantizer.down.weight"][c * D + r])),
    downBias: t["quantizer.down.bias"],
    books, search, freqs, ranking,
    threshold: fround(b.refineThreshold),
    rdo: b.rateLambda > 0 && ranking !== null && freqs !== null,
    allocated,
  };
  prepared.set(b, p);
  return p;
}

/** Pack a bundle's weights for the kernels now (encodeImage does it on first use otherwise). */
export function prepareBundle(bundle) {
  prepare(bundle);
  return bundle;
}

/** Give back the kernel memory a bundle's prepared weights hold (it is re-prepared if used again). */
export function disposeBundle(bundle) {
  const p = prepared.get(bundle);
  if (!p) return;
  for (const ptr of p.allocated) K.release(ptr);
  if (p.ranking) for (const row of p.ranking.rows.flat()) for (const ptr of row.aloneRows.values()) K.release(ptr);
  prepared.delete(bundle);
}

// ---- the edge half -----------------------------------------------------------------------------

function attentionLayer(p, layer, hidden, T, heads) {
  const D = p.D;
  const hd = D / heads;
  const h = layerNorm(hidden, T, D, layer.ln1[0], layer.ln1[1], p.eps);
  const qkv = matmul(h, T, layer.qkv, layer.qkvBias); // (T, 3D): q | k | v, heads inside each
  const scale = fround(hd ** -0.5);
  const attn = new Float32Array(T * D);
  const qh = new Float32Array(T * hd);
  for (let head = 0; head < heads; head++) {
    for (let i = 0; i < T; i++) for (let j = 0; j < hd; j++) qh[i * hd + j] = qkv[i * 3 * D + head * hd + j];
    const kT = packPanels(hd, T, (r, c) => qkv[c * 3 * D + D + head * hd + r]);
    const vP = packPanels(T, hd, (r, c) => qkv[r * 3 * D + 2 * D + head * hd + c]);
    try {
      const scores = matmul(qh, T, kT);
      for (let i = 0; i < T; i++) {
        const o = i * T;
        let max = -Infinity;
        for (let j = 0; j < T; j++) {
          scores[o + j] = fround(scores[o + j] * scale);
          if (scores[o + j] > max) max = scores[o + j];
        }
        for (let j = 0; j < T; j++) scores[o + j] = fround(Math.exp(fround(scores[o + j] - max)));
        const sum = pairwiseSum(scores, o, T);
        for (let j = 0; j < T; j++) scores[o + j] = fround(scores[o + j] / sum);
      }
      const out = matmul(scores, T, vP);
      for (let i = 0; i < T; i++) for (let j = 0; j < hd; j++) attn[i * D + head * hd + j] = out[i * hd + j];
    } finally {
      K.release(kT.ptr);
      K.release(vP.ptr);
    }
  }
  const projected = matmul(attn, T, layer.out, layer.outBias);
  const mid = new Float32Array(T * D);
  for (let i = 0; i < T * D; i++) mid[i] = fround(hidden[i] + projected[i]);
  const h2 = layerNorm(mid, T, D, layer.ln2[0], layer.ln2[1], p.eps);
  const up = matmul(h2, T, layer.fc1, layer.fc1Bias);
  for (let i = 0; i < up.length; i++) up[i] = p.act(up[i]);
  const down = matmul(up, T, layer.fc2, layer.fc2Bias);
  for (let i = 0; i < T * D; i++) mid[i] = fround(mid[i] + down[i]);
  return mid;
}

/** `(size, size, 3)` RGB -> hidden_states `(tokens, D)` at the split site. */
function hiddenStates(b, p, pixels) {
  const { D, P, grid, CPP, lut } = p;
  const size = b.imageSpec.size;
  const patches = grid * grid;
  const T = patches + 1;
  const m = pad(patches, 2);
  const pa = K.alloc(m * CPP * 4);
  const pc = K.alloc(m * p.patchW.panels * 16 * 4);
  const hidden = new Float32Array(T * D);
  try {
    const f = K.views().f32;
    const a = pa >> 2;
    for (let gy = 0; gy < grid; gy++) {
      for (let gx = 0; gx < grid; gx++) {
        let o = a + (gy * grid + gx) * CPP;
        for (let c = 0; c < p.C; c++) {
          const l = c * 256;
          for (let py = 0; py < P; py++) {
            let src = ((gy * P + py) * size + gx * P) * 3 + c;
            for (let px = 0; px < P; px++, src += 3) f[o++] = lut[l + pixels[src]];
          }
        }
      }
    }
    const ldc = p.patchW.panels * 16;
    K.gemm(pa, CPP, p.patchW.ptr, pc, ldc, m, CPP, p.patchW.panels);
    const g = K.views().f32;
    hidden.set(p.classRow, 0);
    for (let i = 0; i < patches; i++) {
      const src = (pc >> 2) + i * ldc;
      const dst = (i + 1) * D;
      for (let j = 0; j < D; j++) hidden[dst + j] = fround(g[src + j] + p.positions[i * D + j]);
    }
  } finally {
    K.release(pa);
    K.release(pc);
  }
  let out = p.preLn ? layerNorm(hidden, T, D, p.preLn[0], p.preLn[1], p.eps) : hidden;
  for (const layer of p.layers) out = attentionLayer(p, layer, out, T, b.vision.numAttentionHeads);
  return out;
}

/** Per-token standardisation at block sites: (x / std, levels (T, 2)) as AlignedVQ.standardize. */
function standardize(b, p, x, T) {
  const D = p.D;
  const levels = new Uint16Array(T * 2);
  const out = new Float32Array(T * D);
  const centred = new Float32Array(D);
  const squares = new Float32Array(D);
  const lo = [p.statsRange[0], p.statsRange[2]];
  const hi = [p.statsRange[1], p.statsRange[3]];
  const top = p.statsTop;
  for (let t = 0; t < T; t++) {
    const o = t * D;
    const mean = fround(pairwiseSum(x, o, D) / D);
    for (let i = 0; i < D; i++) {
      centred[i] = fround(x[o + i] - mean);
      squares[i] = fround(centred[i] * centred[i]);
    }
    const std = fround(Math.sqrt(fround(fround(pairwiseSum(squares, 0, D) / D) + STATS_EPS)));
    const stats = [mean, fround(Math.log(std))];
    for (let c = 0; c < 2; c++) {
      const scaled = fround(fround(fround(stats[c] - lo[c]) / fround(hi[c] - lo[c])) * top);
      levels[2 * t + c] = Math.min(Math.max(roundHalfEven(scaled), 0), top);
    }
    for (let i = 0; i < D; i++) out[o + i] = fround(centred[i] / std);
  }
  return { x: out, levels };
}

/** hidden_states (T, D) -> projected features z (T, G * d) and stat levels (or null). */
function project(b, p, hidden, T) {
  const D = p.D;
  let x = hidden;
  let levels = null;
  if (b.statBits) ({ x, levels } = standardize(b, p, hidden, T));
  const shifted = new Float32Array(T * D);
  for (let t = 0; t < T; t++) {
    const c = p.perPosition ? t * D : 0;
    for (let i = 0; i < D; i++) shifted[t * D + i] = fround(x[t * D + i] - p.centre[c + i]);
  }
  return { z: matmul(shifted, T, p.down, p.downBias), levels };
}

// ---- nearest search ----------------------------------------------------------------------------

/** Nearest codeword of (g, s) for the given rows of `residual` (T x d): out[row] for each. */
function nearestRows(p, g, s, residual, rows, out) {
  const { d } = p;
  const { m2t, normsPtr } = p.search[g][s];
  const ld = m2t.panels * 16;
  const chunk = Math.min(SEARCH_CHUNK, pad(rows.length, 2));
  const pa = K.alloc(chunk * d * 4);
  const pd = K.alloc(chunk * ld * 4);
  const pi = K.alloc(chunk * 4);
  try {
    for (let start = 0; start < rows.length; start += chunk) {
      const n = Math.min(chunk, rows.length - start);
      const f = K.views().f32;
      for (let r = 0; r < n; r++) f.set(residual.subarray(rows[start + r] * d, rows[start + r] * d + d), (pa >> 2) + r * d);
      if (n % 2) f.fill(0, (pa >> 2) + n * d, (pa >> 2) + (n + 1) * d);
      K.gemm(pa, d, m2t.ptr, pd, ld, pad(n, 2), d, m2t.panels);
      K.argminRows(pd, ld, normsPtr, ld, n, pi);
      const idx = K.views().i32;
      for (let r = 0; r < n; r++) out[rows[start + r]] = idx[(pi >> 2) + r];
    }
  } finally {
    K.release(pa);
    K.release(pd);
    K.release(pi);
  }
}

function subtractCodeword(residual, t, book, index, d) {
  for (let k = 0; k < d; k++) residual[t * d + k] = fround(residual[t * d + k] - book[index * d + k]);
}

/** Residual nearest-code search (encoder.py's _search): indices (T, G, S) as a flat Int32Array. */
function searchNearest(b, p, z, T) {
  const { G, S, d } = p;
  const indices = new Int32Array(T * G * S);
  const residual = new Float32Array(T * d);
  const chosen = new Int32Array(T);
  for (let g = 0; g < G; g++) {
    for (let t = 0; t < T; t++) residual.set(z.subarray(t * G * d + g * d, t * G * d + g * d + d), t * d);
    for (let s = 0; s < S; s++) {
      chosen.fill(0);
      const rows = [];
      const gated = s > 0 && b.refineThreshold > 0;
      for (let t = 0; t < T; t++) if (!gated || !(squaredNorm(residual, t * d, d) <= p.threshold)) rows.push(t);
      if (rows.length) nearestRows(p, g, s, residual, rows, chosen);
      for (let t = 0; t < T; t++) {
        indices[(t * G + g) * S + s] = chosen[t];
        if (s + 1 < S) subtractCodeword(residual, t, p.books[g][s], chosen[t], d);
      }
    }
  }
  return indices;
}

// ---- neighbour ranks ---------------------------------------------------------------------------

/** Twice the prediction of token t in (g, s) as packed int16 pairs, into the i32 view at `sPtr`;
 * returns whether it is the offset alone (no neighbour, or neighbours on all-zero codewords). */
function twicePrediction(p, g, s, t, indices) {
  const { G, S, d } = p;
  const r = p.ranking;
  const book = r.rows[g][s].books;
  const left = r.nbrs[2 * t], above = r.nbrs[2 * t + 1];
  const count = (left >= 0) + (above >= 0);
  const weight = count === 1 ? 2 : 1;
  const pred = new Int32Array(d);
  let alone = true;
  const off = ((t * G + g) * S + s) * d;
  for (let k = 0; k < d; k++) {
    let base = 0;
    if (left >= 0) base += weight * book[indices[(left * G + g) * S + s] * d + k];
    if (above >= 0) base += weight * book[indices[(above * G + g) * S + s] * d + k];
    if (base !== 0) alone = false;
    pred[k] = r.offsets[off + k] + base;
  }
  return { pred, alone };
}

function writePairs(pred, sPtr, pairs) {
  const i32 = K.views().i32;
  for (let kp = 0; kp < pairs; kp++) {
    const lo = pred[2 * kp];
    const hi = 2 * kp + 1 < pred.length ? pred[2 * kp + 1] : 0;
    i32[(sPtr >> 2) + kp] = (lo & 0xffff) | (hi << 16);
  }
}

/** The rank-distance row (K ints in kernel memory) of token t's prediction in (g, s). Rows of
 * tokens predicted by their offset alone are computed once per position and kept. */
function distanceRow(p, g, s, t, indices, scratch) {
  const r = p.ranking;
  const row = r.rows[g][s];
  const { pred, alone } = twicePrediction(p, g, s, t, indices);
  if (alone && row.aloneRows.has(t)) return row.aloneRows.get(t);
  const target = alone ? K.alloc(r.Kp * 4) : scratch.row;
  writePairs(pred, scratch.s, r.pairs);
  K.rankDist(row.il, row.norms, scratch.s, target, r.Kp / 4, r.pairs);
  if (alone) row.aloneRows.set(t, target);
  return target;
}

/** The exact rank of codeword `c` in a distance row: closer codewords, then equal ones before it. */
function rankOf(p, rowPtr, c) {
  const i32 = K.views().i32;
  const mine = i32[(rowPtr >> 2) + c];
  const Kp = p.ranking.Kp;
  let rank = K.countLt(rowPtr, Kp, mine);
  const ties = K.countLt(rowPtr, Kp, mine + 1) - rank;
  if (ties > 1) for (let j = 0; j < c; j++) if (i32[(rowPtr >> 2) + j] === mine) rank++;
  return rank;
}

function rankScratch(p) {
  return { row: K.alloc(p.ranking.Kp * 4), s: K.alloc(p.ranking.pairs * 4 + 16) };
}

/** Indices (T, G, S) -> neighbour ranks (ranking.py's NeighbourRanks.ranks). */
function computeRanks(p, indices, T) {
  const { G, S } = p;
  const ranks = new Int32Array(indices.length);
  const scratch = rankScratch(p);
  try {
    for (let g = 0; g < G; g++) {
      for (let s = 0; s < S; s++) {
        for (let t = 0; t < T; t++) {
          const at = (t * G + g) * S + s;
          ranks[at] = rankOf(p, distanceRow(p, g, s, t, indices, scratch), indices[at]);
        }
      }
    }
  } finally {
    K.release(scratch.row);
    K.release(scratch.s);
  }
  return ranks;
}

// ---- rate-distortion optimised search (rdo.py) -------------------------------------------------

/** The `low` smallest keys (distance * K + index) of a row, ascending: the codewords cheapest to
 * send (rdo.py takes them with argpartition; keys are unique, so the set is the same). The
 * `low`-th smallest distance comes from a binary search over counts (the count kernel), then one
 * pass collects the keys below it and, lowest index first, the ties at it. */
function cheapest(p, rowPtr, Kc, low) {
  const Kp = p.ranking.Kp;
  let lo = -(2 ** 24); // rank distances are integers in (-2**24, 2**24); padding holds INT32_MAX
  let hi = 2 ** 24;
  while (lo < hi) {
    const mid = Math.floor((lo + hi) / 2);
    if (K.countLt(rowPtr, Kp, mid + 1) >= low) hi = mid;
    else lo = mid + 1;
  }
  let ties = low - K.countLt(rowPtr, Kp, lo);
  const i32 = K.views().i32;
  const base = rowPtr >> 2;
  const keys = new Float64Array(low);
  let n = 0;
  for (let j = 0; j < Kc && n < low; j++) {
    const d = i32[base + j];
    if (d < lo || (d === lo && ties-- > 0)) keys[n++] = d * Kc + j;
  }
  return keys.sort();
}

/** Indices (T, G, S) chosen for squared error + rate_lambda x coded rank bits (rdo.py). */
function searchRdo(b, p, z, T) {
  const { G, S, d, Kc } = p;
  const r = p.ranking;
  const indices = new Int32Array(T * G * S);
  const ranks = new Int32Array(T * G * S); // exact ranks of the chosen codes, reused by the coder
  const rankKnown = new Uint8Array(T * G * S);
  const low = Math.min(LOW_RANKS, Kc);
  const lambda = b.rateLambda;
  const scratch = rankScratch(p);
  const residual = new Float32Array(T * d);
  try {
    for (let g = 0; g < G; g++) {
      for (let t = 0; t < T; t++) residual.set(z.subarray(t * G * d + g * d, t * G * d + g * d + d), t * d);
      for (const tokens of r.levels) {
        for (let s = 0; s < S; s++) {
          const gated = s > 0 && b.refineThreshold > 0;
          const live = [];
          for (const t of tokens) if (!gated || squaredNorm(residual, t * d, d) > p.threshold) live.push(t);
          const picks = new Map();
          if (live.length) {
            const { m2t, norms } = p.search[g][s];
            const ld = m2t.panels * 16;
            const m = pad(live.length, 2);
            const pa = K.alloc(m * d * 4);
            const pd = K.alloc(m * ld * 4);
            const pi = K.alloc(m * 4);
            try {
              let f = K.views().f32;
              live.forEach((t, i) => f.set(residual.subarray(t * d, t * d + d), (pa >> 2) + i * d));
              K.gemm(pa, d, m2t.ptr, pd, ld, m, d, m2t.panels);
              K.argminRows(pd, ld, p.search[g][s].normsPtr, ld, live.length, pi);
              const lengths = p.freqs.lengths[g * S + s];
              live.forEach((t, i) => {
                const rowPtr = distanceRow(p, g, s, t, indices, scratch);
                const i32 = K.views().i32;
                f = K.views().f32;
                const keys = cheapest(p, rowPtr, Kc, low);
                const last = keys[keys.length - 1];
                const row = (pd >> 2) + i * ld;
                let best = Infinity;
                let pick = 0;
                let pickRank = 0;
                const consider = (c, rank) => {
                  const cost = fround(f[row + c] + norms[c]) + lambda * lengths[rank];
                  if (cost < best) {
                    best = cost;
                    pick = c;
                    pickRank = rank;
                  }
                };
                // rdo.py's candidates, in its order: the nearest codeword, the cheapest ranks, code 0
                // of a gated stage. A key among the cheapest ranks at its place in the sorted keys
                // (unique keys), any other is counted over the whole row.
                const rankOfCode = (c) => {
                  const key = i32[(rowPtr >> 2) + c] * Kc + c;
                  if (key > last) return rankOf(p, rowPtr, c);
                  let lo = 0;
                  let hi = keys.length;
                  while (lo < hi) {
                    const mid = (lo + hi) >> 1;
                    if (keys[mid] < key) lo = mid + 1;
                    else hi = mid;
                  }
                  return lo;
                };
                const nearest = i32[(pi >> 2) + i];
                consider(nearest, rankOfCode(nearest));
                for (let r = 0; r < keys.length; r++) consider((((keys[r] % Kc) + Kc) % Kc), r);
                if (gated) consider(0, rankOfCode(0));
                picks.set(t, [pick, pickRank]);
              });
            } finally {
              K.release(pa);
              K.release(pd);
              K.release(pi);
            }
          }
          for (const t of tokens) {
            const at = (t * G + g) * S + s;
            const chosen = picks.get(t);
            indices[at] = chosen ? chosen[0] : 0;
            if (chosen) {
              ranks[at] = chosen[1];
              rankKnown[at] = 1;
            }
            subtractCodeword(residual, t, p.books[g][s], indices[at], d);
          }
        }
      }
    }
    // Codes sent outright (within the threshold) still need their rank in the stream.
    for (let g = 0; g < G; g++) {
      for (let s = 0; s < S; s++) {
        for (let t = 0; t < T; t++) {
          const at = (t * G + g) * S + s;
          if (!rankKnown[at]) ranks[at] = rankOf(p, distanceRow(p, g, s, t, indices, scratch), indices[at]);
        }
      }
    }
  } finally {
    K.release(scratch.row);
    K.release(scratch.s);
  }
  return { indices, ranks };
}

// ---- streams -----------------------------------------------------------------------------------

function streamHeader(b, coder) {
  return {
    model: b.model,
    codebookHash: b.codebookHash,
    splitSite: b.splitSite,
    tokens: b.tokens,
    groups: b.groups,
    stages: b.stages,
    codebookSize: b.codebookSize,
    coder,
    statBits: b.statBits,
  };
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

const now = () => (typeof performance !== "undefined" ? performance.now() : Date.now());

/**
 * Encode one RGB image into the feature stream, with everything the page shows about it.
 *
 * `rgb`: Uint8Array (or Uint8ClampedArray) of width x height x 3 bytes, row-major. Options:
 * `entropy` (default true): rANS/ranked coding when the bundle has tables and that is smaller,
 * and rate-distortion optimised indices when it has a rate_lambda (as EdgeEncoder.encode_image).
 * Returns {stream, coder, indices (T, G, S) Int32Array, ranks (or null), levels (T, 2) or null,
 * tokenBits (Float64Array T: the bits each token costs in the stream: code lengths for the
 * entropy coders, bits_per_index for packing, stat bits included), refined (Uint8Array T: later
 * stages with a non-zero code), headerBytes, payloadBytes, grid, timings {resize, edge,
 * quantize, code} in ms}.
 */
export function encodeImageDetailed(bundle, rgb, width, height, options = {}) {
  const entropy = options.entropy ?? true;
  if (!bundle || !bundle.tensors || !bundle.imageSpec) throw new TypeError("expected a bundle from loadBundle");
  checkPixels(rgb, width, height);
  const p = prepare(bundle);
  const T = bundle.tokens;
  const { G, S } = p;
  const t0 = now();
  const size = bundle.imageSpec.size;
  const pixels = resizeAndCrop(rgb, width, height, size);
  const t1 = now();
  const hidden = hiddenStates(bundle, p, pixels);
  const { z, levels } = project(bundle, p, hidden, T);
  const t2 = now();
  let indices;
  let ranks = null;
  if (entropy && p.rdo) ({ indices, ranks } = searchRdo(bundle, p, z, T));
  else indices = searchNearest(bundle, p, z, T);
  const t3 = now();

  const statsBytes = bundle.statBits ? packIndices(levels, bundle.statBits) : new Uint8Array(0);
  let indexBytes = packIndices(indices, bundle.bitsPerIndex);
  let coder = "packed";
  let symbols = indices;
  if (entropy && p.freqs) {
    if (p.ranking) {
      ranks = ranks ?? computeRanks(p, indices, T);
      symbols = ranks;
    }
    const coded = ransEncode(symbols, p.freqs.freqs, p.freqs.starts, G * S);
    if (coded.length < indexBytes.length) {
      indexBytes = coded;
      coder = p.ranking ? "ranked" : "rans";
    }
  }
  const stream = assemble(streamHeader(bundle, coder), concat(indexBytes, statsBytes));
  const t4 = now();

  const tokenBits = new Float64Array(T);
  const refined = new Uint8Array(T);
  for (let t = 0; t < T; t++) {
    let bits = 2 * bundle.statBits;
    for (let m = 0; m < G * S; m++) {
      const at = t * G * S + m;
      bits += coder === "packed" ? bundle.bitsPerIndex : p.freqs.lengths[m][symbols[at]];
      if (m % S > 0 && indices[at] !== 0) refined[t]++;
    }
    tokenBits[t] = bits;
  }
  const head = readHeader(stream);
  return {
    stream,
    coder,
    indices,
    ranks,
    levels,
    tokenBits,
    refined,
    headerBytes: head.nbytes,
    payloadBytes: stream.length - head.nbytes,
    grid: p.grid,
    timings: { resize: t1 - t0, edge: t2 - t1, quantize: t3 - t2, code: t4 - t3 },
  };
}

/** Encode one RGB image (width x height x 3 bytes) into the feature stream (a Uint8Array): the
 * same bytes as the Python EdgeEncoder.encode_image for the same pixels. */
export function encodeImage(bundle, rgb, width, height, options = {}) {
  return encodeImageDetailed(bundle, rgb, width, height, options).stream;
}

export { ImageError, pairwiseSum, neighbours, levels };
