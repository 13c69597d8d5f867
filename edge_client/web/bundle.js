// The edge bundle in the browser: parse and verify the safetensors blob that
// `GET /v1/models/{name}/edge-bundle` serves, with the checks of edge_client/bundle.py.
//
// Layout (edge_client/bundle.py has the full table): float32 CLIP patch/class/position embedding,
// pre_layrnorm (not at `embed`), the first k encoder layers at `block:k`, the quantizer's edge side
// (down projection, token centres, codebooks (G, S, K, d), stats range), optional uint32 rANS
// tables (G, S, K) and, for a ranked quantizer, int16 rank books (G, S, K, d) and offsets
// (T, G, S, d). The safetensors metadata key `alignedvq` holds the JSON that describes it.
//
// Loading checks the format and version, every metadata field's type and their consistency, every
// tensor's name, dtype and shape, the entropy tables, the rank geometry bounds, and the tensor hash
// (sha256 over `name:dtype:shape\n` + little-endian bytes, by name); any failure is a BundleError
// that names what was expected and what arrived, in the Python loader's words.

import { BundleError } from "./errors.js";
import { Sha256, sha256Hex } from "./sha256.js";

export const BUNDLE_FORMAT = "alignedvq-edge-bundle";
export const BUNDLE_VERSION = 1;
export const METADATA_KEY = "alignedvq";
export const SUPPORTED_ACTIVATIONS = ["gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu"];
export const MAX_BUNDLE_BYTES = 2 ** 30;
export const MAX_HEADER_BYTES = 2 ** 20;
export const MAX_MODEL_NAME_BYTES = 48;
const SITE = /^(?:embed|preln|block:([1-9][0-9]{0,2}))$/;
const SHA256 = /^[0-9a-f]{64}$/;
const DTYPES = {
  F32: { name: "float32", str: "<f4", size: 4, array: Float32Array },
  I16: { name: "int16", str: "<i2", size: 2, array: Int16Array },
  U32: { name: "uint32", str: "<u4", size: 4, array: Uint32Array },
};
const OTHER_DTYPES = { F16: "float16", BF16: "bfloat16", F64: "float64", I8: "int8", U8: "uint8",
  I32: "int32", I64: "int64", U16: "uint16", U64: "uint64", BOOL: "bool" };
const LAYER_SHAPES = [
  ["layer_norm1.weight", ["D"]], ["layer_norm1.bias", ["D"]],
  ["self_attn.q_proj.weight", ["D", "D"]], ["self_attn.q_proj.bias", ["D"]],
  ["self_attn.k_proj.weight", ["D", "D"]], ["self_attn.k_proj.bias", ["D"]],
  ["self_attn.v_proj.weight", ["D", "D"]], ["self_attn.v_proj.bias", ["D"]],
  ["self_attn.out_proj.weight", ["D", "D"]], ["self_attn.out_proj.bias", ["D"]],
  ["layer_norm2.weight", ["D"]], ["layer_norm2.bias", ["D"]],
  ["mlp.fc1.weight", ["F", "D"]], ["mlp.fc1.bias", ["F"]],
  ["mlp.fc2.weight", ["D", "F"]], ["mlp.fc2.bias", ["D"]],
];

/** Python's name for a JSON value's type, for messages shared with the Python loader. */
function typeName(value) {
  if (value === null) return "NoneType";
  if (Array.isArray(value)) return "list";
  if (typeof value === "boolean") return "bool";
  if (typeof value === "number") return Number.isInteger(value) ? "int" : "float";
  if (typeof value === "string") return "str";
  return "dict";
}

/** Python tuple repr of a shape: (256, 3, 8, 8), (256,), (). */
export function shapeRepr(shape) {
  return shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
}

function field(meta, key, kinds, where = "") {
  const name = `${where}${key}`;
  if (!Object.prototype.hasOwnProperty.call(meta, key)) {
    throw new BundleError(`bundle metadata lacks field '${name}'`);
  }
  const value = meta[key];
  const kind = typeName(value);
  const ok = kinds.includes(kind) || (kind === "int" && kinds.includes("float") && !kinds.includes("int"));
  if (!ok) {
    throw new BundleError(`bundle metadata field '${name}': expected ${kinds.join(" or ")}, got ${kind}`);
  }
  return value;
}

function positive(meta, key, where = "") {
  const value = field(meta, key, ["int"], where);
  if (value < 1) throw new BundleError(`bundle metadata field ${where}'${key}': expected a positive int, got ${value}`);
  return value;
}

function asBytes(data) {
  // A plain Uint8Array view even of a Node Buffer, whose slice() would not copy.
  if (data instanceof Uint8Array) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer || (typeof SharedArrayBuffer !== "undefined" && data instanceof SharedArrayBuffer)) {
    return new Uint8Array(data);
  }
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new BundleError(`expected the bundle as an ArrayBuffer or Uint8Array, got ${data === null ? "null" : typeof data}`);
}

function readHeader(bytes) {
  if (bytes.length < 8) throw new BundleError(`expected a safetensors blob of at least 8 bytes, got ${bytes.length}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const size = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  const limit = Math.min(MAX_HEADER_BYTES, bytes.length - 8);
  if (size > limit) {
    throw new BundleError(`expected a safetensors header of at most ${limit} bytes, got a declared ${size}`);
  }
  let header;
  let meta;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + size)));
    const text = header.__metadata__[METADATA_KEY];
    if (typeof text !== "string") throw new TypeError(`'${METADATA_KEY}' is not a string`);
    meta = JSON.parse(text);
  } catch (error) {
    throw new BundleError(
      `expected safetensors metadata with a JSON '${METADATA_KEY}' entry: ${error.name}: ${error.message}`,
    );
  }
  if (typeName(meta) !== "dict") {
    throw new BundleError(`expected the '${METADATA_KEY}' metadata to be a JSON object, got ${typeName(meta)}`);
  }
  if (meta.format !== BUNDLE_FORMAT) {
    throw new BundleError(`expected format '${BUNDLE_FORMAT}', got ${JSON.stringify(meta.format ?? null)}: not an edge bundle`);
  }
  if (meta.version !== BUNDLE_VERSION) {
    throw new BundleError(`expected edge bundle version ${BUNDLE_VERSION}, got version ${JSON.stringify(meta.version ?? null)}`);
  }
  return { header, meta, dataStart: 8 + size };
}

function visionSpec(meta) {
  const vision = field(meta, "vision", ["dict"]);
  const where = "vision.";
  const spec = {
    hiddenSize: positive(vision, "hidden_size", where),
    numAttentionHeads: positive(vision, "num_attention_heads", where),
    intermediateSize: positive(vision, "intermediate_size", where),
    patchSize: positive(vision, "patch_size", where),
    imageSize: positive(vision, "image_size", where),
    numChannels: positive(vision, "num_channels", where),
    layerNormEps: field(vision, "layer_norm_eps", ["int", "float"], where),
    hiddenAct: field(vision, "hidden_act", ["str"], where),
  };
  if (spec.hiddenSize % spec.numAttentionHeads) {
    throw new BundleError(
      `expected vision.hidden_size divisible by num_attention_heads, got ${spec.hiddenSize} and ${spec.numAttentionHeads}`,
    );
  }
  if (spec.imageSize % spec.patchSize) {
    throw new BundleError(
      `expected vision.image_size divisible by patch_size, got ${spec.imageSize} and ${spec.patchSize}`,
    );
  }
  spec.grid = spec.imageSize / spec.patchSize;
  spec.tokens = spec.grid * spec.grid + 1;
  return spec;
}

function imageSpec(meta) {
  const raw = field(meta, "image_spec", ["dict"]);
  const size = positive(raw, "size", "image_spec.");
  const out = { size };
  for (const key of ["mean", "std"]) {
    const values = field(raw, key, ["list"], "image_spec.");
    if (values.length !== 3 || !values.every((v) => typeof v === "number")) {
      throw new BundleError(`expected image_spec.${key} to be 3 numbers, got ${JSON.stringify(values)}`);
    }
    out[key] = values.slice();
  }
  if (Math.min(...out.std) <= 0) throw new BundleError(`expected positive image_spec.std, got ${JSON.stringify(out.std)}`);
  return out;
}

function edgeBlocks(site) {
  const match = SITE.exec(site);
  if (match === null) throw new BundleError(`expected split_site 'embed', 'preln' or 'block:k', got '${site}'`);
  return match[1] ? Number(match[1]) : 0;
}

function laterSetting(raw, key, where, allowed, needs) {
  const value = Object.prototype.hasOwnProperty.call(raw, key) ? field(raw, key, ["int", "float"], where) : 0;
  if (!(value >= 0 && value < Infinity) || (value && !allowed)) {
    const condition = needs ? ` with ${needs}` : "";
    throw new BundleError(`expected ${where}${key} 0, or finite and > 0${condition}, got ${value}`);
  }
  return value;
}

function quantizerMeta(meta, vision, tokens, site) {
  const raw = field(meta, "quantizer", ["dict"]);
  const where = "quantizer.";
  const q = {};
  for (const key of ["dim", "groups", "stages", "codebook_size", "code_dim"]) q[key] = positive(raw, key, where);
  q.stat_bits = field(raw, "stat_bits", ["int"], where);
  q.tokens = field(raw, "tokens", ["int"], where);
  q.split_site = field(raw, "split_site", ["str"], where);
  if (q.split_site !== site) {
    throw new BundleError(`expected quantizer.split_site '${site}' (the bundle's), got '${q.split_site}'`);
  }
  if (q.dim !== vision.hiddenSize) {
    throw new BundleError(`expected quantizer.dim ${vision.hiddenSize} (vision hidden size), got ${q.dim}`);
  }
  if (q.groups * q.code_dim > q.dim) {
    throw new BundleError(`expected groups * code_dim <= dim ${q.dim}, got ${q.groups * q.code_dim}`);
  }
  if (!(q.codebook_size >= 2 && q.codebook_size <= 65536)) {
    throw new BundleError(`expected quantizer.codebook_size in 2..65536, got ${q.codebook_size}`);
  }
  const needsStats = site.startsWith("block:");
  if (!(q.stat_bits >= 0 && q.stat_bits <= 16) || needsStats !== q.stat_bits > 0) {
    throw new BundleError(
      `expected quantizer.stat_bits ${needsStats ? "1..16" : "0"} at site ${site}, got ${q.stat_bits}`,
    );
  }
  if (q.tokens !== 0 && q.tokens !== tokens) {
    throw new BundleError(`expected quantizer.tokens 0 or ${tokens}, got ${q.tokens}`);
  }
  q.rank_tokens = Object.prototype.hasOwnProperty.call(raw, "rank_tokens") ? field(raw, "rank_tokens", ["int"], where) : 0;
  if (q.rank_tokens !== 0 && q.rank_tokens !== tokens) {
    throw new BundleError(`expected quantizer.rank_tokens 0 or ${tokens}, got ${q.rank_tokens}`);
  }
  q.refine_threshold = laterSetting(raw, "refine_threshold", where, q.stages >= 2, "2+ stages");
  q.rate_lambda = laterSetting(raw, "rate_lambda", where, q.rank_tokens > 0, "rank_tokens");
  q.background_norm = laterSetting(raw, "background_norm", where, true, "");
  return q;
}

function expectedShapes(q, vision, blocks) {
  const sizes = { D: vision.hiddenSize, F: vision.intermediateSize };
  const p = vision.patchSize;
  const D = vision.hiddenSize;
  const shapes = {
    "embeddings.patch_embedding.weight": [D, vision.numChannels, p, p],
    "embeddings.class_embedding": [D],
    "embeddings.position_embedding.weight": [vision.tokens, D],
    "quantizer.down.weight": [q.groups * q.code_dim, D],
    "quantizer.down.bias": [q.groups * q.code_dim],
    "quantizer.token_mean": [Math.max(q.tokens, 1), D],
    "quantizer.codebooks": [q.groups, q.stages, q.codebook_size, q.code_dim],
    "quantizer.stats_range": [2, 2],
  };
  if (q.split_site !== "embed") {
    shapes["pre_layrnorm.weight"] = [D];
    shapes["pre_layrnorm.bias"] = [D];
  }
  for (let i = 0; i < blocks; i++) {
    for (const [name, dims] of LAYER_SHAPES) shapes[`encoder.layers.${i}.${name}`] = dims.map((d) => sizes[d]);
  }
  return shapes;
}

function rankingShapes(q) {
  if (!q.rank_tokens) return {};
  return {
    "quantizer.rank_books": [q.groups, q.stages, q.codebook_size, q.code_dim],
    "quantizer.rank_offsets": [q.rank_tokens, q.groups, q.stages, q.code_dim],
  };
}

/** The tensors of a safetensors header as {name: {dtype, shape, begin, end}}, offsets checked. */
function tensorEntries(header, bytes, dataStart) {
  const entries = {};
  const dataSize = bytes.length - dataStart;
  const spans = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const bad = (what) => new BundleError(`expected valid safetensors data: tensor ${name}: ${what}`);
    if (typeName(info) !== "dict" || !Array.isArray(info.shape) || !Array.isArray(info.data_offsets)) {
      throw bad("expected dtype, shape and data_offsets");
    }
    const dtype = DTYPES[info.dtype];
    const itemSize = dtype ? dtype.size : { F16: 2, BF16: 2, F64: 8, I8: 1, U8: 1, I32: 4, I64: 8, U16: 2, U64: 8, BOOL: 1 }[info.dtype];
    if (itemSize === undefined) throw bad(`unknown dtype ${JSON.stringify(info.dtype)}`);
    if (!info.shape.every((d) => Number.isInteger(d) && d >= 0)) throw bad(`invalid shape ${JSON.stringify(info.shape)}`);
    const [begin, end] = info.data_offsets;
    const count = info.shape.reduce((a, b) => a * b, 1);
    if (!Number.isInteger(begin) || !Number.isInteger(end) || begin < 0 || end > dataSize || end - begin !== count * itemSize) {
      throw bad(`data_offsets ${JSON.stringify(info.data_offsets)} do not fit shape ${shapeRepr(info.shape)} ` +
        `of ${info.dtype} in ${dataSize} bytes`);
    }
    spans.push([begin, end]);
    entries[name] = { dtype: info.dtype, shape: info.shape, begin, end };
  }
  spans.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let covered = 0;
  for (const [begin, end] of spans) {
    if (begin !== covered) throw new BundleError("expected valid safetensors data: tensor data overlaps or leaves gaps");
    covered = end;
  }
  if (covered !== dataSize) throw new BundleError("expected valid safetensors data: tensor data overlaps or leaves gaps");
  return entries;
}

function dtypeName(code) {
  return DTYPES[code] ? DTYPES[code].name : OTHER_DTYPES[code];
}

function sameShape(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

function checkTensors(entries, expected, ranking, freqsShape) {
  const names = new Set([...Object.keys(expected), ...Object.keys(ranking)]);
  const present = new Set(Object.keys(entries));
  const missing = [...names].filter((n) => !present.has(n)).sort();
  const unexpected = [...present].filter((n) => !names.has(n) && n !== "quantizer.freqs").sort();
  if (missing.length || unexpected.length) {
    const list = (xs) => `[${xs.map((x) => `'${x}'`).join(", ")}]`;
    throw new BundleError(`bundle tensors do not match its metadata: missing ${list(missing)}, unexpected ${list(unexpected)}`);
  }
  for (const [code, shapes] of [["F32", expected], ["I16", ranking]]) {
    for (const [name, shape] of Object.entries(shapes)) {
      const entry = entries[name];
      if (entry.dtype !== code || !sameShape(entry.shape, shape)) {
        throw new BundleError(
          `tensor ${name}: expected ${DTYPES[code].name} ${shapeRepr(shape)}, got ${dtypeName(entry.dtype)} ${shapeRepr(entry.shape)}`,
        );
      }
    }
  }
  const freqs = entries["quantizer.freqs"];
  if (freqs && (freqs.dtype !== "U32" || !sameShape(freqs.shape, freqsShape))) {
    throw new BundleError(
      `tensor quantizer.freqs: expected uint32 ${shapeRepr(freqsShape)}, got ${dtypeName(freqs.dtype)} ${shapeRepr(freqs.shape)}`,
    );
  }
}

/** A tensor's values in a fresh, aligned typed array (safetensors offsets need not be aligned). */
function tensorArray(bytes, dataStart, entry) {
  const dtype = DTYPES[entry.dtype];
  const copy = bytes.slice(dataStart + entry.begin, dataStart + entry.end);
  return new dtype.array(copy.buffer, 0, (entry.end - entry.begin) / dtype.size);
}

/** sha256 over `name:dtype:shape\n` and each tensor's little-endian bytes, names sorted. */
function tensorsSha256(entries, bytes, dataStart) {
  const hash = new Sha256();
  const encoder = new TextEncoder();
  for (const name of Object.keys(entries).sort()) {
    const entry = entries[name];
    const code = DTYPES[entry.dtype] ? DTYPES[entry.dtype].str : entry.dtype;
    hash.update(encoder.encode(`${name}:${code}:${shapeRepr(entry.shape)}\n`));
    hash.update(bytes.subarray(dataStart + entry.begin, dataStart + entry.end));
  }
  return hash.hex();
}

function checkFreqs(freqs, shape) {
  const [groups, stages, size] = shape;
  for (let row = 0; row < groups * stages; row++) {
    let sum = 0;
    let min = Infinity;
    for (let i = row * size; i < (row + 1) * size; i++) {
      sum += freqs[i];
      if (freqs[i] < min) min = freqs[i];
    }
    if (min < 1) {
      throw new BundleError(`tensor quantizer.freqs is not a valid rANS table: expected every frequency >= 1, got ${min}`);
    }
    if (sum !== 2 ** 24) {
      throw new BundleError(
        `tensor quantizer.freqs is not a valid rANS table: expected every row to sum to 2**24 = 16777216 ` +
        `(use normalize_freqs), got ${sum} in row ${row}`,
      );
    }
  }
}

/** Largest |value| of an integer codebook of `dim` dims whose distances stay exact in float32. */
export function maxBook(dim) {
  return Math.floor(Math.sqrt(Math.floor(2 ** 24 / (5 * dim))));
}

function maxAbs(array) {
  let m = 0;
  for (let i = 0; i < array.length; i++) {
    const v = Math.abs(array[i]);
    if (v > m) m = v;
  }
  return m;
}

function checkRanking(books, offsets, dim) {
  const bound = maxBook(dim);
  const b = maxAbs(books);
  const o = maxAbs(offsets);
  if (b > bound || o > 2 * bound) {
    throw new BundleError(
      `invalid neighbour ranking: expected |books| <= ${bound} and |offsets| <= ${2 * bound} for code_dim ${dim} ` +
      `(exact float32 distances), got ${b} and ${o}`,
    );
  }
}

function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/**
 * Parse and verify an edge bundle (the bytes of `GET /v1/models/{name}/edge-bundle`).
 *
 * `data`: an ArrayBuffer or Uint8Array. Returns a plain object: `model`, `splitSite`, `tokens`,
 * `groups`, `stages`, `codebookSize`, `codeDim`, `statBits`, `quantizerTokens`, `refineThreshold`,
 * `rateLambda`, `backgroundNorm`, `codebookHash`, `imageSpec` {size, mean, std}, `vision`, `edgeBlocks`,
 * `bitsPerIndex`, `bitsPerToken`, `entropyCoded`, `ranked`, `tensors` (name -> typed array),
 * `nbytes`, `metadata` and `sha256` (of the whole blob, computed on first read). Throws
 * BundleError naming the first problem found.
 */
export function loadBundle(data) {
  const bytes = asBytes(data);
  if (bytes.length > MAX_BUNDLE_BYTES) {
    throw new BundleError(`expected a bundle of at most ${MAX_BUNDLE_BYTES} bytes, got ${bytes.length}`);
  }
  const { header, meta, dataStart } = readHeader(bytes);
  const model = field(meta, "model", ["str"]);
  const site = field(meta, "split_site", ["str"]);
  const blocks = edgeBlocks(site);
  const tokens = positive(meta, "tokens");
  const vision = visionSpec(meta);
  if (tokens !== vision.tokens) throw new BundleError(`expected tokens ${vision.tokens} for the vision geometry, got ${tokens}`);
  const image = imageSpec(meta);
  if (image.size !== vision.imageSize) {
    throw new BundleError(`expected image_spec.size ${vision.imageSize} (vision.image_size), got ${image.size}`);
  }
  if (blocks && !SUPPORTED_ACTIVATIONS.includes(vision.hiddenAct)) {
    throw new BundleError(
      `expected vision.hidden_act in [${SUPPORTED_ACTIVATIONS.map((a) => `'${a}'`).join(", ")}], got '${vision.hiddenAct}'`,
    );
  }
  const q = quantizerMeta(meta, vision, tokens, site);
  const codebookHash = field(meta, "codebook_hash", ["str"]);
  if (!SHA256.test(codebookHash)) {
    throw new BundleError(`expected codebook_hash as 64 lower-case hex chars, got '${codebookHash}'`);
  }
  const recorded = field(meta, "tensors_sha256", ["str"]);

  const entries = tensorEntries(header, bytes, dataStart);
  const freqsShape = [q.groups, q.stages, q.codebook_size];
  checkTensors(entries, expectedShapes(q, vision, blocks), rankingShapes(q), freqsShape);
  const tensors = {};
  for (const [name, entry] of Object.entries(entries)) tensors[name] = tensorArray(bytes, dataStart, entry);
  if (tensors["quantizer.freqs"]) checkFreqs(tensors["quantizer.freqs"], freqsShape);
  const entropyCoded = field(meta, "entropy_coded", ["bool"]);
  if (entropyCoded !== ("quantizer.freqs" in tensors)) {
    throw new BundleError(
      `metadata says entropy_coded=${entropyCoded ? "True" : "False"}, but quantizer.freqs is ` +
      `${"quantizer.freqs" in tensors ? "present" : "absent"}`,
    );
  }
  const actual = tensorsSha256(entries, bytes, dataStart);
  if (actual !== recorded) {
    throw new BundleError(`expected tensors_sha256 ${recorded.slice(0, 16)}..., got ${actual.slice(0, 16)}...: the bundle was altered`);
  }
  if (q.rank_tokens) checkRanking(tensors["quantizer.rank_books"], tensors["quantizer.rank_offsets"], q.code_dim);

  const nameBytes = utf8Length(model);
  if (nameBytes < 1 || nameBytes > MAX_MODEL_NAME_BYTES || tokens > 0xffff || q.groups > 0xff || q.stages > 0xff ||
      blocks > 255) {
    throw new BundleError(
      `bundle does not fit the stream format: expected a model name of 1..${MAX_MODEL_NAME_BYTES} utf-8 bytes, ` +
      `tokens <= 65535, groups and stages <= 255 and k < 256, got ${nameBytes} bytes, ${tokens}, ${q.groups}, ` +
      `${q.stages} and ${blocks}`,
    );
  }
  const bitsPerIndex = Math.max(1, 32 - Math.clz32(q.codebook_size - 1));
  let sha256 = null;
  return {
    model,
    splitSite: site,
    tokens,
    groups: q.groups,
    stages: q.stages,
    codebookSize: q.codebook_size,
    codeDim: q.code_dim,
    statBits: q.stat_bits,
    quantizerTokens: q.tokens,
    refineThreshold: q.refine_threshold,
    rateLambda: q.rate_lambda,
    backgroundNorm: q.background_norm,
    codebookHash,
    imageSpec: image,
    vision,
    edgeBlocks: blocks,
    bitsPerIndex,
    bitsPerToken: q.groups * q.stages * bitsPerIndex + 2 * q.stat_bits,
    entropyCoded,
    ranked: q.rank_tokens > 0,
    tensors,
    nbytes: bytes.length,
    metadata: meta,
    get sha256() {
      if (sha256 === null) sha256 = sha256Hex(bytes);
      return sha256;
    },
  };
}
