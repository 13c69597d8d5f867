// Image preprocessing, bit-exact with edge_client/preprocess.py's `resize_and_crop` (Pillow):
// shortest edge to `size` with Pillow's bicubic resample (a = -0.5, support scaled by the
// reduction, 22-bit fixed-point coefficients, horizontal pass then vertical), centre crop.
// Pillow's algorithm is libImaging/Resample.c; only the output pixels that survive the crop are
// computed (each output pixel depends on its own row and column coefficients alone).

import { ImageError } from "./errors.js";

const PRECISION_BITS = 32 - 8 - 2;
const HALF = 1 << (PRECISION_BITS - 1);
const SUPPORT = 2.0; // bicubic

function bicubic(x) {
  const a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

/** Python's round() on a double: half to even. */
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const diff = x - f;
  if (diff < 0.5) return f;
  if (diff > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output position, first input index,
 * tap count and 22-bit integer weights. */
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = SUPPORT * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0.0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function clip8(ss) {
  const v = Math.floor(ss / (1 << PRECISION_BITS)); // C's `ss >> 22` on an int
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function checkPixels(rgb, width, height) {
  if (!(rgb instanceof Uint8Array || rgb instanceof Uint8ClampedArray)) {
    throw new ImageError(`expected RGB pixels as a Uint8Array, got ${rgb === null ? "null" : rgb?.constructor?.name ?? typeof rgb}`);
  }
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new ImageError(`expected a positive integer width and height, got ${width} x ${height}`);
  }
  if (rgb.length !== width * height * 3) {
    throw new ImageError(`expected ${width} x ${height} x 3 = ${width * height * 3} bytes of RGB, got ${rgb.length}`);
  }
}

/**
 * `(height, width, 3)` RGB bytes -> `(size, size, 3)` as `resize_and_crop` (Python) makes them:
 * shortest edge to `size` (Pillow bicubic), centre crop. Returns the input itself when it is
 * already `size` x `size`.
 */
export function resizeAndCrop(rgb, width, height, size) {
  checkPixels(rgb, width, height);
  if (width === size && height === size) return rgb;
  const scale = size / Math.min(width, height);
  const newW = Math.max(size, roundHalfEven(width * scale));
  const newH = Math.max(size, roundHalfEven(height * scale));
  const left = Math.floor((newW - size) / 2);
  const top = Math.floor((newH - size) / 2);
  const needH = newW !== width;
  const needV = newH !== height;
  const out = new Uint8Array(size * size * 3);

  // Horizontal pass over the input rows the kept output rows read (all rows without a vertical pass).
  let rowsFrom = top;
  let rowsTo = top + size;
  let vert = null;
  if (needV) {
    vert = coefficients(height, newH);
    rowsFrom = vert.bounds[2 * top];
    rowsTo = 0;
    for (let yy = top; yy < top + size; yy++) rowsTo = Math.max(rowsTo, vert.bounds[2 * yy] + vert.bounds[2 * yy + 1]);
  }
  const rows = rowsTo - rowsFrom;
  let temp; // rows x size x 3: the kept columns after the horizontal pass
  if (needH) {
    const { bounds, weights, ksize } = coefficients(width, newW);
    temp = new Uint8Array(rows * size * 3);
    for (let y = 0; y < rows; y++) {
      const src = (y + rowsFrom) * width * 3;
      const dst = y * size * 3;
      for (let xx = 0; xx < size; xx++) {
        const xmin = bounds[2 * (xx + left)];
        const taps = bounds[2 * (xx + left) + 1];
        const kOff = (xx + left) * ksize;
        let s0 = HALF, s1 = HALF, s2 = HALF;
        for (let x = 0; x < taps; x++) {
          const w = weights[kOff + x];
          const p = src + (xmin + x) * 3;
          s0 += rgb[p] * w;
          s1 += rgb[p + 1] * w;
          s2 += rgb[p + 2] * w;
        }
        const o = dst + xx * 3;
        temp[o] = clip8(s0);
        temp[o + 1] = clip8(s1);
        temp[o + 2] = clip8(s2);
      }
    }
  } else {
    temp = new Uint8Array(rows * size * 3);
    for (let y = 0; y < rows; y++) {
      const src = ((y + rowsFrom) * width + left) * 3;
      temp.set(rgb.subarray(src, src + size * 3), y * size * 3);
    }
  }
  if (!needV) {
    out.set(temp.subarray(0, size * size * 3));
    return out;
  }
  const { bounds, weights, ksize } = vert;
  for (let yy = 0; yy < size; yy++) {
    const ymin = bounds[2 * (yy + top)] - rowsFrom;
    const taps = bounds[2 * (yy + top) + 1];
    const kOff = (yy + top) * ksize;
    const dst = yy * size * 3;
    for (let c = 0; c < size * 3; c++) {
      let s = HALF;
      for (let y = 0; y < taps; y++) s += temp[(ymin + y) * size * 3 + c] * weights[kOff + y];
      out[dst + c] = clip8(s);
    }
  }
  return out;
}

/** RGBA (canvas ImageData) -> RGB, each pixel composited on white as Pillow's `on_white` does
 * for transparent images (alpha 255: unchanged). */
export function rgbaToRgb(rgba, width, height) {
  const n = width * height;
  if (rgba.length !== n * 4) throw new ImageError(`expected ${n * 4} bytes of RGBA, got ${rgba.length}`);
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = rgba[4 * i + 3];
    for (let c = 0; c < 3; c++) {
      const v = rgba[4 * i + c];
      // Pillow's alpha_composite over opaque white: round((v * a + 255 * (255 - a)) / 255).
      out[3 * i + c] = a === 255 ? v : Math.round((v * a + 255 * (255 - a)) / 255);
    }
  }
  return out;
}

export { checkPixels };
