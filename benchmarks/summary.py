"""Headline figures, gathered from the raw benchmark results into ``results/summary.json``.

    .venv/bin/python -m benchmarks.summary             # from the repository root; runs nothing

Each figure is ``{"value", "unit", "description", "source": {"file", "path"}}``: ``file`` is the
raw result relative to the repository root and ``path`` a JSON Pointer (RFC 6901) into it, so
``tests/benchmarks/test_summary.py`` can check every figure against its source without re-running
a benchmark. A figure whose benchmark has not produced a result yet is ``null`` (no source) and is
named in ``missing``. Raw files that are absent are skipped the same way.

Choices:

- JPEG-90 is given twice for the LLaVA-1.5 geometry: ``jpeg90_file_bytes_llava15`` (the bare JPEG
  file, what papers quote) and ``jpeg90_body_bytes_llava15`` (the cloud-only ``POST /v1/vqa`` body
  carrying it). ``reduction_vs_jpeg90`` and ``ratio_vs_fp16`` compare request body with request
  body (docs/design.md: every size we report is the measured HTTP body); the ``*_file``/``*_tensor``
  variants compare the aligned body with the bare JPEG file / bare fp16 tensor.
- ``gateway_overhead_p50_ms`` / ``_p99_ms``: from ``serving_overhead_cpu.json`` (``serving_load
  --overhead``), the open-loop run at the highest offered rate (300 req/s); overhead is client
  latency minus the gateway's queue and compute time (see that file's ``notes``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.harness.pointers import pointer, resolve
from benchmarks.harness.record import RESULTS, ROOT, header, write_result

# ---- settings -----------------------------------------------------------------------------------
OUT = RESULTS / "summary.json"
WIRE = "benchmarks/results/wire_bytes.json"
EDGE = "benchmarks/results/edge_cost.json"
OVERHEAD = "benchmarks/results/serving_overhead_cpu.json"
GPU = "benchmarks/results/gpu_worker.json"
FOLLOWUP = "benchmarks/results/gpu_followup.json"
E2E = "benchmarks/results/e2e_network.json"
# Scenes test runs of the bundled weights, each file one run with its own unquantized baseline; the
# default quantizer is read from the first that has it. (rate_accuracy_scenes.json and
# rate_accuracy_scenes_stage3_cpu.json are the previous weights', kept for the README's history.)
SCENES_RATES = (
    "benchmarks/results/rate_accuracy_scenes_h200_current.json",
    "benchmarks/results/rate_accuracy_scenes_cpu.json",
)
SCENES_MODEL = "models/bundled/llava-mini-scenes/alignedvq.json"  # names the served default quantizer
SCENES_CODECS = "benchmarks/results/codec_accuracy_scenes_full_h200.json"  # the whole ladder
SCENES_LOW_RATE = "benchmarks/results/scenes_background_h200.json"  # the <= 6-bit quantizer's test run
SHAPES_CODECS = "benchmarks/results/codec_accuracy_shapes_cpu.json"
# --------------------------------------------------------------------------------------------------


class Sources:
    """Raw result files, loaded once; ``figure`` reads a value and records where it came from."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}

    def load(self, file: str) -> Any | None:
        if file not in self.documents:
            path = ROOT / file
            self.documents[file] = json.loads(path.read_text()) if path.is_file() else None
        return self.documents[file]

    def figure(self, file: str, path: str, unit: str, description: str) -> dict[str, Any]:
        document = self.load(file)
        if document is None:
            return {"value": None, "unit": unit, "description": description, "source": None}
        return {
            "value": resolve(document, path),
            "unit": unit,
            "description": description,
            "source": {"file": file, "path": path},
        }

    def described(self) -> dict[str, Any]:
        """Date and machine of every raw file used (files written before the common header name
        the CPU ``cpu`` or ``processor``; the header has both)."""
        out = {}
        for file, doc in self.documents.items():
            if doc is not None:
                machine = doc.get("machine", {})
                out[file] = {
                    "date": doc.get("date"),
                    "machine": {k: machine.get(k) for k in ("cpu", "processor", "card", "hostname", "cpus")},
                    "loadavg_start": doc.get("loadavg_start"),
                }
        return out


def run_source(sources: Sources, name: str) -> tuple[str, str]:
    """The scenes result file holding quantizer ``name``'s test run and a JSON Pointer to that run
    (``/runs/<i>``). The first file and an empty pointer when no file is there yet (its figures are
    null); an error when files exist but none ran the default."""
    present = [file for file in SCENES_RATES if sources.load(file) is not None]
    for file in present:
        names = [run.get("name") for run in sources.load(file)["runs"]]
        if name in names:
            return file, f"/runs/{names.index(name)}"
    if present:
        raise ValueError(f"no run of the default quantizer {name} in {present}")
    return SCENES_RATES[0], ""


def build() -> dict[str, Any]:
    sources = Sources()
    w = pointer("geometries", 0, "mean")
    means, ratios = w, w + pointer("ratios_of_means")
    edge = pointer("geometries", 0, "timing", "input_array_to_packed")
    figures = {
        "wire_bytes_llava15": sources.figure(
            WIRE,
            ratios + "/aligned_body_bytes",
            "bytes",
            "AlignedVQ POST /v1/vqa body, LLaVA-1.5-7B geometry (577 tokens, 12-bit codes sent as "
            "neighbour-ranked rANS; stream header, msgpack envelope and question included), mean over photos",
        ),
        "wire_stream_bytes_llava15": sources.figure(
            WIRE,
            means + "/aligned_entropy/stream_bytes",
            "bytes",
            "the AlignedVQ feature stream alone (header + coded indices) inside that body",
        ),
        "jpeg90_file_bytes_llava15": sources.figure(
            WIRE,
            means + "/jpeg90/file_bytes",
            "bytes",
            "JPEG-90 file of the photo at 336x336 (resize_and_crop), mean over photos",
        ),
        "jpeg90_body_bytes_llava15": sources.figure(
            WIRE,
            means + "/jpeg90/body_bytes",
            "bytes",
            "cloud-only POST /v1/vqa body carrying that JPEG-90, mean over photos",
        ),
        "reduction_vs_jpeg90": sources.figure(
            WIRE,
            ratios + "/reduction_vs_jpeg90_body",
            "fraction",
            "1 - AlignedVQ body / JPEG-90 cloud-only body (photo means), LLaVA-1.5-7B geometry",
        ),
        "reduction_vs_jpeg90_file": sources.figure(
            WIRE,
            ratios + "/reduction_vs_jpeg90_file",
            "fraction",
            "1 - AlignedVQ body / bare JPEG-90 file (photo means)",
        ),
        "ratio_vs_fp16": sources.figure(
            WIRE,
            ratios + "/ratio_vs_fp16_body",
            "x",
            "fp16 feature tensor (577 x 1024 x 2 bytes) in the same request / AlignedVQ body",
        ),
        "ratio_vs_fp16_tensor": sources.figure(
            WIRE,
            ratios + "/ratio_vs_fp16_tensor",
            "x",
            "bare fp16 tensor bytes / AlignedVQ body",
        ),
        "goal_reduction_vs_jpeg90_met": sources.figure(
            WIRE, "/goals_llava15/reduction_vs_jpeg90/met", "bool", ">= 97.5 % fewer bytes than JPEG-90"
        ),
        "goal_ratio_vs_fp16_met": sources.figure(
            WIRE, "/goals_llava15/ratio_vs_fp16/met", "bool", ">= 1365x vs fp16, every byte counted"
        ),
        "edge_encode_ms_llava15": sources.figure(
            EDGE,
            edge + "/median_ms",
            "ms",
            "numpy edge encode, one thread, 336x336 uint8 array -> packed stream, median",
        ),
        "edge_encode_p90_ms_llava15": sources.figure(EDGE, edge + "/p90_ms", "ms", "the same, p90"),
        "goal_edge_encode_met": sources.figure(
            EDGE, "/goal_llava15/met", "bool", "<= 15 ms per 336 px image on one core (median)"
        ),
        "edge_install_bytes": sources.figure(
            EDGE,
            "/installed_size/edge_client/total_bytes",
            "bytes",
            "installed size of the edge client's dependencies (RECORD files)",
        ),
        "torch_install_bytes": sources.figure(
            EDGE,
            "/installed_size/torch_with_requirements/total_bytes",
            "bytes",
            "installed size of torch and its requirements, for comparison",
        ),
    }
    overhead = sources.load(OVERHEAD)
    if overhead is None:
        figures["gateway_overhead_p99_ms"] = sources.figure(OVERHEAD, "", "ms", "gateway overhead p99")
    else:
        open_runs = [(i, r) for i, r in enumerate(overhead["runs"]) if r["mode"] == "open"]
        i, run = max(open_runs, key=lambda ir: ir[1]["rate"])
        what = (
            f"client latency - queue - compute, open loop at {run['rate']:.0f} req/s offered, one CPU worker "
            "with a near-free tiny model (batching on), gateway + Redis + worker + load generator on 2 cores"
        )
        for q in ("p50", "p99"):
            figures[f"gateway_overhead_{q}_ms"] = sources.figure(
                OVERHEAD, pointer("runs", i, "overhead_ms", q), "ms", f"{q} of {what}"
            )
    figures.update(
        gpu_req_per_s=sources.figure(
            FOLLOWUP,
            "/summary/first_best_req_per_s",
            "req/s",
            "LLaVA-1.5-7B cloud half as the worker runs it on a GPU, first questions (VQA_FUSED=auto: "
            "models/fused.py, bf16, two-part prefill through the prefix cache; random weights, 577-token "
            "payloads, 3 new tokens): answers per second at the best batch size",
        ),
        gpu_batch1_ms=sources.figure(
            FOLLOWUP, "/summary/first_batch1_ms", "ms", "the same at batch 1 (median wall time)"
        ),
        gpu_followup_req_per_s=sources.figure(
            FOLLOWUP,
            "/summary/follow_up_best_req_per_s",
            "req/s",
            "follow-up questions about an image whose prompt prefix the worker holds, same run: answers "
            "per second at the best batch size",
        ),
        gpu_followup_batch1_ms=sources.figure(
            FOLLOWUP, "/summary/follow_up_batch1_ms", "ms", "the same at batch 1 (median wall time)"
        ),
        gpu_single_prefill_req_per_s=sources.figure(
            GPU,
            "/summary/cloud_half_fused/best_req_per_s",
            "req/s",
            "the worker's GPU path before conversations (one prefill, no prefix cache), an earlier run",
        ),
        gpu_single_prefill_batch1_ms=sources.figure(
            GPU, "/summary/cloud_half_fused/batch1_ms", "ms", "the same at batch 1, that run"
        ),
        gpu_hf_modules_req_per_s=sources.figure(
            GPU,
            "/summary/cloud_half/best_req_per_s",
            "req/s",
            "the same cloud half through the Hugging Face modules (VQA_FUSED=off), same run",
        ),
        gpu_hf_generate_req_per_s=sources.figure(
            GPU,
            "/summary/hf_generate_unsplit/best_req_per_s",
            "req/s",
            "baseline in the same run: plain HF generate of the unsplit model, best batch size",
        ),
        gpu_hf_generate_batch1_ms=sources.figure(
            GPU, "/summary/hf_generate_unsplit/batch1_ms", "ms", "that baseline at batch 1"
        ),
        gpu_card=sources.figure(GPU, "/machine/card", "name", "the GPU the gpu_* figures were measured on"),
    )
    scenes_default_name = json.loads((ROOT / SCENES_MODEL).read_text())["default_quantizer"]
    scenes_rate, scenes_default = run_source(sources, scenes_default_name)
    figures.update(
        scenes_accuracy_original=sources.figure(
            scenes_rate,
            "/accuracy_original",
            "fraction",
            "llava-mini-scenes unquantized, scenes test (21,000 q)",
        ),
        scenes_accuracy_alignedvq=sources.figure(
            scenes_rate,
            f"{scenes_default}/accuracy_alignedvq",
            "fraction",
            f"llava-mini-scenes with its default quantizer {scenes_default_name}, same questions",
        ),
        scenes_bits_per_token=sources.figure(
            scenes_rate,
            f"{scenes_default}/bits_per_token_entropy",
            "bits",
            "that quantizer's measured index bits per token",
        ),
        scenes_payload_bytes=sources.figure(
            scenes_rate,
            f"{scenes_default}/payload_bytes",
            "bytes",
            "its mean POST /v1/vqa body (header and envelope included), over the first 2,000 of those"
            " questions (models.evaluate measures bodies there)",
        ),
        scenes_best_codec_bytes_at_equal_accuracy=sources.figure(
            SCENES_CODECS,
            "/smallest_codec_at_default_accuracy/codec_body_bytes",
            "bytes",
            "smallest cloud-only image-codec body (PNG, JPEG, WebP, AVIF, downscaled) reaching the"
            " default quantizer's accuracy on the first 5,000 test questions (the codec run's own"
            " AlignedVQ row; the whole ladder)",
        ),
        scenes_low_rate_bits_per_token=sources.figure(
            SCENES_LOW_RATE,
            "/test/bits_per_token_entropy",
            "bits",
            "measured index bits per token of the background-suppressing quantizer chosen on holdout"
            " (the most accurate at <= 5.8 holdout bits), scenes test (21,000 q)",
        ),
        scenes_low_rate_accuracy_alignedvq=sources.figure(
            SCENES_LOW_RATE, "/test/accuracy_alignedvq", "fraction", "its accuracy, same questions"
        ),
        scenes_low_rate_accuracy_original=sources.figure(
            SCENES_LOW_RATE,
            "/test/accuracy_original",
            "fraction",
            "the unquantized model in that run (its baseline), same questions",
        ),
        shapes_best_codec_bytes_at_equal_accuracy=sources.figure(
            SHAPES_CODECS,
            "/smallest_codec_at_default_accuracy/codec_body_bytes",
            "bytes",
            "the same for llava-mini-shapes on easy-VQA test (first 1,000 questions)",
        ),
    )
    for name, link in (("0_1mbps", "0.1_mbit"), ("1mbps", "1_mbit"), ("100mbps", "100_mbit")):
        figures[f"e2e_speedup_{name}"] = sources.figure(
            E2E,
            f"/llava15_7b/goals/{link}/speedup",
            "x",
            f"LLaVA-1.5-7B end to end at {link.replace('_', ' ')}it/s uplink, 20 ms RTT: cloud-only "
            "(JPEG-90 upload + full model) latency / edge-cloud latency (measured upload over the "
            "emulated link + edge encode + H200 compute)",
        )
    return header("summary") | {
        "notes": __doc__.split("\n\n", 2)[2].strip(),
        "figures": figures,
        "missing": sorted(name for name, fig in figures.items() if fig["value"] is None),
        "sources": sources.described(),
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"headline figures (gathered on {summary['machine']['hostname']}; sources below)")
    print(f"{'figure':<30} {'value':>14} {'unit':<8} source")
    print("-" * 100)
    for name, fig in summary["figures"].items():
        value = fig["value"]
        text = "null" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        src = f"{fig['source']['file']}#{fig['source']['path']}" if fig["source"] else "-"
        print(f"{name:<30} {text:>14} {fig['unit']:<8} {src}")
    for file, info in summary["sources"].items():
        machine = info["machine"]
        where = machine.get("card") or machine.get("cpu") or machine.get("processor")
        print(f"{file}: {info['date']} on {where}")
    print(f"missing: {', '.join(summary['missing'])}")


def main() -> None:
    started = time.monotonic()
    summary = write_result(build(), OUT, started)
    print_table(summary)
    print(f"JSON: {OUT}")


if __name__ == "__main__":
    main()
