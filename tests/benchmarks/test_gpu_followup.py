"""The GPU follow-up benchmark's code path, on CPU with a tiny config (the GPU numbers are committed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tiny_run_measures_first_questions_follow_ups_and_streaming(tmp_path: Path) -> None:
    out = tmp_path / "gpu_followup.json"
    argv = [sys.executable, "-m", "benchmarks.gpu_followup", "--tiny", "--batches", "1", "2"]
    argv += ["--repeats", "1", "--stream-tokens", "8", "--lengths", "1", "4", "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    measured = {(r["kind"], r["batch"]) for r in result["runs"] if "median_ms" in r}
    assert measured == {(kind, batch) for kind in ("first", "follow_up") for batch in (1, 2)}
    assert [a["agreement"] for a in result["token_agreement"]] == [1.0, 1.0]  # the cache changes no token
    assert result["settings"]["engine"] == "FusedLlama" and result["settings"]["prefix_tokens"] == 1 + 5 + 576
    for kind in ("first", "follow_up"):
        stream = result["streaming"][kind]
        assert stream["tokens"] == 8 and 0 < stream["time_to_first_token_ms"] <= stream["total_ms"]
    lengths = result["by_answer_length"]
    assert [row["new_tokens"] for row in lengths] == [1, 4] and all(row["ratio"] > 0 for row in lengths)
    summary = result["summary"]
    assert {"latency_ratio", "throughput_ratio", "latency_bar_met", "throughput_bar_met"} <= set(summary)
    assert result["command"].startswith("python -m benchmarks.gpu_followup --tiny")
