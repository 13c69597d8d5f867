"""The GPU worker benchmark's code path, on CPU with a tiny config (the GPU numbers are committed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tiny_run_measures_every_variant_and_agrees_with_generate(tmp_path: Path) -> None:
    out = tmp_path / "gpu_worker.json"
    argv = [
        sys.executable,
        "-m",
        "benchmarks.gpu_worker",
        "--tiny",
        "--batches",
        "1",
        "2",
        "--repeats",
        "1",
        "--compiled-batches",
        "1",
    ]
    subprocess.run([*argv, "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    measured = {(r["variant"], r["batch"]) for r in result["runs"] if "median_ms" in r}
    for variant in ("hf_generate_unsplit", "cloud_half", "cloud_only", "cloud_half_fused"):
        assert {(variant, 1), (variant, 2)} <= measured
    assert ("cloud_half_compiled", 1) in measured and ("cloud_half_compiled", 2) not in measured
    assert result["token_agreement_cloud_only_vs_hf"] == 1.0
    assert result["token_agreement_fused_vs_cloud_half"] == 1.0
    assert result["settings"]["payload_tokens"] == 577
    inputs = result["e2e_inputs"]
    assert inputs["split_batch1_ms"] == result["summary"]["cloud_half_fused"]["batch1_ms"] > 0  # the GPU path
    assert inputs["cloud_only_batch1_ms"] > result["summary"]["cloud_only"]["batch1_ms"]
