"""Where a batch-1 follow-up's GPU time goes, and what int8 weights and another attention kernel would save.

    python -m benchmarks.gpu_decode_breakdown                  # on an H100/H200, ~1 minute
    python -m benchmarks.gpu_decode_breakdown --tiny --out /tmp/b.json   # CPU smoke run (tests)

The conversations bar asks a follow-up on a cached prefix to take at most 0.4x a first question's
batch-1 latency (benchmarks/gpu_followup.py measured 0.56x). Both end in the same sequential passes
over the language model's weights (one for the question, one per further answer token), so the
ratio moves only if a pass gets cheaper. This measures, on the LLaVA-1.5-7B architecture (random
bf16 weights, the worker's fused path), in one run:

1. **the profile of a batch-1 follow-up and first question** (3 new tokens, as gpu_followup):
   device time by kernel class (GEMM, attention, copies, the rest) and wall time;
2. **the linears of one pass at batch 1**: cuBLAS bf16 against int8 weight-only kernels (a small
   Triton kernel that dequantizes in registers, and PyTorch's ``_weight_int8pack_mm``), per
   Llama-2-7B shape, on CUDA-graph replays of 20 calls;
3. **decode attention at batch 1** over the cache a follow-up attends to: each SDPA backend the
   engine may pick, and plain matmul + softmax.

Then a projection, labelled as one: the ratio if every pass saved what (2) and (3) measured. int8
weights are lossy and not part of the product; the point is whether they would reach the bar.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness.conversation import NEW_TOKENS, Server, prefix_entry_bytes, prompt_ids
from benchmarks.harness.gpu import build_model, device_and_sync
from benchmarks.harness.record import RESULTS, header, write_result
from models.split import split_llava, vision_tokens

CLASSES = ("attention", "gemm", "copy", "other")
INT8_BLOCKS = ((32, 256, 4), (64, 128, 4), (64, 256, 8))  # (BLOCK_N, BLOCK_K, warps) tried per shape


def kernel_class(name: str) -> str:
    """A profiler event's class, by kernel (CUDA) or op (CPU) name; attention first: its cutlass
    kernels would otherwise read as GEMMs."""
    low = name.lower()
    if any(k in low for k in ("fmha", "flash", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "splitkreduce", "aten::mm", "aten::addmm")):
        return "gemm"
    if "memcpy" in low or "copy_kernel" in low or low.startswith("aten::copy"):
        return "copy"  # not triton's fused kernels, whose names list a to_copy among their ops
    return "other"


def profiled(fn: Callable[[], object], sync: Callable[[], None] | None, calls: int, cuda: bool) -> dict:
    """Device (CUDA) or CPU self time per call by kernel class, and the median wall time."""
    walls = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            walls.append((time.perf_counter() - start) * 1e3)
    by_class = dict.fromkeys(CLASSES, 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us and (not cuda or event.device_type == torch.autograd.DeviceType.CUDA):
            by_class[kernel_class(event.key)] += us / 1e3 / calls
    return {
        "wall_ms": round(statistics.median(walls), 3),
        "device_ms_by_class" if cuda else "cpu_ms_by_class": {k: round(v, 3) for k, v in by_class.items()},
    }


def replay_us(fn: Callable[[], object], calls: int = 20, repeats: int = 10) -> float:
    """Microseconds per call of ``fn`` from CUDA-graph replays (no launch overhead), as a pass runs."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * repeats)


def _int8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w8a16(x, w, s, out, M, N, K, sxm, swn, som, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out = x @ (w * s)^T for int8 ``w`` (N, K) with one scale per row, dequantized in registers."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rm = tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            wt = tl.load(
                w + rn[:, None] * swn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0
            )
            xt = tl.load(
                x + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
            )
            acc += tl.dot(xt.to(tl.bfloat16), tl.trans(wt.to(tl.bfloat16)))
        scale = tl.load(s + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(
            out + rm[:, None] * som + rn[None, :],
            (acc * scale[None, :]).to(tl.bfloat16),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    return triton, w8a16


def linears(config) -> dict[str, tuple[int, int, int]]:
    """The language model's linears of one pass as ``(out, in, count)``, q/k/v and gate/up fused."""
    t = config.text_config
    head = t.hidden_size // t.num_attention_heads
    layers = t.num_hidden_layers
    return {
        "qkv": ((t.num_attention_heads + 2 * t.num_key_value_heads) * head, t.hidden_size, layers),
        "o": (t.hidden_size, t.hidden_size, layers),
        "gate_up": (2 * t.intermediate_size, t.hidden_size, layers),
        "down": (t.hidden_size, t.intermediate_size, layers),
        "lm_head": (t.vocab_size, t.hidden_size, 1),
    }


def gemv_rows(config) -> list[dict]:
    """(2): bf16 against int8 weight-only, batch 1, per shape."""
    kernel = _int8_kernel()
    return [gemv_row(name, n, k, count, *kernel) for name, (n, k, count) in linears(config).items()]


def gemv_row(name: str, n: int, k: int, count: int, triton, w8a16) -> dict:
    """One ``(n, k)`` linear at batch 1: cuBLAS bf16, the best correct int8 Triton blocking, and
    ``torch._weight_int8pack_mm``, all against the dequantized weight's bf16 product."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    scale = (w.float().abs().amax(1) / 127).to(torch.bfloat16)
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x, (q.float() * scale.float()[:, None]).to(torch.bfloat16)).float()
    row: dict = {"linear": name, "out": n, "in": k, "per_pass": count}
    row["bf16_us"] = replay_us(lambda: F.linear(x, w))
    best: tuple[float, str] | None = None
    for bn, bk, warps in INT8_BLOCKS:
        grid = (triton.cdiv(n, bn),)
        call = partial(w8a16[grid], x, q, scale, out, 1, n, k, k, k, n, BM=16, BN=bn, BK=bk, num_warps=warps)
        call()
        torch.cuda.synchronize()
        if torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2):
            us = replay_us(call)
            if best is None or us < best[0]:
                best = (us, f"{bn}x{bk}/{warps}")
    row["int8_triton_us"], row["int8_triton_blocks"] = best if best else (None, "none correct")
    try:
        row["int8pack_mm_us"] = replay_us(lambda: torch._weight_int8pack_mm(x, q, scale))
    except (RuntimeError, NotImplementedError) as exc:
        row["int8pack_mm_us"], row["int8pack_mm_error"] = None, repr(exc)[:200]
    row["bf16_tb_per_s"] = n * k * 2 / row["bf16_us"] / 1e6
    return {key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}


def attention_rows(config, slots: int, valid: int) -> list[dict]:
    """(3): one decode step's attention at batch 1 over ``slots`` cache slots, ``valid`` of them live."""
    t = config.text_config
    head = t.hidden_size // t.num_attention_heads
    q = torch.randn(1, t.num_attention_heads, 1, head, device="cuda", dtype=torch.bfloat16)
    k, v = (
        torch.randn(1, t.num_key_value_heads, slots, head, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    mask = torch.zeros(1, 1, 1, slots, device="cuda", dtype=torch.bool)
    mask[..., :valid] = True
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)

    def sdpa(backend: SDPBackend) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def matmul() -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * head**-0.5
        return (
            torch.softmax(scores.masked_fill(~mask, float("-inf")), -1, dtype=torch.float32).to(v.dtype) @ v
        )

    rows = []
    variants = {
        f"sdpa_{b.name.lower()}": partial(sdpa, b)
        for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
    } | {"matmul_softmax": matmul}
    for name, fn in variants.items():
        try:
            error = float((fn().float() - reference).abs().max())
            rows.append({"variant": name, "us": round(replay_us(fn), 2), "max_abs_error": round(error, 4)})
        except RuntimeError as exc:
            rows.append({"variant": name, "error": repr(exc)[:200]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke run: part 1 only)")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls of each kind")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_decode_breakdown.json")
    args = parser.parse_args()
    device, sync = device_and_sync()
    cuda = device == "cuda"
    started = time.monotonic()
    model, quantizer = build_model(args.tiny, device)
    config = model.config
    _, cloud = split_llava(model, quantizer.config.site, fused=True)
    tokens = vision_tokens(config.vision_config)
    prefix, _, _ = prompt_ids(config, 1, np.random.default_rng(0))
    server = Server(cloud, quantizer, prefix.to(device), budget=4 * prefix_entry_bytes(model, prefix))
    _, ids, mask = (t.to(device) for t in prompt_ids(config, 1, np.random.default_rng(1)))
    indices = torch.randint(0, quantizer.config.codebook_size, (1, tokens, 1, 1), device=device)
    short = dict(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    first = partial(server.first, [b"image"], indices, ids, mask, **short)
    follow_up = partial(server.followup, [b"image"], ids, mask, **short)
    for fn in (first, follow_up, first, follow_up):  # compile, capture graphs
        fn()
    result = header("gpu_decode_breakdown", device) | {
        "settings": {
            "architecture": "tiny" if args.tiny else "llava-1.5-7b (random weights)",
            "engine": type(cloud.engine).__name__,
            "new_tokens": NEW_TOKENS,
            "prefix_tokens": len(prefix),
            "calls": args.calls,
        },
        "notes": __doc__,
        "profile": {
            "first": profiled(first, sync, args.calls, cuda),
            "follow_up": profiled(follow_up, sync, args.calls, cuda),
        },
    }
    print({kind: row["wall_ms"] for kind, row in result["profile"].items()}, flush=True)
    if cuda:
        result["linears_batch1"] = gemv_rows(config)
        capacity = -(-(len(prefix) + ids.shape[1] + NEW_TOKENS) // 64) * 64
        result["attention_batch1"] = attention_rows(config, capacity, len(prefix) + ids.shape[1])
        result["projection"] = projection(result, config.text_config.num_hidden_layers)
        print(result["projection"], flush=True)
    write_result(result, args.out, started)


def projection(result: dict, layers: int) -> dict:
    """The batch-1 ratio if every pass of both kinds saved what the kernels measured (a projection)."""
    bf16 = sum(r["bf16_us"] * r["per_pass"] for r in result["linears_batch1"])
    int8 = sum((r["int8_triton_us"] or r["bf16_us"]) * r["per_pass"] for r in result["linears_batch1"])
    timed = [r for r in result["attention_batch1"] if "us" in r]
    used = next(r["us"] for r in timed if r["variant"] == "sdpa_efficient_attention")  # the engine's choice
    fastest = min(timed, key=lambda r: r["us"])
    saved_ms = ((bf16 - int8) + layers * (used - fastest["us"])) / 1e3  # per pass
    first, follow = (result["profile"][k]["wall_ms"] for k in ("first", "follow_up"))
    passes = NEW_TOKENS  # the question's pass and one per further token, in both
    return {
        "measured_ratio": round(follow / first, 3),
        "linears_per_pass_bf16_ms": round(bf16 / 1e3, 3),
        "linears_per_pass_int8_ms": round(int8 / 1e3, 3),
        "attention_per_pass_engine_ms": round(layers * used / 1e3, 3),
        "attention_per_pass_fastest_ms": round(layers * fastest["us"] / 1e3, 3),
        "fastest_attention": fastest["variant"],
        "saved_per_pass_ms": round(saved_ms, 3),
        "projected_ratio": round((follow - passes * saved_ms) / (first - passes * saved_ms), 3),
    }


if __name__ == "__main__":
    main()
