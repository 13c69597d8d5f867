"""Encode time of the browser codec (edge_client/web) in headless Chromium, beside the numpy encoder.

    .venv/bin/python -m benchmarks.web_encode          # from the repository root, ~3 minutes

What is timed, per geometry, is the same thing ``edge_cost.py`` times for numpy: from the decoded
image at the model's input size (an RGB array) to the stream bytes. In the browser that is
``encodeImage(bundle, rgb, size, size)`` of ``alignedvq.js`` (its WebAssembly SIMD kernels, on the
page's one thread; V8 itself is held to one thread with ``--js-flags=--single-threaded``), timed
with ``performance.now()`` on a cross-origin-isolated page (5 us resolution). Beside it, in this
process with every BLAS/OpenMP pool at one thread, ``EdgeEncoder.encode_image`` on the same
pixels and the same bundle. Both with entropy coding on (what the page sends: ranked rANS for
these bundles, rate-distortion optimised indices for the ``-rdo`` one) and off (packed). Rows take
turns call by call, so load from the machine's other jobs hits them alike; median, p90 and min
over ``RUNS`` calls after ``WARMUP`` rounds, and the load average before and after.

Geometries: ``llava-mini-shapes`` with the quantizer the gateway serves (64 px, 65 x 256, two
4096 x 32 stages, gated, ranked), the same with rate control (``preln-r2x4096-t12-l0.5-ranked``),
and the LLaVA-1.5 edge geometry (336 px, 577 x 1024, one 4096 x 32 ranked codebook, 12-bit codes;
random tower, quantizer fitted on random images: ``tests.web.make_golden.llava15_bundle``). Also
one row from a full-size 1024 x 768 photo (Pillow-exact resize included). Every stream the browser
produced is compared with Python's for the same pixels (``parity`` in the JSON).

Bars (issue 16): median <= 5 ms for llava-mini-shapes, <= 200 ms for the LLaVA-1.5 geometry.
Raw JSON: ``benchmarks/results/raw/web_encode.json``.
"""

from __future__ import annotations

import os

from benchmarks.harness.record import ONE_THREAD

os.environ.update(ONE_THREAD)  # must precede the first numpy import

import argparse  # noqa: E402
import base64  # noqa: E402
import http.server  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.harness.browser import chromium, flags  # noqa: E402
from benchmarks.harness.browser import versions as browser_versions  # noqa: E402
from benchmarks.harness.record import ROOT, describe, header, write_result  # noqa: E402
from benchmarks.harness.stats import percentile  # noqa: E402

# ---- settings -----------------------------------------------------------------------------------
OUT = ROOT / "benchmarks" / "results" / "raw" / "web_encode.json"
WEB_DIR = ROOT / "edge_client" / "web"
WARMUP = 10
RUNS = 100
SHAPES_IMAGES, SHAPES_SEED = 16, 7  # generated easy-VQA-style images, as serving_load.py's
LLAVA_IMAGES = 6  # random smooth 336 px images (the tower is random anyway)
PHOTO_SIZE = (1024, 768)  # the full-size row: resize and crop in the timed call
GEOMETRIES = {  # name -> how the bundle is made (in a child process: torch never loads here)
    "llava-mini-shapes": ("mini", "preln-r2x4096-t12-ranked"),
    "llava-mini-shapes-rdo": ("mini", "preln-r2x4096-t12-l0.5-ranked"),
    "llava-1.5-geometry": ("llava15", None),
}
BARS_MS = {"llava-mini-shapes": 5.0, "llava-1.5-geometry": 200.0}
# --------------------------------------------------------------------------------------------------


# ---- browser ------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """edge_client/web under /web/, the benchmark's files under /bench/, an empty page at /; cross-origin
    isolated (COOP + COEP), so performance.now() has 5 us resolution instead of 100 us."""

    bench_dir: Path

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0]
        if path.startswith("/web/"):
            return str(WEB_DIR / Path(path).name)
        if path.startswith("/bench/"):
            return str(self.bench_dir / Path(path).name)
        return str(self.bench_dir / "index.html")

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


@contextmanager
def serve(bench_dir: Path) -> Iterator[str]:
    (bench_dir / "index.html").write_text("<!doctype html><title>web_encode</title>")
    types = {**_Handler.extensions_map, ".js": "text/javascript", ".wasm": "application/wasm"}
    handler = type("Handler", (_Handler,), {"bench_dir": bench_dir, "extensions_map": types})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


BROWSER_SCRIPT = """
const [config, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  const avq = await import("/web/alignedvq.js");
  const load = async (name) => new Uint8Array(await (await fetch(`/bench/${name}`)).arrayBuffer());
  const rows = [];
  for (const row of config.rows) {
    const data = await load(row.bundle);
    const t0 = performance.now();
    const bundle = avq.loadBundle(data);
    const loadMs = performance.now() - t0;
    avq.prepareBundle(bundle);
    const pixels = await load(row.images);
    const n = row.width * row.height * 3;
    const images = Array.from({ length: pixels.length / n }, (_, i) => pixels.subarray(i * n, (i + 1) * n));
    rows.push({ ...row, bundleObject: bundle, images, loadMs, samples: [], streams: [] });
  }
  const encode = (r, i, detailed = false) => (detailed ? avq.encodeImageDetailed : avq.encodeImage)(
    r.bundleObject, r.images[i % r.images.length], r.width, r.height, { entropy: r.entropy });
  for (let i = 0; i < config.warmup; i++) for (const r of rows) encode(r, i);
  for (let i = 0; i < config.runs; i++) {
    for (const r of rows) {
      const start = performance.now();
      const stream = encode(r, i);
      r.samples.push(performance.now() - start);
      if (i < r.images.length) r.streams.push(btoa(String.fromCharCode(...stream)));
    }
  }
  const stages = {};
  for (const r of rows) {
    const parts = { resize: [], edge: [], quantize: [], code: [] };
    for (let i = 0; i < 20; i++) {
      const t = encode(r, i, true).timings;
      for (const k of Object.keys(parts)) parts[k].push(t[k]);
    }
    stages[r.name] = parts;
  }
  return {
    backend: avq.backend(),
    crossOriginIsolated: self.crossOriginIsolated,
    userAgent: navigator.userAgent,
    hardwareConcurrency: navigator.hardwareConcurrency,
    rows: rows.map((r) => ({ name: r.name, loadMs: r.loadMs, samples: r.samples, streams: r.streams })),
    stages,
  };
})().then(done, (error) => done({ error: String(error && error.stack || error) }));
"""


# ---- inputs -------------------------------------------------------------------------------------


def _write_bundles(folder: Path) -> None:
    """In a child process (torch): every geometry's bundle as <name>.bundle."""
    code = (
        "import sys, pathlib\n"
        "from tests.web.make_golden import llava15_bundle\n"
        "from models.export import export_edge_bundle\n"
        "from models.quantizer import AlignedVQ\n"
        "from models.store import load_model\n"
        f"geometries = {GEOMETRIES!r}\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "loaded = load_model('llava-mini-shapes')\n"
        "for name, (kind, quantizer) in geometries.items():\n"
        "    if kind == 'mini':\n"
        "        data = export_edge_bundle(loaded, AlignedVQ.load(loaded.quantizer_path(quantizer)))\n"
        "    else:\n"
        "        data = llava15_bundle()\n"
        "    (out / f'{name}.bundle').write_bytes(data)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True)


def _images(name: str) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 inputs of a geometry at its model input size."""
    from tests.web.make_golden import smooth_images

    if name.startswith("llava-mini-shapes"):
        from models.data import generate_shapes

        return generate_shapes(SHAPES_IMAGES, seed=SHAPES_SEED, questions_per_image=1).images
    return smooth_images(LLAVA_IMAGES, 336, seed=40)


def _stats(samples: list[float]) -> dict[str, Any]:
    """Runs, median / p90 / min / mean / max ms and every sample (edge_cost's row fields)."""
    ms = dict(median=percentile(samples, 50), p90=percentile(samples, 90), min=min(samples),
              mean=statistics.fmean(samples), max=max(samples))  # fmt: skip
    rounded = [round(s, 4) for s in samples]
    return {"runs": len(samples)} | {f"{k}_ms": v for k, v in ms.items()} | {"samples_ms": rounded}


def numpy_times(
    rows: list[dict], encoders: dict, inputs: dict, runs: int, warmup: int
) -> dict[str, list[float]]:
    """``EdgeEncoder.encode_image`` of the same rows in this process (one BLAS thread), round robin."""
    samples: dict[str, list[float]] = {r["name"]: [] for r in rows}
    for i in range(warmup + runs):
        for r in rows:
            images = inputs[r["images"]]
            image = images[i % len(images)]
            start = time.perf_counter()
            encoders[r["bundle"]].encode_image(image, entropy=r["entropy"])
            if i >= warmup:
                samples[r["name"]].append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"timed calls per row (default {RUNS})")
    parser.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed rounds first (default {WARMUP})")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON result (default: the raw file)")
    args = parser.parse_args()

    from threadpoolctl import threadpool_info

    from edge_client.bundle import EdgeBundle
    from edge_client.encoder import EdgeEncoder
    from tests.web.make_golden import smooth_images

    result = header("web_encode")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as profile:
        folder = Path(tmp)
        _write_bundles(folder)
        inputs: dict[str, np.ndarray] = {}
        rows: list[dict] = []
        for name in GEOMETRIES:
            images = _images(name)
            inputs[f"{name}.rgb"] = images
            (folder / f"{name}.rgb").write_bytes(np.ascontiguousarray(images).tobytes())
            size = images.shape[1]
            for entropy in (True, False):
                label = f"{name} {'entropy' if entropy else 'packed'}"
                rows.append(dict(name=label, bundle=f"{name}.bundle", images=f"{name}.rgb", width=size,
                                 height=size, entropy=entropy))  # fmt: skip
        photos = smooth_images(2, PHOTO_SIZE, seed=41)
        inputs["photo.rgb"] = photos
        (folder / "photo.rgb").write_bytes(np.ascontiguousarray(photos).tobytes())
        rows.append(dict(name=f"llava-1.5-geometry entropy, from a {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photo",
                         bundle="llava-1.5-geometry.bundle", images="photo.rgb", width=PHOTO_SIZE[0],
                         height=PHOTO_SIZE[1], entropy=True))  # fmt: skip

        encoders = {f"{n}.bundle": EdgeEncoder(EdgeBundle.load(folder / f"{n}.bundle")) for n in GEOMETRIES}
        with serve(folder) as url, chromium(Path(profile), single_threaded=True) as driver:
            driver.set_script_timeout(1800)
            driver.get(f"{url}/")
            config = {"rows": rows, "runs": args.runs, "warmup": args.warmup}
            browser = driver.execute_async_script(BROWSER_SCRIPT, config)
        if "error" in browser:
            raise SystemExit(f"the browser failed: {browser['error']}")
        numpy_samples = numpy_times(rows, encoders, inputs, args.runs, args.warmup)

        parity = {}
        for r, got in zip(rows, browser["rows"], strict=True):
            images = inputs[r["images"]]
            same = [
                base64.b64decode(s) == encoders[r["bundle"]].encode_image(images[i], entropy=r["entropy"])
                for i, s in enumerate(got["streams"])
            ]
            parity[r["name"]] = {"streams": len(same), "identical": sum(same)}
        bundle_bytes = {n: (folder / f"{n}.bundle").stat().st_size for n in GEOMETRIES}

    result["versions"] |= browser_versions()
    result |= {
        "blas": [
            {k: i.get(k) for k in ("internal_api", "num_threads", "version")} for i in threadpool_info()
        ],
        "chromium_flags": flags(single_threaded=True),
        "browser": {
            k: browser[k] for k in ("backend", "crossOriginIsolated", "userAgent", "hardwareConcurrency")
        },
        "settings": {"runs": args.runs, "warmup": args.warmup, "geometries": GEOMETRIES, "bars_ms": BARS_MS},
        "bundle_bytes": bundle_bytes,
        "bundle_load_ms_browser": {r["name"]: r["loadMs"] for r in browser["rows"]},
        "rows": {
            r["name"]: {
                "input": f"{r['width']}x{r['height']} RGB",
                "entropy": r["entropy"],
                "browser": _stats(got["samples"]),
                "numpy": _stats(numpy_samples[r["name"]]),
                "browser_stages_median_ms": {
                    k: percentile(v, 50) for k, v in browser["stages"][r["name"]].items()
                },
                "parity": parity[r["name"]],
            }
            for r, got in zip(rows, browser["rows"], strict=True)
        },
    }
    for name, bar in BARS_MS.items():
        median = result["rows"][f"{name} entropy"]["browser"]["median_ms"]
        result.setdefault("bars", {})[name] = {"median_ms": median, "bar_ms": bar, "met": median <= bar}
    write_result(result, args.out, started)

    print(f"{'row':<62} {'browser ms':>11} {'numpy ms':>9} {'p90 br':>7} {'identical':>9}")
    for name, row in result["rows"].items():
        p = row["parity"]
        print(
            f"{name:<62} {row['browser']['median_ms']:>11.2f} {row['numpy']['median_ms']:>9.2f} "
            f"{row['browser']['p90_ms']:>7.2f} {p['identical']:>4}/{p['streams']:<4}"
        )
    print(f"backend {browser['backend']}, isolated {browser['crossOriginIsolated']}")
    print(describe(result))


if __name__ == "__main__":
    main()
