"""Answers asked from the browser vs from the Python client: 1,000 easy-VQA test questions, one
real gateway + worker (``llava-mini-shapes`` with the quantizer the gateway serves).

    .venv/bin/python -m benchmarks.web_parity          # from the repository root, ~10 minutes

A uvicorn gateway and a ``vqa-worker`` run as subprocesses on the local Redis (their own key
prefix, deleted afterwards). Headless Chromium (selenium) opens the gateway's page at ``/``, under
its Content-Security-Policy, and from there, with the page's own module ``/web/alignedvq.js``:
downloads the edge bundle, decodes each question's PNG with ``createImageBitmap`` as the page
does, encodes it (``encodeImageDetailed``), builds the msgpack body and POSTs it to ``/v1/vqa``
(16 requests in flight). The Python client (``EdgeClient.ask``, 4 threads) then asks the same
questions about the same PNG files. Recorded per question: both answers and bodies, whether the
browser decoded the same pixels as Pillow, whether its stream is byte for byte what
``EdgeEncoder.encode_image`` makes of those pixels, and how many of its tokens carry the same
indices.

Bars (issue 16): answers agree on >= 99.5 % of the questions; indices on >= 99.9 % of tokens, and
identical bytes whenever the indices are. Raw JSON: ``benchmarks/results/raw/web_parity.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.harness.browser import chromium, flags
from benchmarks.harness.browser import versions as browser_versions
from benchmarks.harness.record import ROOT, describe, header, write_result
from benchmarks.harness.stack import free_port, redis_version
from benchmarks.harness.stats import percentile

# ---- settings -----------------------------------------------------------------------------------
OUT = ROOT / "benchmarks" / "results" / "raw" / "web_parity.json"
MODEL = "llava-mini-shapes"
QUANTIZER = "preln-r2x4096-t12-ranked"  # what the gateway serves by default (README)
QUESTIONS = 1000  # the first questions of easy-VQA's test split, in its file order
CHUNK = 50  # questions per browser call
IN_FLIGHT = 16  # concurrent requests from the browser
PYTHON_THREADS = 4
MAX_NEW_TOKENS = 8  # the page's and EdgeClient's default
API_KEY = "web-parity-" + uuid.uuid4().hex
REDIS_URL = os.environ.get("VQA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BARS = {"answer_agreement": 0.995, "token_agreement": 0.999}
BROWSER_FIELDS = ("answer", "error", "status", "body_bytes", "edge_ms", "round_trip_ms", "retries")
# --------------------------------------------------------------------------------------------------

BROWSER_SCRIPT = """
const [items, config, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
(async () => {
  const avq = await import("/web/alignedvq.js");
  const auth = { Authorization: `Bearer ${config.key}` };
  if (!window.parityBundle) {
    const reply = await fetch(`/v1/models/${config.model}/edge-bundle`, { headers: auth });
    window.parityBundle = avq.prepareBundle(avq.loadBundle(await reply.arrayBuffer()));
  }
  const bundle = window.parityBundle;
  const b64 = (bytes) => { let s = ""; for (const b of bytes) s += String.fromCharCode(b); return btoa(s); };
  const one = async (item) => {
    const png = Uint8Array.from(atob(item.png), (c) => c.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([png], { type: "image/png" }),
      { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(bitmap, 0, 0);
    const { width, height } = bitmap;
    const rgb = avq.rgbaToRgb(context.getImageData(0, 0, width, height).data, width, height);
    const start = performance.now();
    const encoded = avq.encodeImageDetailed(bundle, rgb, width, height);
    const edgeMs = performance.now() - start;
    const body = avq.encodeRequest({ request_id: avq.newRequestId(), model: config.model,
      question: item.question, features: encoded.stream, max_new_tokens: config.maxNewTokens });
    const sent = performance.now();
    const headers = { ...auth, "Content-Type": avq.CONTENT_TYPE, Accept: "application/json" };
    const init = { method: "POST", body, headers };
    let reply;
    let retries = 0;
    for (;;) {
      // A POST on a keep-alive connection the server is closing fails without an answer; the same
      // request id makes a resend safe (the gateway answers an id once), as EdgeClient does.
      try {
        reply = await fetch("/v1/vqa", init);
        break;
      } catch (error) {
        if (++retries > 3) throw error;
      }
    }
    const json = await reply.json();
    return { answer: json.answer ?? null, error: json.error ?? null, status: reply.status,
      body_bytes: body.length, stream: b64(encoded.stream), indices: Array.from(encoded.indices),
      rgb_sha256: avq.sha256Hex(rgb), edge_ms: edgeMs, round_trip_ms: performance.now() - sent, retries };
  };
  const out = new Array(items.length);
  let next = 0;
  const lane = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await one(items[i]);
    }
  };
  await Promise.all(Array.from({ length: config.inFlight }, lane));
  return { backend: avq.backend(), results: out };
})().then(done, (error) => done({ error: String(error && error.stack || error) }));
"""


def dumps(result: dict[str, Any]) -> str:
    """The results as JSON, indented, with one line per question (the file stays small)."""
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
    rows = ",\n".join(json.dumps(row, separators=(",", ":")) for row in result["rows"])
    return f'{head[:-2]},\n "rows": [\n{rows}\n ]\n}}\n'


@contextmanager
def stack(logs: Path) -> Iterator[str]:
    """A gateway and one worker of MODEL/QUANTIZER as subprocesses; yields the gateway URL."""
    import redis

    prefix = f"web-parity-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VQA_KEY_PREFIX": prefix,
        "VQA_API_KEYS": API_KEY,
        "VQA_RATE_LIMIT_PER_S": "0",
        "VQA_LOG_LEVEL": "warning",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    gateway_cmd = [sys.executable, "-c", "from gateway.api.main import run; run()"]
    gateway_cmd += ["--host", "127.0.0.1", "--port", str(port), "--redis-url", REDIS_URL]
    worker_cmd = [sys.executable, "-m", "gateway.worker", "--redis-url", REDIS_URL, "--model", MODEL]
    worker_cmd += ["--quantizer", QUANTIZER, "--device", "cpu", "--max-batch", "16", "--max-wait-ms", "10"]
    try:
        for name, cmd in (("gateway", gateway_cmd), ("worker", worker_cmd)):
            with (logs / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + 120
        while True:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"gateway or worker exited; see {logs}")
            try:
                reply = httpx.get(
                    f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2
                )
                if reply.status_code == 200 and any(m["live_workers"] for m in reply.json()["data"]):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no live worker after 120 s; see {logs}")
            time.sleep(0.5)
        yield url
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def questions(limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` easy-VQA test questions with their PNG files and reference answers."""
    from models.data import easy_vqa_root

    folder = easy_vqa_root() / "test"
    raw = json.loads((folder / "questions.json").read_text())[:limit]
    return [{"question": q, "answer": a, "png": folder / "images" / f"{int(i)}.png"} for q, a, i in raw]


def ask_python(url: str, items: list[dict[str, Any]], cache: Path) -> list[dict[str, Any]]:
    from edge_client import EdgeClient

    def run(part: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        out = []
        with EdgeClient(url, api_key=API_KEY, model=MODEL, cache_dir=cache) as client:
            for index, item in part:
                answer = client.ask(item["png"].read_bytes(), item["question"], max_new_tokens=MAX_NEW_TOKENS)
                out.append((index, {"answer": answer.answer, "body_bytes": answer.request_bytes}))
        return out

    indexed = list(enumerate(items))
    parts = [indexed[i::PYTHON_THREADS] for i in range(PYTHON_THREADS)]
    with ThreadPoolExecutor(PYTHON_THREADS) as pool:
        merged = dict(pair for part in pool.map(run, parts) for pair in part)
    return [merged[i] for i in range(len(items))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--questions", type=int, default=QUESTIONS, help=f"the first N test questions (default {QUESTIONS})"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON result (default: the raw file)")
    args = parser.parse_args()

    from edge_client.bundle import EdgeBundle
    from edge_client.encoder import EdgeEncoder
    from models.evaluate import normalize_answer

    result = header("web_parity")
    started = time.monotonic()
    items = questions(args.questions)
    logs = Path("/tmp") / f"web_parity_logs_{os.getpid()}"
    with stack(logs) as url, tempfile.TemporaryDirectory() as profile:
        reply = httpx.get(
            f"{url}/v1/models/{MODEL}/edge-bundle", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        encoder = EdgeEncoder(EdgeBundle.from_bytes(reply.content))
        browser: list[dict[str, Any]] = []
        with chromium(Path(profile), single_threaded=True) as driver:
            driver.set_script_timeout(1800)
            driver.get(f"{url}/")
            config = {"key": API_KEY, "model": MODEL, "inFlight": IN_FLIGHT, "maxNewTokens": MAX_NEW_TOKENS}
            start = time.perf_counter()
            for at in range(0, len(items), CHUNK):
                chunk = [
                    {"question": item["question"], "png": base64.b64encode(item["png"].read_bytes()).decode()}
                    for item in items[at : at + CHUNK]
                ]
                out = driver.execute_async_script(BROWSER_SCRIPT, chunk, config)
                if "error" in out:
                    raise SystemExit(f"the browser failed: {out['error']}")
                backend = out["backend"]
                browser.extend(out["results"])
            browser_s = time.perf_counter() - start
            csp_errors = [
                e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]
            ]
        start = time.perf_counter()
        python = ask_python(url, items, logs / "cache")
        python_s = time.perf_counter() - start

    rows = []
    tokens = tokens_same = streams_same = same_indices_other_bytes = pixels_same = 0
    for item, b, p in zip(items, browser, python, strict=True):
        rgb = np.asarray(Image.open(item["png"]).convert("RGB"))
        indices, _ = encoder.encode_pixels(encoder.pixel_values(rgb), rate_controlled=True)
        expected = encoder.encode_image(rgb)
        ours = np.asarray(b["indices"]).reshape(indices.shape)
        same_tokens = int((ours == indices).all(axis=(1, 2)).sum())
        identical = base64.b64decode(b["stream"]) == expected
        tokens += indices.shape[0]
        tokens_same += same_tokens
        streams_same += identical
        same_indices_other_bytes += same_tokens == indices.shape[0] and not identical
        pixels_same += b["rgb_sha256"] == hashlib.sha256(rgb.tobytes()).hexdigest()
        rows.append({
            "question": item["question"],
            "image": item["png"].name,
            "reference": item["answer"],
            "browser": {k: b[k] for k in BROWSER_FIELDS},
            "python": p,
            "answers_agree": normalize_answer(b["answer"] or "") == normalize_answer(p["answer"]),
            "stream_identical": identical,
            "tokens_identical": same_tokens,
        })  # fmt: skip
    n = len(rows)
    agree = sum(r["answers_agree"] for r in rows)
    summary = {
        "questions": n,
        "answer_agreement": agree / n,
        "browser_accuracy": sum(
            normalize_answer(r["browser"]["answer"] or "") == r["reference"] for r in rows
        )
        / n,
        "python_accuracy": sum(normalize_answer(r["python"]["answer"]) == r["reference"] for r in rows) / n,
        "token_agreement": tokens_same / tokens,
        "tokens": tokens,
        "streams_identical": streams_same,
        "streams_with_same_indices_but_other_bytes": same_indices_other_bytes,
        "browser_pixels_equal_pillow": pixels_same,
        "browser_errors": sum(r["browser"]["error"] is not None for r in rows),
        "browser_resends": sum(r["browser"]["retries"] for r in rows),
        "questions_resent": sum(r["browser"]["retries"] > 0 for r in rows),
        "body_bytes_equal": sum(r["browser"]["body_bytes"] == r["python"]["body_bytes"] for r in rows),
        "median_browser_body_bytes": percentile([r["browser"]["body_bytes"] for r in rows], 50),
        "median_browser_edge_ms": percentile([r["browser"]["edge_ms"] for r in rows], 50),
        "browser_seconds": browser_s,
        "python_seconds": python_s,
        "csp_violations": csp_errors,
    }
    summary["bars"] = {k: {"bar": v, "value": summary[k], "met": summary[k] >= v} for k, v in BARS.items()}
    summary["bars"]["bytes_identical_whenever_indices_are"] = {"met": same_indices_other_bytes == 0}
    result["versions"] |= browser_versions() | {"redis_server": redis_version(REDIS_URL)}
    result |= {
        "settings": {
            "model": MODEL,
            "quantizer": QUANTIZER,
            "questions": n,
            "in_flight": IN_FLIGHT,
            "python_threads": PYTHON_THREADS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "kernels": backend,
            "chromium_flags": flags(single_threaded=True),
        },  # fmt: skip
        "summary": summary,
        "rows": rows,
    }
    write_result(result, args.out, started)
    args.out.write_text(dumps(result))  # the same JSON, one line per question
    for key in ("answer_agreement", "browser_accuracy", "python_accuracy", "token_agreement"):
        print(f"{key:<28} {100 * summary[key]:8.2f} %")
    print(f"{'streams identical':<28} {streams_same:>5} / {n}")
    print(f"{'pixels equal to Pillow':<28} {pixels_same:>5} / {n}")
    print(f"{'bodies of equal length':<28} {summary['body_bytes_equal']:>5} / {n}")
    print(f"browser {browser_s:.0f} s, python {python_s:.0f} s; raw JSON: {args.out}")
    print(describe(result))


if __name__ == "__main__":
    main()
