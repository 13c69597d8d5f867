"""The LLaVA-1.5-7B-shaped model the GPU benchmarks run: random weights, serving dtype, a quantizer.

Random weights cost nothing to obtain and time exactly like trained ones; accuracy is measured on
the bundled models instead. ``tiny`` swaps in a small config of the same image geometry, so every
GPU script has a CPU smoke run that the tests execute.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from models.architectures import llava15_geometry_config, tiny_llava_config
from models.config import QuantizerConfig
from models.quantizer import AlignedVQ

from .stats import timed

__all__ = ["build_model", "device_and_sync", "timed_batch"]


def build_model(tiny: bool, device: str) -> tuple[LlavaForConditionalGeneration, AlignedVQ]:
    """Random weights, built directly on the device in the serving dtype (no fp32 copy of 7B), and
    the paper's quantizer at the pre-LN site (one 4096-entry codebook, 12-bit codes), untrained."""
    config = tiny_llava_config(image_size=336, patch_size=14) if tiny else llava15_geometry_config()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    quantizer = QuantizerConfig(
        dim=config.vision_config.hidden_size, split_site="preln", codebook_size=4096, code_dim=32
    )
    return model.eval(), AlignedVQ(quantizer).to(device).eval()


def timed_batch(
    fn: Callable[[], object], batch: int, repeats: int, sync: Callable[[], None] | None, device: str
) -> dict[str, Any]:
    """One batch size's run record: median ms, req/s, samples and peak GPU memory, or the error.

    A failure (out of memory, a compile error) is recorded and the cache emptied, so one batch size
    or variant cannot lose the rest of a lease's measurements.
    """
    try:
        samples = timed(fn, repeats, sync)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"batch": batch, "error": repr(exc)[:500]}
    median = statistics.median(samples)
    run: dict[str, Any] = {
        "batch": batch,
        "median_ms": round(median, 3),
        "req_per_s": round(batch / median * 1000, 2),
        "samples_ms": [round(s, 3) for s in samples],
    }
    if device.startswith("cuda"):
        run["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return run


def device_and_sync() -> tuple[str, Callable[[], None] | None]:
    """CUDA when present (TF32 matmuls allowed, as serving runs them), and the call that makes a
    timer count queued GPU work; CPU (no sync) for the smoke runs."""
    if not torch.cuda.is_available():
        return "cpu", None
    torch.backends.cuda.matmul.allow_tf32 = True
    return "cuda", torch.cuda.synchronize
