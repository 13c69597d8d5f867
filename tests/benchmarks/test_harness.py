"""``benchmarks.harness``: every script writes the same header through it, and scripts share code
only through it (no script imports another)."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness.record import header, write_result
from benchmarks.harness.stats import dist, percentile
from benchmarks.summary import Sources

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
HEADER = ("benchmark", "date", "command", "git", "machine", "versions", "loadavg_start")


def imports(path: Path) -> dict[str, set[str]]:
    """Module -> names of every ``from benchmarks... import ...`` in ``path``."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
            found.setdefault(node.module or "", set()).update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_script_imports_only_the_harness(path: Path) -> None:
    others = [module for module in imports(path) if not module.startswith("benchmarks.harness")]
    assert not others, f"{path.name} imports {others}: shared code belongs in benchmarks/harness"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_script_writes_the_common_header(path: Path) -> None:
    assert {"header", "write_result"} <= imports(path).get("benchmarks.harness.record", set())


def test_header_and_write_result(tmp_path: Path) -> None:
    started = time.monotonic()
    result = header("probe") | {"figure": 1.0, "seen": {"b", "a"}}
    assert tuple(result)[: len(HEADER)] == HEADER
    assert result["benchmark"] == "probe" and result["command"].startswith("python ")
    assert {"hostname", "cpu", "cpus_usable", "thread_env"} <= set(result["machine"])
    assert "card" not in result["machine"]  # a CPU run imports no torch for a card
    assert "numpy" in result["versions"]
    out = tmp_path / "deep" / "probe.json"
    write_result(result, out, started)
    written = json.loads(out.read_text())
    assert written["seen"] == ["a", "b"] and written["wall_s"] >= 0
    assert len(written["loadavg_end"]) == 3


def test_percentile_is_numpys_linear_one() -> None:
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert dist([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_summary_reads_old_and_new_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("benchmarks.summary.ROOT", tmp_path)
    old = {"date": "d0", "machine": {"processor": "x86_64", "cpus": 2}, "loadavg_start": [1, 1, 1]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(header("probe")))
    sources = Sources()
    sources.load("old.json")
    sources.load("new.json")
    described = sources.described()
    assert described["old.json"]["machine"]["processor"] == "x86_64"
    assert described["new.json"]["machine"]["cpu"] and described["new.json"]["date"]
