"""The suppression sweep as its user runs it: a holdout row per setting, a test row for the choice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.quantizer import AlignedVQ


@pytest.mark.slow
def test_sweep_measures_each_setting_and_keeps_the_chosen_file(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.scenes_background",
            "--settings", "70:35", "400:35",
            "--holdout-limit", "14",
            "--test-limit", "21",
            "--calibration-images", "64",
            "--max-bits", "40",
            "--keep", str(tmp_path / "keep"),
            "--out", str(out),
        ],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-800:]
    result = json.loads(out.read_text())
    rows = result["holdout"]
    assert [r["name"] for r in rows] == ["preln-r3x4096-t35-b70", "preln-r3x4096-t35-b400"]
    assert all(r["n"] == 14 and 0 <= r["accuracy_alignedvq"] <= 1 for r in rows)
    assert rows[1]["bits_per_token_entropy"] < rows[0]["bits_per_token_entropy"]  # more is background
    chosen = max(rows, key=lambda r: r["accuracy_alignedvq"])
    assert result["test"]["name"] == chosen["name"] and result["test"]["n"] == 21
    kept = AlignedVQ.load(tmp_path / "keep" / f"{chosen['name']}.safetensors")
    assert kept.content_hash() == result["test"]["codebook_hash"] == chosen["codebook_hash"]
    assert not (
        Path("models/bundled/llava-mini-scenes/quantizers") / f"{rows[1]['name']}.safetensors"
    ).exists()
