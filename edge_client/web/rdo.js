// Rate-distortion optimised indices (edge_client/rdo.py): in the rank transform's decode order,
// each index is chosen among the nearest codeword, the 64 cheapest ranks and (gated stage) code 0
// for squared error + rate_lambda x its code length in the stream's rANS table.

import * as K from "./kernels.js";
import { fround, pad, squaredNorm, subtractCodeword } from "./float32.js";
import { distanceRow, rankOf, rankScratch } from "./ranking.js";

const LOW_RANKS = 64; // edge_client.rdo.LOW_RANKS

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
export function searchRdo(b, p, z, T) {
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

