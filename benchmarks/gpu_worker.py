"""GPU worker: the cloud half of LLaVA-1.5-7B vs plain Hugging Face ``generate``, by batch size.

    python -m benchmarks.gpu_worker                      # on an H100/H200, ~5 min
    python -m benchmarks.gpu_worker --variants hf_generate_unsplit cloud_half cloud_only \
        cloud_half_fused cloud_half_fused_fp8 --compiled-batches
    python -m benchmarks.gpu_worker --tiny --batches 1 2 # CPU smoke run of the same code (tests)

The LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-2-7B shapes) with random bf16 weights;
speed does not depend on the weights' values. Every request is a 577-token AlignedVQ payload
(12-bit indices at the ``preln`` site) plus a short question, answered with 3 new tokens (EOS
ignored, so every run does the same work). Variants, all in one process on one card:

- ``hf_generate_unsplit``: the baseline, ``model.generate(pixel_values=...)`` of the unsplit model
  (vision tower from pixels, HF's generation loop).
- ``cloud_half``: the cloud half through the HF modules (the worker's path on CPU, and
  ``VQA_FUSED=off``): codebook gather -> the rest of the vision tower -> projector -> language
  model, prefill with last-position logits only, then a lean greedy loop with the KV cache
  (:mod:`models.generation`).
- ``cloud_half_fused``: what the worker runs on a GPU (``VQA_FUSED=auto``; ``split_llava(...,
  fused=True)``): :class:`models.fused.FusedLlama`, the parts of a decoder layer around attention
  compiled once for all layers, q/k/v and gate/up as single GEMMs over weights the HF modules then
  view (no second copy), causal attention without a mask over padding moved to the end of each
  row, a static KV cache written in place, each decode step (and prefills up to batch 8) a CUDA
  graph, and the vision blocks replayed as a CUDA graph up to batch 8 (at batch 1 the eager CLIP
  blocks cost more wall time than the whole prefill). Graphs are compiled and captured during the
  warm-up call of each new shape; its cache buffer and graphs are released after each batch size,
  so the other variants run with the memory they had.
- ``cloud_only``: the worker's GPU path from pixels (the whole vision tower in the cloud, then the
  fused cloud half): the compute of a cloud-only request, used by ``benchmarks/e2e_network.py``
  together with the JPEG decode and preprocessing time measured here on the host CPU.
- ``cloud_half_fused_fp8`` (only when named in ``--variants``): ``cloud_half_fused``
  with the language model's linears as row-wise scaled FP8 (e4m3) GEMMs (``FusedLlama(model,
  fp8=True)``); lossy, so its token agreement with ``cloud_half_fused`` and the relative error of
  its prefill logits (beside that of bf16 kernel noise) are reported with it.
- ``cloud_half_compiled`` (second pass): HF's own blocks under ``torch.compile``; kept because it
  shows why the fused path exists (dynamo recompiles per layer index and falls back to eager).

Prompts are left-padded to the longest question in the batch (questions of 6-14 tokens after a
577-token image: < 1.5 % padding). Per variant and batch size: median wall time per batch over
``--repeats`` runs after a warm-up (CUDA synchronised), req/s = batch / median. Token agreement of
``cloud_only`` with the baseline checks that both compute the same answers. Raw JSON, written
after every measurement so a cut-off run keeps what it measured.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from benchmarks.harness.gpu import build_model, device_and_sync, timed_batch
from benchmarks.harness.record import RESULTS, header, write_result
from benchmarks.harness.stats import timed
from models.fused import FusedLlama
from models.generation import left_padded_positions
from models.split import split_llava, vision_model, vision_tokens

NEW_TOKENS = 3
PREFIX_TOKENS = 5  # "USER:" before the image in the LLaVA-1.5 template
VARIANTS = (
    "hf_generate_unsplit",
    "cloud_half",
    "cloud_only",
    "cloud_half_fused",
)
FP8 = "cloud_half_fused_fp8"  # opt-in: Hopper/Ada only, and not exact
COMPILED = "cloud_half_compiled"  # measured in a second pass: compiling changes the model in place


def prompts(config, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``USER: <image>\\n{question} ASSISTANT:``-shaped ids with random word tokens."""
    text = config.text_config
    words = lambda n: rng.integers(3, min(text.vocab_size, config.image_token_id), size=n).tolist()  # noqa: E731
    image = [config.image_token_id] * (vision_tokens(config.vision_config) - 1)
    rows = [
        [text.bos_token_id, *words(PREFIX_TOKENS), *image, *words(int(rng.integers(6, 15)) + 5)]
        for _ in range(batch)
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[text.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def variant_calls(model, edge, cloud, fused, fp8, quantizer, ids, mask, pixels, indices) -> dict:
    """One zero-argument callable per variant, all answering the same batch with new tokens."""
    greedy = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    ours = dict(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return {
        "hf_generate_unsplit": lambda: model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, **greedy
        )[:, ids.shape[1] :],
        "cloud_half": lambda: cloud.generate(quantizer.decode(indices), ids, mask, **ours),
        "cloud_only": lambda: (fused or cloud).generate(edge(pixels), ids, mask, **ours),
        "cloud_half_fused": lambda: fused.generate(quantizer.decode(indices), ids, mask, **ours),
        FP8: lambda: fp8.generate(quantizer.decode(indices), ids, mask, **ours),
    }


def logit_errors(cloud, fused, fp8, hidden_states, ids, mask) -> dict:
    """Relative L2 error of the prefill's last-token logits: FP8 vs the bf16 fused engine, and,
    as the scale of bf16 kernel noise, the bf16 fused engine vs the HF modules."""
    embeds = fused.inputs_embeds(ids, fused.image_features(hidden_states))
    positions = left_padded_positions(mask)
    hf, bf16, low = (
        half.engine.prefill(embeds, mask, positions)[0][:, -1].float() for half in (cloud, fused, fp8)
    )
    rel = lambda a, b: round(float((a - b).norm() / b.norm()), 5)  # noqa: E731
    return {"fp8_vs_fused": rel(low, bf16), "fused_vs_hf_modules": rel(bf16, hf)}


def compile_layers(model: LlavaForConditionalGeneration) -> None:
    """``torch.compile`` every transformer block (vision and language): inductor fuses the norms,
    rotary embedding and gated MLP that eager mode runs as separate memory-bound kernels."""
    inner = getattr(model, "model", model)
    for block in [*vision_model(model).encoder.layers, *inner.language_model.layers]:
        block.compile()


def gemm_ceiling(config, tokens: int, sync: Callable[[], object], repeats: int = 10) -> list[dict]:
    """bf16 TFLOP/s of the language model's own GEMM shapes at ``tokens`` rows: this card's roofline."""
    text = config.text_config
    h, f = text.hidden_size, text.intermediate_size
    out = []
    for n, k in ((h, h), (f, h), (h, f)):
        a = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        ms = statistics.median(timed(lambda a=a, b=b: torch.nn.functional.linear(a, b), repeats, sync))
        tflops = 2 * tokens * n * k / ms / 1e9
        out.append({"m": tokens, "n": n, "k": k, "median_ms": round(ms, 3), "tflops": round(tflops, 1)})
    return out


def profile_top_kernels(fn, top: int = 15) -> dict:
    """GPU time by kernel for one call, and GPU-busy vs wall time (is the call launch-bound?)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1000
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "wall_ms_profiled": round(wall, 2),
        "gpu_busy_ms": round(sum(e.self_device_time_total for e in events) / 1000, 2),
        "kernels": [
            {"name": e.key[:120], "ms": round(e.self_device_time_total / 1000, 3), "calls": e.count}
            for e in events[:top]
        ],
    }


def jpeg_preprocess_ms(image_size: int, repeats: int) -> dict | None:
    """Host-CPU time to decode a JPEG-90 and preprocess it, as the worker does for cloud-only."""
    try:
        from PIL import Image
    except ImportError:
        return None
    from edge_client.preprocess import ImageSpec, preprocess

    rng = np.random.default_rng(0)
    # A smooth synthetic photo-like image (gradients + noise): JPEG decode cost scales with pixels.
    y, x = np.mgrid[0:image_size, 0:image_size] / image_size
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 12, (image_size, image_size, 3))
    buffer = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    spec = ImageSpec(size=image_size)

    def decode_and_preprocess() -> np.ndarray:
        return preprocess(Image.open(io.BytesIO(data)).convert("RGB"), spec)

    samples = timed(decode_and_preprocess, repeats)
    return {"jpeg_bytes": len(data), "median_ms": statistics.median(samples), "samples_ms": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 96, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke run)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, FP8])
    parser.add_argument(
        "--compiled-batches",
        type=int,
        nargs="*",
        default=[1, 64, 96],
        help=f"batch sizes for {COMPILED}, measured after all eager runs (empty: skip)",
    )
    parser.add_argument("--profile-batches", type=int, nargs="*", default=[1, 64], help="CUDA only")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_worker.json")
    args = parser.parse_args()
    device, sync = device_and_sync()
    started = time.monotonic()
    result = header("gpu_worker", device)

    built = time.perf_counter()
    model, quantizer = build_model(args.tiny, device)
    config = model.config
    vq_config = quantizer.config
    edge, cloud = split_llava(model, vq_config.site)
    wanted = {"cloud_half_fused", "cloud_only"} & set(args.variants)
    fused = split_llava(model, vq_config.site, fused=True)[1] if wanted else None
    fp8 = None
    if FP8 in args.variants:
        fp8 = split_llava(model, vq_config.site, fused=True)[1]
        fp8.engine = FusedLlama(model, fp8=True)
    releasable = [part for half in (fused, fp8) if half is not None for part in (half.engine, half._features)]
    tokens = vision_tokens(config.vision_config)
    size = config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    result |= {
        "settings": {
            "device": device,
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled() if sync else None,
            "architecture": "tiny" if args.tiny else "llava-1.5-7b (random weights)",
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype),
            "attn_implementation": config.text_config._attn_implementation,
            "payload_tokens": tokens,
            "quantizer": vq_config.name,
            "new_tokens": NEW_TOKENS,
            "batches": args.batches,
            "repeats": args.repeats,
            "build_s": round(time.perf_counter() - built, 1),
        },
        "notes": __doc__,
        "runs": [],
    }

    def save() -> None:
        write_result(result, args.out, started)

    def measure(name: str, fn, batch: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
        run = {"variant": name, **timed_batch(fn, batch, args.repeats, sync, device)}
        result["runs"].append(run)
        if "error" in run:
            print(f"{name} batch {batch}: {run['error']}"[:300], flush=True)
        else:
            run["prompt_tokens"] = ids.shape[1]
            run["padding_fraction"] = round(1 - float(mask.float().mean()), 4)
            print(f"{name:22s} batch {batch:4d}: {run['median_ms']:9.2f} ms  {run['req_per_s']:8.2f} req/s")
        save()

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng(batch)
        ids, mask = (t.to(device) for t in prompts(config, batch, rng))
        pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        indices = torch.randint(0, vq_config.codebook_size, (batch, tokens, 1, 1), device=device)
        return ids, mask, pixels, indices

    if device.startswith("cuda"):
        result["gemm_ceiling"] = gemm_ceiling(config, 64 * 607, sync)
        print(json.dumps(result["gemm_ceiling"]), flush=True)

    def settle() -> None:
        """Give back the fused engines' caches and graphs before anything else runs: a serving
        worker keeps them, but here every variant should run with the memory it would have."""
        for releasable_part in releasable:
            releasable_part.release()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    def same_tokens(calls: dict, first: str, second: str) -> float:
        a = calls[first]()
        settle()
        b = calls[second]()
        settle()
        return float((a == b).float().mean())

    agreement, fused_agreement, fp8_agreement = [], [], []
    with torch.inference_mode():
        for batch in args.batches:
            ids, mask, pixels, indices = inputs(batch)
            calls = variant_calls(model, edge, cloud, fused, fp8, quantizer, ids, mask, pixels, indices)
            for name in args.variants:
                measure(name, calls[name], batch, ids, mask)
                settle()
            measured = {r["variant"] for r in result["runs"] if r["batch"] == batch and "median_ms" in r}
            if {"hf_generate_unsplit", "cloud_only"} <= measured:
                agreement.append(same_tokens(calls, "hf_generate_unsplit", "cloud_only"))
            if {"cloud_half", "cloud_half_fused"} <= measured:
                fused_agreement.append(same_tokens(calls, "cloud_half", "cloud_half_fused"))
            if {"cloud_half_fused", FP8} <= measured:
                fp8_agreement.append(same_tokens(calls, "cloud_half_fused", FP8))
                errors = logit_errors(cloud, fused, fp8, quantizer.decode(indices), ids, mask)
                settle()
                result.setdefault("prefill_logit_rel_error", []).append({"batch": batch, **errors})
            if device.startswith("cuda") and batch in args.profile_batches:
                for name in ("cloud_half", "cloud_half_fused", FP8):
                    if name in measured:
                        result.setdefault("profiles", {})[f"{name}_b{batch}"] = profile_top_kernels(
                            calls[name]
                        )
                        settle()
                save()
        if args.compiled_batches:
            compile_layers(model)
            for batch in args.compiled_batches:
                ids, mask, pixels, indices = inputs(batch)
                calls = variant_calls(model, edge, cloud, fused, fp8, quantizer, ids, mask, pixels, indices)
                measure(COMPILED, calls["cloud_half"], batch, ids, mask)
                if device.startswith("cuda") and batch in args.profile_batches:
                    result["profiles"][f"{COMPILED}_b{batch}"] = profile_top_kernels(calls["cloud_half"])
                    save()
    result["token_agreement_cloud_only_vs_hf"] = statistics.mean(agreement) if agreement else None
    result["token_agreement_fused_vs_cloud_half"] = (
        statistics.mean(fused_agreement) if fused_agreement else None
    )
    result["token_agreement_fp8_vs_fused"] = statistics.mean(fp8_agreement) if fp8_agreement else None
    result["summary"] = summarize(result["runs"])
    jpeg = jpeg_preprocess_ms(size, 20)
    result["cpu_jpeg_decode_preprocess"] = jpeg
    best = result["summary"]
    result["e2e_inputs"] = {
        "card": result["machine"].get("card", device),
        # the worker's GPU path (VQA_FUSED=auto), HF modules when the fused one was not measured
        "split_batch1_ms": best.get("cloud_half_fused", best.get("cloud_half", {})).get("batch1_ms"),
        "cloud_only_batch1_ms": (
            best["cloud_only"]["batch1_ms"] + jpeg["median_ms"]
            if jpeg and best.get("cloud_only", {}).get("batch1_ms") is not None
            else None
        ),
        "notes": "cloud_only_batch1_ms = cloud_only compute at batch 1 + JPEG-90 decode and "
        "preprocessing on the host CPU",
    }
    save()
    print(json.dumps(result["summary"], indent=1))


def summarize(runs: list[dict]) -> dict:
    """Per variant: batch-1 latency and the best req/s over batch sizes (saturation)."""
    out: dict = {}
    for name in (*VARIANTS, FP8, COMPILED):
        done = [r for r in runs if r["variant"] == name and "median_ms" in r]
        if not done:
            continue
        best = max(done, key=lambda r: r["req_per_s"])
        one = next((r for r in done if r["batch"] == 1), None)
        out[name] = {
            "batch1_ms": one["median_ms"] if one else None,
            "best_req_per_s": best["req_per_s"],
            "best_batch": best["batch"],
        }
    # Goals are judged on the exact (bf16) paths; the FP8 variant is reported beside them.
    exact = ("cloud_half", COMPILED, "cloud_half_fused")
    ours = [out[name] for name in exact if name in out]
    if ours:
        fastest = [r["batch1_ms"] for r in ours if r["batch1_ms"] is not None]
        out["goals"] = {
            "req_per_s_at_least_75": max(r["best_req_per_s"] for r in ours) >= 75,
            "batch1_ms_at_most_40": bool(fastest) and min(fastest) <= 40,
        }
    return out


if __name__ == "__main__":
    main()
