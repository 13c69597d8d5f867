"""The decode breakdown's code path, on CPU with a tiny config (the GPU numbers are committed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_decode_breakdown import kernel_class


def test_kernels_are_classed_attention_before_gemm() -> None:
    assert kernel_class("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention)") == "attention"
    assert kernel_class("nvjet_sm90_tst_256x8_64x6_4x1_v_bz_TNT") == "gemm"
    assert kernel_class("void cublasLt::splitKreduce_kernel<32, 16, int>") == "gemm"
    assert kernel_class("Memcpy DtoD (Device -> Device)") == "copy"
    assert kernel_class("void at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)") == "copy"
    assert kernel_class("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "other"  # an RMSNorm
    assert kernel_class("triton_poi_fused_mul_silu_1") == "other"


def test_tiny_run_profiles_both_kinds(tmp_path: Path) -> None:
    out = tmp_path / "breakdown.json"
    argv = [
        sys.executable,
        "-m",
        "benchmarks.gpu_decode_breakdown",
        "--tiny",
        "--calls",
        "2",
        "--out",
        str(out),
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    for kind in ("first", "follow_up"):
        row = result["profile"][kind]
        assert row["wall_ms"] > 0 and set(row["cpu_ms_by_class"]) == {"attention", "gemm", "copy", "other"}
        assert row["cpu_ms_by_class"]["gemm"] > 0
    assert "linears_batch1" not in result  # GPU only
    assert result["settings"]["engine"] == "FusedLlama"
