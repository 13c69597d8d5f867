// loadBundle refuses what edge_client.bundle.EdgeBundle.from_bytes refuses, with its messages.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { loadBundle } from "../../edge_client/web/alignedvq.js";

const GOLDEN = fileURLToPath(new URL("./golden", import.meta.url));
const good = new Uint8Array(readFileSync(`${GOLDEN}/tiny-preln-r2-gated-rdo.bundle`));
const blocks = new Uint8Array(readFileSync(`${GOLDEN}/tiny-block1-quick-gelu.bundle`));

/** The bundle's parts: safetensors header JSON, its alignedvq metadata, the data section. */
function parts(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const size = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(data.subarray(8, 8 + size)));
  const meta = JSON.parse(header.__metadata__.alignedvq);
  return { header, meta, body: data.subarray(8 + size) };
}

/** A safetensors blob from tensors {name: {dtype, shape, bytes}} and metadata. */
function build(tensors, meta) {
  const header = { __metadata__: { alignedvq: JSON.stringify(meta) } };
  let offset = 0;
  const names = Object.keys(tensors).sort();
  for (const name of names) {
    const t = tensors[name];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  const text = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + text.length + offset);
  new DataView(out.buffer).setUint32(0, text.length, true);
  out.set(text, 8);
  let at = 8 + text.length;
  for (const name of names) {
    out.set(tensors[name].bytes, at);
    at += tensors[name].bytes.length;
  }
  return out;
}

/** edge_client.bundle.tensors_sha256, so an edit reaches the checks behind the hash. */
function tensorsSha256(tensors) {
  const hash = createHash("sha256");
  const codes = { F32: "<f4", I16: "<i2", U32: "<u4" };
  for (const name of Object.keys(tensors).sort()) {
    const t = tensors[name];
    const shape = t.shape.length === 1 ? `(${t.shape[0]},)` : `(${t.shape.join(", ")})`;
    hash.update(`${name}:${codes[t.dtype]}:${shape}\n`);
    hash.update(t.bytes);
  }
  return hash.digest("hex");
}

function rebuild(data, edit) {
  const { header, meta, body } = parts(data);
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    tensors[name] = { dtype: info.dtype, shape: info.shape, bytes: body.slice(info.data_offsets[0], info.data_offsets[1]) };
  }
  edit(tensors, meta);
  meta.tensors_sha256 ??= tensorsSha256(tensors);
  return build(tensors, meta);
}

describe("loadBundle", () => {
  test("a good bundle loads with its geometry", () => {
    const b = loadBundle(good.buffer.slice(good.byteOffset, good.byteOffset + good.byteLength));
    assert.equal(b.model, "llava-tiny");
    assert.equal(b.splitSite, "preln");
    assert.equal(b.tokens, 17);
    assert.deepEqual([b.groups, b.stages, b.codebookSize, b.codeDim], [1, 2, 16, 8]);
    assert.ok(b.refineThreshold > 0 && b.rateLambda > 0 && b.ranked && b.entropyCoded);
    assert.equal(b.bitsPerIndex, 4);
    assert.equal(b.bitsPerToken, 8);
    assert.equal(b.nbytes, good.length);
    assert.match(b.sha256, /^[0-9a-f]{64}$/);
    assert.equal(loadBundle(blocks).edgeBlocks, 1);
  });

  test("a rebuilt identical bundle still loads (the helper is faithful)", () => {
    assert.equal(loadBundle(rebuild(good, () => {})).tokens, 17);
  });

  const refused = [
    ["an altered tensor fails the hash", () => {
      const copy = good.slice();
      copy[copy.length - 3] ^= 1;
      return copy;
    }, /the bundle was altered/],
    ["garbage", () => new TextEncoder().encode("not a bundle at all"), /expected a safetensors header of at most/],
    ["too short", () => new Uint8Array(3), /at least 8 bytes, got 3/],
    ["truncated", () => good.subarray(0, good.length - 100), /expected valid safetensors data/],
    ["another format", () => rebuild(good, (t, m) => { m.format = "other"; }), /expected format 'alignedvq-edge-bundle', got "other"/],
    ["another version", () => rebuild(good, (t, m) => { m.version = 2; }), /expected edge bundle version 1, got version 2/],
    ["a missing tensor", () => rebuild(good, (t) => { delete t["quantizer.codebooks"]; }), /missing \['quantizer.codebooks'\], unexpected \[\]/],
    ["an extra layer", () => rebuild(good, (t) => { t["encoder.layers.0.mlp.fc1.bias"] = t["quantizer.down.bias"]; }), /unexpected \['encoder.layers.0.mlp.fc1.bias'\]/],
    ["a wrong shape", () => rebuild(good, (t) => { t["quantizer.codebooks"].shape = [1, 2, 8, 16]; }), /tensor quantizer.codebooks: expected float32 \(1, 2, 16, 8\), got float32 \(1, 2, 8, 16\)/],
    ["a bool where an int belongs", () => rebuild(good, (t, m) => { m.tokens = true; }), /field 'tokens': expected int, got bool/],
    ["a bad split site", () => rebuild(good, (t, m) => { m.split_site = "block:0"; }), /expected split_site 'embed', 'preln' or 'block:k', got 'block:0'/],
    ["inconsistent tokens", () => rebuild(good, (t, m) => { m.tokens = 16; }), /expected tokens 17 for the vision geometry, got 16/],
    ["rate_lambda without ranks", () => rebuild(good, (t, m) => { m.quantizer.rank_tokens = 0; }), /rank_tokens/],
    ["a negative background norm", () => rebuild(good, (t, m) => { m.quantizer.background_norm = -1; }), /expected quantizer.background_norm 0, or finite and > 0, got -1/],
    ["a negative threshold", () => rebuild(good, (t, m) => { m.quantizer.refine_threshold = -1; }), /expected quantizer.refine_threshold 0, or finite and > 0 with 2\+ stages, got -1/],
    ["entropy_coded without tables", () => rebuild(good, (t, m) => { m.entropy_coded = false; }), /metadata says entropy_coded=False, but quantizer.freqs is present/],
    ["a bad codebook hash", () => rebuild(good, (t, m) => { m.codebook_hash = "ABC"; }), /expected codebook_hash as 64 lower-case hex chars/],
    ["an unsupported activation", () => rebuild(blocks, (t, m) => { m.vision.hidden_act = "relu"; }), /expected vision.hidden_act in \[.*\], got 'relu'/],
    ["a table row that does not sum to 2**24", () => rebuild(good, (t) => {
      const f = t["quantizer.freqs"].bytes;
      f[0] ^= 1;
    }), /not a valid rANS table/],
    ["rank books out of bounds", () => rebuild(good, (t, m) => {
      const b = t["quantizer.rank_books"].bytes;
      b[1] = 0x7f;
      m.tensors_sha256 = tensorsSha256(t);
    }), /expected \|books\| <= 647/],
    ["a model name too long for the stream", () => rebuild(good, (t, m) => { m.model = "x".repeat(49); }), /does not fit the stream format/],
  ];
  for (const [what, make, message] of refused) {
    test(`refuses ${what}`, () => {
      assert.throws(() => loadBundle(make()), (error) => {
        assert.equal(error.code, "bad_bundle", error.message);
        assert.match(error.message, message);
        return true;
      });
    });
  }
});
