// AlignedVQ in the browser: the edge half of edge_client (Python) as one ES module, no DOM, so
// pages, workers and Node (>= 20) import the same code.
//
//   import { loadBundle, encodeImage } from "./alignedvq.js";
//   const bundle = loadBundle(await (await fetch("/v1/models/llava-mini-shapes/edge-bundle", auth)).arrayBuffer());
//   const stream = encodeImage(bundle, rgb, width, height);   // Uint8Array, the wire format
//
// loadBundle    parse + verify an edge bundle (bundle.js), BundleError on any problem
// encodeImage   RGB bytes -> feature stream: resize (Pillow-exact), patch embedding, pre-LN and
//               any edge blocks, AlignedVQ search (gated refinement, rate-distortion optimised
//               indices), packed / rANS / neighbour-ranked coding, header + CRC (encoder.js)
// encodeImageDetailed   the same plus indices, ranks, per-token bits and timings (the page's
//               "where the bits went" overlay)
// encodeRequest the msgpack body of POST /v1/vqa (protocol.js)
//
// Same pixels in, same bytes out as edge_client.encoder.EdgeEncoder.encode_image (tests/web).

export { loadBundle, maxBook, shapeRepr, SUPPORTED_ACTIVATIONS } from "./bundle.js";
export { disposeBundle, encodeImage, encodeImageDetailed, prepareBundle } from "./encoder.js";
export { AlignedVQError, BundleError, ImageError, IndexRangeError } from "./errors.js";
export { backend, setBackend } from "./kernels.js";
export { resizeAndCrop, rgbaToRgb } from "./preprocess.js";
export { CONTENT_TYPE, encodeRequest, newRequestId } from "./protocol.js";
export { sha256Hex } from "./sha256.js";
export { crc32, packIndices, readHeader } from "./stream.js";
