"""A short run of ``benchmarks.soak`` (own redis-server, real gateway + one CPU worker): nothing is
lost, the samples exist and carry what the full run reports, and the result keys expire."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--minutes", "0.2", "--rate", "3", "--workers", "1", "--sample-s", "4", "--result-ttl-s", "3"]


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    if shutil.which("redis-server") is None and not (Path(sys.executable).parent / "redis-server").exists():
        pytest.skip("no redis-server binary")
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", *ARGS, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, out


def test_nothing_is_lost(soak) -> None:
    summary = soak[0]["summary"]
    assert summary["sent"] > 20
    assert summary["lost"] == 0 and summary["errored"] == 0
    assert summary["answered"] == summary["sent"]
    assert summary["ids_with_two_answers"] == 0


def test_every_window_is_sampled(soak) -> None:
    result = soak[0]
    samples = result["samples"]
    assert [s["label"] for s in samples] == ["w000", "w001", "w002"]
    assert sum(s["window"]["requests"] for s in samples) == result["summary"]["sent"]
    for sample in samples:
        assert set(sample["rss_mib"]) == {"gateway", "worker-0"}
        assert all(v > 10 for v in sample["rss_mib"].values())
        assert sample["redis"]["used_memory_mib"] > 0
        assert sample["window"]["p99_ms"] >= sample["window"]["p50_ms"] > 0
    assert {"date", "command", "machine", "versions", "loadavg_start", "loadavg_end"} <= set(result)
    assert result["versions"]["torch"] and result["versions"]["redis_server"]
    assert result["settings"]["minutes"] == 0.2


def test_streams_are_emptied_and_results_expire(soak) -> None:
    result = soak[0]
    after = result["after_expiry"]["redis"]
    assert after["stream_len"] == after["pending"] == after["dead_len"] == 0
    assert "result" not in after["keys_by_kind"]
    assert result["summary"]["redis_keys"]["after_expiry"] < result["summary"]["redis_keys"]["max"]


def test_table_and_plot(soak) -> None:
    _, stdout, out = soak
    assert "sent / answered / errored / lost" in stdout and "p99 ms, first vs last" in stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
