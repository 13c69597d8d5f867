// The `POST /v1/vqa` request body (edge_client/protocol.py): one msgpack map, byte for byte what
// the Python client sends. Fields in the Python model's order: v, request_id, model, question,
// features | image, max_new_tokens (left out at its default 8), timeout_ms (if given). Only the
// msgpack types the request uses are written (positive ints, str, bin, map), in their smallest
// form as msgpack-python does, so no third-party msgpack library is needed.

export const PROTOCOL_VERSION = 1;
export const DEFAULT_MAX_NEW_TOKENS = 8;
export const MAX_NEW_TOKENS = 512;
export const CONTENT_TYPE = "application/msgpack";
const REQUEST_ID = /^[A-Za-z0-9_.:-]{1,64}$/;

class Writer {
  constructor() {
    this.parts = [];
    this.length = 0;
  }

  bytes(array) {
    this.parts.push(array);
    this.length += array.length;
  }

  head(...values) {
    this.bytes(Uint8Array.from(values));
  }

  uint(n) {
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new RangeError(`expected an unsigned 32-bit int, got ${n}`);
    if (n < 0x80) this.head(n);
    else if (n < 0x100) this.head(0xcc, n);
    else if (n < 0x10000) this.head(0xcd, n >> 8, n & 0xff);
    else this.head(0xce, n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  }

  str(text) {
    const data = new TextEncoder().encode(text);
    const n = data.length;
    if (n < 32) this.head(0xa0 | n);
    else if (n < 0x100) this.head(0xd9, n);
    else if (n < 0x10000) this.head(0xda, n >> 8, n & 0xff);
    else this.head(0xdb, n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
    this.bytes(data);
  }

  bin(data) {
    const n = data.length;
    if (n < 0x100) this.head(0xc4, n);
    else if (n < 0x10000) this.head(0xc5, n >> 8, n & 0xff);
    else this.head(0xc6, n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
    this.bytes(data);
  }

  map(n) {
    if (n < 16) this.head(0x80 | n);
    else this.head(0xde, n >> 8, n & 0xff);
  }

  result() {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const part of this.parts) {
      out.set(part, at);
      at += part.length;
    }
    return out;
  }
}

/** 128 random bits as 22 base64url characters (protocol.py's new_request_id). */
export function newRequestId() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * The msgpack body of one request. `fields`: request_id, model, question, and exactly one of
 * features / image (Uint8Array); optional max_new_tokens (1..512), timeout_ms. (The page sends
 * neither image_ref nor history, the conversation fields, so they are not written here.)
 */
export function encodeRequest(fields) {
  const { request_id: requestId, model, question, features, image } = fields;
  if (!REQUEST_ID.test(requestId ?? "")) throw new RangeError("request_id: 1-64 chars of [A-Za-z0-9_.:-]");
  if (typeof model !== "string" || model.length < 1 || model.length > 48) throw new RangeError("model: 1..48 characters");
  if (typeof question !== "string" || question.length < 1 || question.length > 1024) {
    throw new RangeError("question: 1..1024 characters");
  }
  if ((features == null) === (image == null)) {
    throw new RangeError("exactly one of 'features' (edge-cloud) or 'image' (cloud-only) is required");
  }
  const maxNewTokens = fields.max_new_tokens ?? DEFAULT_MAX_NEW_TOKENS;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1 || maxNewTokens > MAX_NEW_TOKENS) {
    throw new RangeError(`max_new_tokens: 1..${MAX_NEW_TOKENS}`);
  }
  const entries = [
    ["v", (w) => w.uint(PROTOCOL_VERSION)],
    ["request_id", (w) => w.str(requestId)],
    ["model", (w) => w.str(model)],
    ["question", (w) => w.str(question)],
  ];
  if (features != null) entries.push(["features", (w) => w.bin(features)]);
  if (image != null) entries.push(["image", (w) => w.bin(image)]);
  if (maxNewTokens !== DEFAULT_MAX_NEW_TOKENS) entries.push(["max_new_tokens", (w) => w.uint(maxNewTokens)]);
  if (fields.timeout_ms != null) entries.push(["timeout_ms", (w) => w.uint(fields.timeout_ms)]);
  const writer = new Writer();
  writer.map(entries.length);
  for (const [key, write] of entries) {
    writer.str(key);
    write(writer);
  }
  return writer.result();
}
