// The page at GET /: pick or shoot a photo, encode it here with alignedvq.js, ask /v1/vqa.
//
// The API is the one every client uses: GET /v1/models (the picker), GET
// /v1/models/{name}/edge-bundle (revalidated with its ETag), POST /v1/vqa with a msgpack body,
// Authorization: Bearer <key>. The key lives in sessionStorage (this tab only), never in a URL.
// Errors show the gateway's {"error": {"code", "message"}} as they arrive.

import {
  backend,
  CONTENT_TYPE,
  encodeImage,
  encodeImageDetailed,
  encodeRequest,
  loadBundle,
  newRequestId,
  prepareBundle,
  resizeAndCrop,
  rgbaToRgb,
} from "./alignedvq.js";

const KEY_STORAGE = "alignedvq.apiKey";
const MAX_IMAGE_PIXELS = 40_000_000; // edge_client.preprocess.MAX_IMAGE_PIXELS
const JPEG_QUALITY = 0.9; // the cloud-only baseline, as the Python client's JPEG-90
const MAX_NEW_TOKENS = 8;

const $ = (id) => document.getElementById(id);
const state = {
  models: [],
  bundles: new Map(), // model name -> {etag, bundle}
  image: null, // {rgb, width, height}
  lastResult: null, // what the overlay shows
  imageLoading: null,
  modelsLoading: null,
};

class PageError extends Error {
  constructor(code, message, status = null) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

// ---- HTTP --------------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = `the gateway answered ${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code);
      message = String(body.error.message);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new PageError(code, message, response.status);
}

async function send(url, init = {}) {
  let response;
  for (let attempt = 1; ; attempt++) {
    try {
      response = await fetch(url, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
      break;
    } catch (error) {
      // No reply at all (a keep-alive connection closing under a POST, a flaky uplink): resending is
      // safe, the body and so its request_id are the same and the gateway answers an id once.
      if (attempt === 3) throw new PageError("gateway_unreachable", `cannot reach the gateway: ${error.message}`);
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
    }
  }
  if (!response.ok && response.status !== 304) throw await errorFrom(response);
  return response;
}

// ---- models and bundles ------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  const response = await send("/v1/models", { headers: { Accept: "application/json" } });
  const { data: models } = await response.json();
  state.models = models;
  select.replaceChildren();
  if (!models.length) {
    select.append(new Option("(no model is served yet)", ""));
    return;
  }
  for (const m of models) {
    const workers = m.live_workers === 1 ? "1 worker" : `${m.live_workers} workers`;
    select.append(new Option(`${m.name} · ${m.quantizer} (${workers})`, m.name));
  }
  if (models.some((m) => m.name === previous)) select.value = previous;
}

function refreshModels() {
  state.modelsLoading = loadModels()
    .then(() => {
      $("model-hint").textContent = "The models the gateway serves now (GET /v1/models).";
      clearError();
    })
    .catch((error) => {
      // No key yet: say what to do instead of flagging an error.
      if (error.status === 401 && !$("api-key").value.trim()) $("model-hint").textContent = "Enter the API key to list the models.";
      else showError(error);
    })
    .finally(() => {
      state.modelsLoading = null;
    });
  return state.modelsLoading;
}

/** The bundle of `name`, downloaded once and revalidated with its ETag on every ask. */
async function bundleFor(name) {
  const cached = state.bundles.get(name);
  const headers = { Accept: "application/octet-stream" };
  if (cached) headers["If-None-Match"] = cached.etag;
  const response = await send(`/v1/models/${encodeURIComponent(name)}/edge-bundle`, { headers, cache: "no-store" });
  if (response.status === 304 && cached) return cached.bundle;
  let bundle;
  try {
    bundle = loadBundle(await response.arrayBuffer());
  } catch (error) {
    throw new PageError(error.code || "bad_bundle", `the downloaded bundle is invalid: ${error.message}`);
  }
  const announced = response.headers.get("X-Codebook-Hash");
  if (announced && announced.toLowerCase() !== bundle.codebookHash) {
    throw new PageError("bad_bundle", `expected codebook hash ${announced} (X-Codebook-Hash), got ${bundle.codebookHash}`);
  }
  // Pack the weights for the kernels and let the JIT see the code once, so that "edge ms" is what
  // each photo costs rather than the one-time set-up of a bundle.
  prepareBundle(bundle);
  const size = bundle.imageSpec.size;
  encodeImage(bundle, new Uint8Array(size * size * 3), size, size);
  state.bundles.set(name, { etag: response.headers.get("ETag") || "", bundle });
  return bundle;
}

// ---- images ------------------------------------------------------------------------------------

/** Decode a picked file to RGB (EXIF orientation applied, transparency on white). */
async function decodeFile(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new PageError("bad_image", `${file.name || "the file"} could not be decoded as an image`);
  }
  const { width, height } = bitmap;
  if (width * height > MAX_IMAGE_PIXELS) {
    bitmap.close();
    throw new PageError("bad_image", `image is ${width}x${height} pixels; at most ${MAX_IMAGE_PIXELS} pixels are accepted`);
  }
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  return { rgb: rgbaToRgb(rgba, width, height), width, height };
}

function onImage() {
  const file = $("image").files[0];
  state.image = null;
  if (!file) return;
  clearError();
  state.imageLoading = decodeFile(file)
    .then((image) => {
      state.image = image;
      state.lastResult = null;
      drawOverlay(null);
    })
    .catch((error) => showError(error))
    .finally(() => {
      state.imageLoading = null;
    });
}

/** JPEG-90 of the model-size pixels, as the cloud-only client sends (canvas encoder). */
async function jpeg90(pixels, size) {
  const canvas = document.createElement("canvas");
  canvas.width = size;
  canvas.height = size;
  const context = canvas.getContext("2d");
  const data = context.createImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    data.data[4 * i] = pixels[3 * i];
    data.data[4 * i + 1] = pixels[3 * i + 1];
    data.data[4 * i + 2] = pixels[3 * i + 2];
    data.data[4 * i + 3] = 255;
  }
  context.putImageData(data, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
  if (!blob) throw new PageError("bad_image", "this browser cannot encode JPEG");
  return new Uint8Array(await blob.arrayBuffer());
}

// ---- asking ------------------------------------------------------------------------------------

async function ask(bundle, name, question, cloudOnly) {
  const size = bundle.imageSpec.size;
  const { rgb, width, height } = state.image;
  const start = performance.now();
  const pixels = resizeAndCrop(rgb, width, height, size);
  const detailed = encodeImageDetailed(bundle, pixels, size, size);
  const edgeMs = performance.now() - start;
  const jpeg = await jpeg90(pixels, size);
  const base = { request_id: newRequestId(), model: name, question, max_new_tokens: MAX_NEW_TOKENS };
  const jpegBody = encodeRequest({ ...base, image: jpeg });
  const body = cloudOnly ? jpegBody : encodeRequest({ ...base, features: detailed.stream });
  const sent = performance.now();
  const response = await send("/v1/vqa", {
    method: "POST",
    headers: { "Content-Type": CONTENT_TYPE, Accept: "application/json" },
    body,
  });
  const reply = await response.json();
  const rttMs = performance.now() - sent;
  return { reply, body, jpegBody, jpeg, detailed, pixels, edgeMs, rttMs, cloudOnly, bundle };
}

async function onAsk(event) {
  event.preventDefault();
  clearError();
  const button = $("ask");
  const question = $("question").value.trim();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  if (state.imageLoading) await state.imageLoading;
  if (state.modelsLoading) await state.modelsLoading;
  if (!$("model").value) await refreshModels();
  try {
    if (!$("model").value) throw new PageError("unknown_model", "choose a model first (the list needs a valid API key)");
    if (!state.image) throw new PageError("bad_image", "choose a photo first");
    if (!question) throw new PageError("bad_request", "type a question first");
    button.disabled = true;
    $("results").setAttribute("aria-busy", "true");
    // #answer and the figures stay empty until this ask's reply: a reader (or a test) waiting for
    // them never sees the previous answer or a placeholder.
    for (const id of ["answer", "bytes", "jpeg-bytes", "bits-per-token", "edge-ms", "rtt-ms", "mode"]) $(id).textContent = "";
    $("status").textContent = "Encoding the photo and asking…";
    const name = $("model").value;
    let result;
    try {
      result = await ask(await bundleFor(name), name, question, $("cloud-only").checked);
    } catch (error) {
      // A worker published a new codebook: fetch it, encode again, send once more (as the
      // Python client does). The refused request never reached the queue.
      if (error.code !== "codebook_mismatch") throw error;
      state.bundles.delete(name);
      result = await ask(await bundleFor(name), name, question, $("cloud-only").checked);
    }
    showResult(result);
    if (window.matchMedia("(max-width: 819px)").matches) $("results").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (error) {
    $("answer").textContent = "";
    showError(error);
  } finally {
    $("status").textContent = "";
    button.disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

// ---- output ------------------------------------------------------------------------------------

function showResult(r) {
  state.lastResult = r;
  const tokens = r.bundle.tokens;
  $("answer").textContent = r.reply.answer;
  $("bytes").textContent = String(r.body.length);
  $("jpeg-bytes").textContent = String(r.jpegBody.length);
  const payloadBits = r.cloudOnly ? 8 * r.jpeg.length : 8 * r.detailed.payloadBytes;
  $("bits-per-token").textContent = (payloadBits / tokens).toFixed(1);
  $("edge-ms").textContent = r.edgeMs.toFixed(1);
  $("rtt-ms").textContent = r.rttMs.toFixed(0);
  const ratio = r.jpegBody.length / r.body.length;
  $("mode").textContent = r.cloudOnly
    ? `Cloud-only: the ${r.jpeg.length}-byte JPEG-90 of the ${r.bundle.imageSpec.size} px input went to the gateway.`
    : `Edge-cloud: ${r.detailed.coder} code stream of ${r.detailed.stream.length} bytes ` +
      `(${r.detailed.headerBytes} of them header), ${ratio.toFixed(1)}x smaller than the JPEG-90 request.`;
  drawOverlay(r);
}

function showError(error) {
  const box = $("error");
  const code = error.code || "client_error";
  const status = error.status ? ` (HTTP ${error.status})` : "";
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = code;
  box.append(strong, `${status}: ${error.message}`);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

/** The model-size photo, and with a result each patch shaded by its bits, refined ones outlined. */
function drawOverlay(result) {
  const canvas = $("overlay");
  const css = Math.min(canvas.parentElement.clientWidth - 28 || 320, 420);
  const ratio = window.devicePixelRatio || 1;
  canvas.style.width = `${css}px`;
  canvas.style.height = `${css}px`;
  canvas.width = Math.round(css * ratio);
  canvas.height = Math.round(css * ratio);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  const size = result ? result.bundle.imageSpec.size : Math.min(state.image.width, state.image.height);
  const pixels = result ? result.pixels : null;
  const source = document.createElement("canvas");
  if (pixels) {
    source.width = size;
    source.height = size;
    const data = source.getContext("2d").createImageData(size, size);
    for (let i = 0; i < size * size; i++) {
      data.data[4 * i] = pixels[3 * i];
      data.data[4 * i + 1] = pixels[3 * i + 1];
      data.data[4 * i + 2] = pixels[3 * i + 2];
      data.data[4 * i + 3] = 255;
    }
    source.getContext("2d").putImageData(data, 0, 0);
  } else {
    const { rgb, width, height } = state.image;
    const side = Math.min(width, height);
    source.width = side;
    source.height = side;
    const data = source.getContext("2d").createImageData(side, side);
    const left = Math.floor((width - side) / 2), top = Math.floor((height - side) / 2);
    for (let y = 0; y < side; y++) {
      for (let x = 0; x < side; x++) {
        const s = ((y + top) * width + x + left) * 3;
        const o = 4 * (y * side + x);
        data.data[o] = rgb[s];
        data.data[o + 1] = rgb[s + 1];
        data.data[o + 2] = rgb[s + 2];
        data.data[o + 3] = 255;
      }
    }
    source.getContext("2d").putImageData(data, 0, 0);
  }
  context.imageSmoothingEnabled = size >= canvas.width / 2;
  context.drawImage(source, 0, 0, canvas.width, canvas.height);
  if (!result) {
    canvas.setAttribute("aria-label", "The chosen photo, centre-cropped.");
    return;
  }
  const { tokenBits, refined, grid, coder } = result.detailed;
  const patchBits = Array.from(tokenBits.subarray(1));
  const max = Math.max(...patchBits, 1e-9);
  const min = Math.min(...patchBits);
  const cell = canvas.width / grid;
  if ($("show-bits").checked) {
    for (let t = 1; t < tokenBits.length; t++) {
      const gy = Math.floor((t - 1) / grid), gx = (t - 1) % grid;
      const share = max > min ? (tokenBits[t] - min) / (max - min) : 0.5;
      // Magenta: unlike any easy-VQA or scenes colour, so the shape stays readable underneath.
      context.fillStyle = `rgba(200, 0, 170, ${0.08 + 0.6 * share})`;
      context.fillRect(gx * cell, gy * cell, cell, cell);
      if (refined[t]) {
        const width = Math.max(2, cell / 16);
        context.lineWidth = width + 2;
        context.strokeStyle = "rgba(0, 0, 0, 0.9)";
        context.strokeRect(gx * cell + width, gy * cell + width, cell - 2 * width, cell - 2 * width);
        context.lineWidth = width;
        context.strokeStyle = "rgba(255, 255, 255, 0.95)";
        context.strokeRect(gx * cell + width, gy * cell + width, cell - 2 * width, cell - 2 * width);
      }
      if (cell >= 28 * ratio) {
        context.fillStyle = share > 0.5 ? "rgba(255, 255, 255, 0.95)" : "rgba(0, 0, 0, 0.85)";
        context.font = `${Math.round(cell / 3.2)}px system-ui, sans-serif`;
        context.textAlign = "center";
        context.textBaseline = "middle";
        context.fillText(tokenBits[t].toFixed(tokenBits[t] < 10 ? 1 : 0), (gx + 0.5) * cell, (gy + 0.5) * cell);
      }
    }
  }
  const refinedCount = Array.from(refined.subarray(1)).filter((r) => r > 0).length;
  const total = patchBits.reduce((a, b) => a + b, 0) + tokenBits[0];
  $("legend-min").textContent = min.toFixed(1);
  $("legend-max").textContent = max.toFixed(1);
  const summary =
    `${coder} coder: ${total.toFixed(0)} bits of codes for ${tokenBits.length} tokens ` +
    `(class token ${tokenBits[0].toFixed(1)} bits); patches cost ${min.toFixed(1)} to ${max.toFixed(1)} bits` +
    (result.bundle.stages > 1 ? `; ${refinedCount} of ${grid * grid} patches refined (outlined).` : ".");
  $("bits-summary").textContent = summary;
  canvas.setAttribute("aria-label", `The photo as the model sees it, shaded by bits per patch. ${summary}`);
}

// ---- start -------------------------------------------------------------------------------------

function start() {
  $("backend").textContent = backend() === "wasm" ? "WebAssembly SIMD" : "JavaScript (no WebAssembly SIMD here)";
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    refreshModels();
  });
  $("image").addEventListener("change", onImage);
  $("ask-form").addEventListener("submit", onAsk);
  $("show-bits").addEventListener("change", () => drawOverlay(state.lastResult));
  refreshModels();
}

start();
