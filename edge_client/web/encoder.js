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
import { fround, matmul, packPanels, pad, pairwiseSum, squaredNorm, subtractCodeword } from "./float32.js";
import { checkPixels, resizeAndCrop, roundHalfEven } from "./preprocess.js";
import { computeRanks, prepareRanking } from "./ranking.js";
import { searchRdo } from "./rdo.js";
import { assemble, packIndices, ransEncode, readHeader } from "./stream.js";

const STATS_EPS = fround(1e-6);
const SEARCH_CHUNK = 64; // rows per distance block: 64 x 4096 float32 = 1 MiB
const prepared = new WeakMap();

// ---- float32 layers ----------------------------------------------------------------------------

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

/** Everything the encoder needs from a bundle, packed once (kept in a WeakMap by bundle). */
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
      if ((b.refineThreshold && s > 0) || (b.backgroundNorm && s === 0)) book.fill(0, 0, d);
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
  const ranking = b.ranked ? prepareRanking(b, G, S, Kc, d) : null;
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
    background: fround(b.backgroundNorm),
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
  const z = matmul(shifted, T, p.down, p.downBias);
  // AlignedVQ.suppress: a (token, group) within the background norm is sent as the zero vector.
  if (b.backgroundNorm) {
    for (let row = 0; row < T * p.G; row++) if (squaredNorm(z, row * p.d, p.d) <= p.background) z.fill(0, row * p.d, row * p.d + p.d);
  }
  return { z, levels };
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
