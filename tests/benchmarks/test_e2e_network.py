"""``benchmarks/e2e_network.py``: the emulated link really shapes traffic, and 7B rows compose right.

The link test builds real namespaces (root needed, as in CI); it fails, never skips, without them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from benchmarks import e2e_network as e2e

BIG = bytes(64_000)  # 0.51 s of serialization at 1 Mbit/s; a few round trips unshaped
TINY = bytes(200)


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_shaped_uplink_slows_a_big_upload_and_the_link_is_removed() -> None:
    bodies = {"big": [BIG], "tiny": [TINY]}
    with e2e.emulated_link(delay_ms=10) as link, e2e.sink(link) as url:
        created = {link.client, link.server}
        assert created <= namespaces()
        with pytest.raises(httpx.TransportError):  # the server namespace is not reachable from here
            httpx.post(url, content=TINY, timeout=2, trust_env=False)
        measured = {}
        for mbit in (None, 1.0):
            link.shape(mbit)
            with e2e.inside(link.client):
                measured[mbit] = e2e.measure_uploads(url, bodies, repeats=1)
        counts = link.shape(None)
    assert not created & namespaces()
    unshaped, shaped = measured[None], measured[1.0]
    for run in measured.values():  # one new connection per upload: one round trip of handshake
        assert all(18 <= ms <= 200 for mode in run.values() for ms in mode["connect_ms"]), run
    assert unshaped["big"]["upload_ms"][0] >= 20  # at least a round trip
    assert shaped["big"]["upload_ms"][0] >= len(BIG) * 8 / 1e6 * 1e3  # serialization at 1 Mbit/s
    assert shaped["big"]["upload_ms"][0] > 3 * unshaped["big"]["upload_ms"][0]
    assert shaped["tiny"]["upload_ms"][0] < shaped["big"]["upload_ms"][0] / 5
    assert counts["uplink_bytes"] >= 2 * len(BIG)  # every byte went through the delay line


def test_link_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2e.os, "geteuid", lambda: 1000)
    with pytest.raises(e2e.NetworkUnavailable, match="root"), e2e.emulated_link(delay_ms=10):
        pass


def uploads(edge_cloud_ms: list[float], cloud_only_ms: list[float]) -> dict:
    return {
        "edge_cloud": {"upload_ms": edge_cloud_ms, "connect_ms": [20.0] * len(edge_cloud_ms)},
        "cloud_only": {"upload_ms": cloud_only_ms, "connect_ms": [20.0] * len(cloud_only_ms)},
    }


EDGE = {"aligned_encode_ms": 10.0, "jpeg90_encode_ms": 1.0}
GPU = {"card": "test card", "split_batch1_ms": 90.0, "cloud_only_batch1_ms": 110.0}


def test_compose_adds_the_median_parts() -> None:
    row = e2e.compose(0.1, uploads([100.0, 120.0, 400.0], [2000.0, 2100.0, 2200.0]), EDGE, GPU)
    assert row["edge_cloud"]["total_ms"] == 10.0 + 120.0 + 90.0
    assert row["cloud_only"]["total_ms"] == 1.0 + 2100.0 + 110.0
    assert row["speedup"] == round(2211.0 / 220.0, 3)
    assert row["edge_cloud"]["upload_ms"]["p90_ms"] == pytest.approx(344.0)
    assert row["cloud_only"]["connect_ms"]["median_ms"] == 20.0
    json.dumps(row)  # plain JSON


def test_without_gpu_figures_totals_and_goals_are_null() -> None:
    rows = [e2e.compose(mbit, uploads([100.0], [300.0]), EDGE, None) for mbit in (0.1, 1.0, 100.0)]
    assert all(r["edge_cloud"]["total_ms"] is None and r["speedup"] is None for r in rows)
    assert rows[0]["cloud_only"]["upload_ms"]["median_ms"] == 300.0  # the network part is kept
    goals = e2e.goals(rows)
    assert set(goals) == {"0.1_mbit", "1_mbit", "100_mbit"}
    assert all(g["met"] is None and g["speedup"] is None for g in goals.values())


def test_goals_compare_speedups_with_the_bars() -> None:
    rows = [
        e2e.compose(0.1, uploads([100.0], [3000.0]), EDGE, GPU),  # 3111 / 200 = 15.6x
        e2e.compose(1.0, uploads([30.0], [300.0]), EDGE, GPU),  # 411 / 130 = 3.2x
        e2e.compose(100.0, uploads([30.0], [15.0]), EDGE, GPU),  # 126 / 130 = 0.97x
    ]
    goals = e2e.goals(rows)
    assert goals["0.1_mbit"] == {"goal_speedup": 10.0, "speedup": 15.555, "met": True}
    assert goals["1_mbit"]["met"] is True
    assert goals["100_mbit"]["speedup"] == 0.969 and goals["100_mbit"]["met"] is True
    slow = e2e.compose(1.0, uploads([200.0], [300.0]), EDGE, GPU)
    assert e2e.goals([slow])["1_mbit"]["met"] is False


def test_gpu_figures_read_the_pointers(tmp_path: Path) -> None:
    assert e2e.gpu_figures(tmp_path / "absent.json") is None
    path = tmp_path / "gpu_worker.json"
    path.write_text(json.dumps({"date": "d", "e2e_inputs": {**GPU, "split_batch1_ms": None}}))
    assert e2e.gpu_figures(path) is None  # that benchmark has not measured it yet
    path.write_text(json.dumps({"date": "d", "e2e_inputs": GPU}))
    figures = e2e.gpu_figures(path)
    assert figures is not None and figures["split_batch1_ms"] == 90.0 and figures["card"] == "test card"
    assert figures["source"]["pointers"] == e2e.GPU_POINTERS
