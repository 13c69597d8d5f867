"""``benchmarks/results/summary.json`` agrees with the raw results it cites (nothing is re-run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = ROOT / "benchmarks" / "results" / "summary.json"
REQUIRED = (
    "wire_bytes_llava15",
    "jpeg90_file_bytes_llava15",
    "jpeg90_body_bytes_llava15",
    "reduction_vs_jpeg90",
    "ratio_vs_fp16",
    "edge_encode_ms_llava15",
    "gpu_req_per_s",
    "gpu_batch1_ms",
    "gpu_followup_req_per_s",
    "gpu_followup_batch1_ms",
    "gpu_card",
    "gateway_overhead_p99_ms",
    "e2e_speedup_0_1mbps",
    "e2e_speedup_1mbps",
    "e2e_speedup_100mbps",
)


def resolve(document, pointer: str):
    """JSON Pointer (RFC 6901), written here again so the test does not trust summary.py's."""
    assert pointer.startswith("/"), pointer
    node = document
    for raw in pointer[1:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


@pytest.fixture(scope="module")
def summary() -> dict:
    assert SUMMARY.is_file(), "no summary.json: run python -m benchmarks.summary"
    return json.loads(SUMMARY.read_text())


def _figures(summary: dict) -> list[tuple[str, dict]]:
    return list(summary["figures"].items())


def test_required_figures_present(summary: dict) -> None:
    assert set(REQUIRED) <= set(summary["figures"])
    assert summary["date"] and summary["machine"]


def test_every_figure_matches_its_source(summary: dict) -> None:
    checked = 0
    for name, figure in _figures(summary):
        if figure["value"] is None:
            continue
        source = figure["source"]
        path = ROOT / source["file"]
        assert path.is_file(), f"{name}: source file {source['file']} is missing"
        raw = json.loads(path.read_text())
        assert resolve(raw, source["path"]) == figure["value"], f"{name} differs from {source}"
        checked += 1
    assert checked >= 6


def test_missing_lists_exactly_the_null_figures(summary: dict) -> None:
    nulls = sorted(name for name, figure in _figures(summary) if figure["value"] is None)
    assert summary["missing"] == nulls
    for name in nulls:
        assert summary["figures"][name]["source"] is None


def test_headline_ratios_follow_from_the_byte_counts(summary: dict) -> None:
    f = {name: figure["value"] for name, figure in _figures(summary)}
    assert f["reduction_vs_jpeg90"] == pytest.approx(
        1 - f["wire_bytes_llava15"] / f["jpeg90_body_bytes_llava15"]
    )
    assert f["reduction_vs_jpeg90_file"] == pytest.approx(
        1 - f["wire_bytes_llava15"] / f["jpeg90_file_bytes_llava15"]
    )
    assert f["jpeg90_body_bytes_llava15"] > f["jpeg90_file_bytes_llava15"]
    assert f["wire_bytes_llava15"] > f["wire_stream_bytes_llava15"]


def test_gateway_overhead_comes_from_the_300_req_s_run(summary: dict) -> None:
    figure = summary["figures"]["gateway_overhead_p99_ms"]
    assert figure["source"]["file"].endswith("serving_overhead_cpu.json")
    raw = json.loads((ROOT / figure["source"]["file"]).read_text())
    run = raw["runs"][int(figure["source"]["path"].split("/")[2])]
    assert run["mode"] == "open" and run["rate"] == max(r["rate"] for r in raw["runs"] if r["mode"] == "open")
    assert run["rate"] >= 300 and run["errored"] == 0
