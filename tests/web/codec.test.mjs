// The browser codec (edge_client/web/alignedvq.js) against the Python edge: `node --test tests/web`.
//
// Golden files come from tests/web/make_golden.py: tests/web/golden (committed; tiny towers at
// every split site, activation and coder) and build/web-golden (`make test` writes it: every
// quantizer of the bundled models, and the LLaVA-1.5 geometry). The bar (issue 16): the streams
// decode to Python's indices for >= 99.9 % of tokens, and the bytes are identical whenever the
// indices are; both kernel backends (WebAssembly SIMD and the plain-JS twins) are held to it.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as avq from "../../edge_client/web/alignedvq.js";
import { allocatedBytes } from "../../edge_client/web/kernels.js";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const COMMITTED = here("./golden");
const BUNDLED = here("../../build/web-golden");
const TOKEN_BAR = 0.999;

function loadCases(dir) {
  const index = JSON.parse(readFileSync(`${dir}/index.json`, "utf8"));
  const imageFiles = new Map();
  return index.map(({ case: name }) => {
    const golden = JSON.parse(readFileSync(`${dir}/${name}.json`, "utf8"));
    if (!imageFiles.has(golden.images_file)) {
      const raw = JSON.parse(readFileSync(`${dir}/${golden.images_file}`, "utf8"));
      const decoded = {};
      for (const [key, image] of Object.entries(raw)) {
        decoded[key] = { ...image, rgb: new Uint8Array(Buffer.from(image.rgb, "base64")) };
      }
      imageFiles.set(golden.images_file, decoded);
    }
    return { name, golden, images: imageFiles.get(golden.images_file), data: readFileSync(`${dir}/${golden.bundle}`) };
  });
}

/** Encode every golden image both ways; returns token and stream counts for the bar. */
function compare(c, bundle) {
  const tally = { tokens: 0, tokensEqual: 0, streams: 0, streamsEqual: 0, equalIndicesOtherBytes: [], coders: new Set() };
  const perToken = bundle.groups * bundle.stages;
  for (const [key, expected] of Object.entries(c.golden.images)) {
    const image = c.images[key];
    for (const mode of ["entropy", "packed"]) {
      const want = expected[mode];
      const got = avq.encodeImageDetailed(bundle, image.rgb, image.width, image.height, { entropy: mode === "entropy" });
      let allEqual = true;
      for (let t = 0; t < bundle.tokens; t++) {
        let same = true;
        for (let m = 0; m < perToken; m++) same &&= got.indices[t * perToken + m] === want.indices[t * perToken + m];
        tally.tokens++;
        tally.tokensEqual += same;
        allEqual &&= same;
      }
      const bytesEqual = Buffer.from(got.stream).equals(Buffer.from(want.stream, "base64"));
      tally.streams++;
      tally.streamsEqual += bytesEqual;
      tally.coders.add(got.coder);
      if (allEqual && !bytesEqual) tally.equalIndicesOtherBytes.push(`${key}/${mode}`);
      if (allEqual) {
        assert.equal(got.coder, want.coder, `${c.name} ${key} ${mode}: coder`);
        if (want.ranks && mode === "entropy") assert.deepEqual(Array.from(got.ranks ?? []), want.ranks, `${c.name} ${key} ${mode}: ranks`);
      }
    }
  }
  return tally;
}

function checkBar(label, tallies) {
  const total = { tokens: 0, tokensEqual: 0, streams: 0, streamsEqual: 0, bad: [] };
  for (const [name, t] of tallies) {
    total.tokens += t.tokens;
    total.tokensEqual += t.tokensEqual;
    total.streams += t.streams;
    total.streamsEqual += t.streamsEqual;
    total.bad.push(...t.equalIndicesOtherBytes.map((x) => `${name} ${x}`));
  }
  const share = total.tokensEqual / total.tokens;
  console.log(
    `# ${label}: ${total.tokensEqual}/${total.tokens} tokens (${(100 * share).toFixed(3)} %) and ` +
    `${total.streamsEqual}/${total.streams} streams identical to Python's`,
  );
  assert.deepEqual(total.bad, [], "streams whose indices match Python's must match byte for byte");
  assert.ok(share >= TOKEN_BAR, `${label}: ${(100 * share).toFixed(3)} % of tokens match, expected >= 99.9 %`);
}

for (const backendName of ["wasm", "js"]) {
  describe(`committed golden files, ${backendName} kernels`, () => {
    const cases = loadCases(COMMITTED);
    const tallies = [];
    test("the kernels backend is available", () => {
      avq.setBackend(backendName);
      assert.equal(avq.backend(), backendName);
    });
    for (const c of cases) {
      test(`${c.name}: same streams as the Python encoder`, () => {
        avq.setBackend(backendName);
        const bundle = avq.loadBundle(c.data);
        assert.equal(bundle.sha256, c.golden.bundle_sha256);
        assert.equal(bundle.splitSite, c.golden.geometry.split_site);
        assert.equal(bundle.ranked, c.golden.geometry.ranked);
        const tally = compare(c, bundle);
        tallies.push([c.name, tally]);
        // The tiny towers leave no near-ties: every stream is identical.
        assert.equal(tally.streamsEqual, tally.streams, `${c.name}: ${tally.streams - tally.streamsEqual} streams differ`);
        avq.disposeBundle(bundle);
      });
    }
    test("every split site, activation and coder is covered", () => {
      const sites = new Set(cases.map((c) => c.golden.geometry.split_site.replace(/:\d+/, ":k")));
      assert.deepEqual([...sites].sort(), ["block:k", "embed", "preln"]);
      const acts = new Set(cases.filter((c) => c.golden.geometry.split_site.startsWith("block")).map((c) => c.golden.geometry.hidden_act));
      assert.deepEqual([...acts].sort(), [...avq.SUPPORTED_ACTIVATIONS].sort());
      const coders = new Set(tallies.flatMap(([, t]) => [...t.coders]));
      assert.deepEqual([...coders].sort(), ["packed", "ranked", "rans"]);
      assert.ok(cases.some((c) => c.golden.geometry.rate_lambda > 0 && c.golden.geometry.refine_threshold > 0));
      checkBar(`committed, ${backendName}`, tallies);
    });
  });
}

describe("bundled models and the LLaVA-1.5 geometry (build/web-golden, written by make test)", () => {
  test("the generated golden files exist", () => {
    assert.ok(
      existsSync(`${BUNDLED}/index.json`),
      "build/web-golden is missing: run `make web-golden` (python -m tests.web.make_golden --bundled build/web-golden)",
    );
  });
  if (!existsSync(`${BUNDLED}/index.json`)) return;
  const cases = loadCases(BUNDLED);
  const tallies = [];
  for (const c of cases) {
    test(`${c.name}: same streams as the Python encoder`, () => {
      avq.setBackend("wasm");
      const bundle = avq.loadBundle(c.data);
      assert.equal(bundle.sha256, c.golden.bundle_sha256);
      tallies.push([c.name, compare(c, bundle)]);
      avq.disposeBundle(bundle);
    });
  }
  test("parity bar over every bundled quantizer and the LLaVA-1.5 geometry", () => {
    assert.ok(cases.some((c) => c.name === "llava-1.5-geometry"));
    assert.ok(cases.some((c) => c.name === "llava-mini-shapes--preln-r2x4096-t12-ranked"));
    checkBar("bundled + LLaVA-1.5", tallies);
  });
});

describe("preprocessing", () => {
  const cases = loadCases(COMMITTED);
  test("resize and crop match Pillow's bicubic resample bit for bit", () => {
    const c = cases[0];
    let checked = 0;
    for (const [key, expected] of Object.entries(c.golden.images)) {
      if (!expected.resized_sha256) continue;
      const image = c.images[key];
      const out = avq.resizeAndCrop(image.rgb, image.width, image.height, 32);
      assert.equal(createHash("sha256").update(out).digest("hex"), expected.resized_sha256, key);
      checked++;
    }
    assert.ok(checked >= 2, "a downscaled and an upscaled image");
  });
  test("pixels of the wrong size are refused with bad_image", () => {
    const bundle = avq.loadBundle(cases[0].data);
    assert.throws(() => avq.encodeImage(bundle, new Uint8Array(10), 2, 2), { code: "bad_image", message: /expected 2 x 2 x 3 = 12 bytes/ });
    assert.throws(() => avq.encodeImage(bundle, [1, 2, 3], 1, 1), { code: "bad_image" });
  });
  test("RGBA is composited on white", () => {
    assert.deepEqual(Array.from(avq.rgbaToRgb(Uint8Array.from([10, 20, 30, 255, 0, 0, 0, 0]), 2, 1)), [10, 20, 30, 255, 255, 255]);
  });
});

describe("memory", () => {
  test("encoding gives back all its scratch memory", () => {
    const [c] = loadCases(COMMITTED).filter((x) => x.name === "tiny-preln-g2s2-k128-rdo");
    const bundle = avq.loadBundle(c.data);
    const image = Object.values(c.images)[0];
    avq.encodeImage(bundle, image.rgb, image.width, image.height); // prepares the bundle
    const before = allocatedBytes();
    for (let i = 0; i < 5; i++) avq.encodeImage(bundle, image.rgb, image.width, image.height);
    assert.equal(allocatedBytes(), before);
    avq.disposeBundle(bundle);
  });
});

describe("wire helpers", () => {
  test("request bodies are byte for byte edge_client.protocol.encode_request's", () => {
    const rows = JSON.parse(readFileSync(`${COMMITTED}/protocol.json`, "utf8"));
    const pattern = (n) => Uint8Array.from({ length: n }, (_, i) => (i * 131 + 7) % 256);
    for (const row of rows) {
      const fields = { ...row.fields };
      for (const [key, value] of Object.entries(fields)) if (value && value.pattern) fields[key] = pattern(value.pattern);
      const body = avq.encodeRequest(fields);
      assert.equal(body.length, row.body_bytes);
      assert.equal(createHash("sha256").update(body).digest("hex"), row.body_sha256);
      if (row.body) assert.equal(Buffer.from(body).toString("base64"), row.body);
    }
    assert.ok(rows.some((row) => row.body_bytes > 65536), "a bin32 field");
    assert.throws(() => avq.encodeRequest({ request_id: "a", model: "m", question: "q" }), /exactly one of/);
    assert.match(avq.newRequestId(), /^[A-Za-z0-9_-]{22}$/);
  });
  test("sha256 matches node:crypto across block boundaries", () => {
    for (const n of [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 100000]) {
      const data = new Uint8Array(n).map((_, i) => (i * 131 + 7) & 0xff);
      assert.equal(avq.sha256Hex(data), createHash("sha256").update(data).digest("hex"), `length ${n}`);
    }
  });
  test("stream headers read back", () => {
    const [c] = loadCases(COMMITTED);
    const stream = Buffer.from(Object.values(c.golden.images)[0].entropy.stream, "base64");
    const header = avq.readHeader(new Uint8Array(stream));
    assert.equal(header.model, "llava-tiny");
    assert.equal(header.tokens, 17);
    assert.equal(header.codebookHash, avq.loadBundle(c.data).codebookHash.slice(0, 16));
    assert.equal(header.nbytes + header.payloadBytes, stream.length);
  });
});
