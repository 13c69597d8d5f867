// Neighbour ranks (edge_client/ranking.py): each index is sent as the count of codewords closer
// than it to a prediction from the left and upper neighbours' codewords plus a per-position
// offset, on the bundle's int16 rank geometry, so the ranks are exact integers that the cloud
// recomputes bit for bit. Distances |c|^2 - c.s come from the rank_dist kernel (int16 dot
// products), ranks from the count kernel; rows of tokens predicted by their offset alone are
// computed once per position and kept.

import * as K from "./kernels.js";
import { pad } from "./float32.js";

const INT32_MAX = 2147483647;

/** Neighbours (left, above) of each token, -1 for none (ranking.py's `neighbours`). */
export function neighbours(tokens) {
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
export function levels(nbrs, tokens) {
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

/** The rank geometry of a ranked bundle, laid out for the rank_dist kernel: per (group, stage)
 * the int16 books interleaved in pairs and their squared norms (padding: INT32_MAX, never
 * counted), the int offsets, the neighbours and the decode-order levels. */
export function prepareRanking(b, G, S, Kc, d) {
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
export function distanceRow(p, g, s, t, indices, scratch) {
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
export function rankOf(p, rowPtr, c) {
  const i32 = K.views().i32;
  const mine = i32[(rowPtr >> 2) + c];
  const Kp = p.ranking.Kp;
  let rank = K.countLt(rowPtr, Kp, mine);
  const ties = K.countLt(rowPtr, Kp, mine + 1) - rank;
  if (ties > 1) for (let j = 0; j < c; j++) if (i32[(rowPtr >> 2) + j] === mine) rank++;
  return rank;
}

export function rankScratch(p) {
  return { row: K.alloc(p.ranking.Kp * 4), s: K.alloc(p.ranking.pairs * 4 + 16) };
}

/** Indices (T, G, S) -> neighbour ranks (ranking.py's NeighbourRanks.ranks). */
export function computeRanks(p, indices, T) {
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

