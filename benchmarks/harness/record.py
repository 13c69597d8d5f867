"""The result header every benchmark writes, and writing the result.

Header fields (in this order): ``benchmark``, ``date`` (UTC, seconds), ``command`` (how to run it
again), ``git`` (commit, dirty), ``machine`` (host, CPU, usable cores, thread variables; card and
CUDA for a CUDA device), ``versions`` (installed distributions, read from their metadata so no
package is imported) and ``loadavg_start``. :func:`write_result` adds ``loadavg_end`` and
``wall_s``: the machines are shared, and load from other jobs moves every timing.

Only the standard library here: ``edge_cost`` imports this before it pins numpy's threads.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# Every header lists the same distributions (None where not installed): uvloop, httptools and
# hiredis are uvicorn's and redis-py's fast paths, used when present.
PACKAGES = (
    "llava-alignedvq", "numpy", "pillow", "msgpack", "pydantic", "torch", "transformers",
    "scikit-image", "threadpoolctl", "httpx", "fastapi", "uvicorn", "uvloop", "httptools", "redis",
    "hiredis",
)  # fmt: skip
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # BLAS/OpenMP pools
ONE_THREAD = dict.fromkeys(THREAD_ENV, "1")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def usable_cpus() -> int:
    """Cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_env() -> dict[str, str | None]:
    """The thread variables as this process sees them (``OPENBLAS_CORETYPE`` picks its kernels)."""
    return {k: os.environ.get(k) for k in (*THREAD_ENV, "OPENBLAS_CORETYPE")}


def relative(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside, as result files name files."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def command() -> str:
    """This process's command line, as ``python -m module ...`` when it was started that way."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    start = ["-m", spec.name] if spec is not None else [relative(Path(sys.argv[0]))]
    return shlex.join(["python", *start, *sys.argv[1:]])


def git_state() -> dict[str, Any]:
    """The checkout's commit, and whether uncommitted changes were measured with it."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where the benchmark ran; with a CUDA ``device``, also the card (this imports torch)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "python": platform.python_version(),
        "thread_env": thread_env(),
    }
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(0)
        info |= {
            "card": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def header(benchmark: str, device: str = "cpu") -> dict[str, Any]:
    """The fields every result starts with (see the module docstring); scripts add their own after."""
    return {
        "benchmark": benchmark,
        "date": now(),
        "command": command(),
        "git": git_state(),
        "machine": machine(device),
        "versions": versions(),
        "loadavg_start": loadavg(),
    }


def write_result(result: dict[str, Any], out: Path, started: float) -> dict[str, Any]:
    """Close ``result`` (end load average, wall seconds since the ``time.monotonic()`` value
    ``started``) and write it as JSON, saying where; sets become sorted lists."""
    result["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=sorted) + "\n")
    print(f"raw JSON: {out}")
    return result


def describe(result: dict[str, Any]) -> str:
    """One line naming where and how long a result was measured, for the printed report."""
    m, v = result["machine"], result["versions"]
    where = f"{m.get('card') or m['cpu']}, {m['cpus_usable']} CPUs"
    redis = f", redis {v['redis_server']}" if v.get("redis_server") else ""
    return (
        f"{result['benchmark']} on {m['hostname']} ({where}), python {m['python']}, "
        f"torch {v['torch']}{redis}; "
        f"load average {result['loadavg_start']} -> {result.get('loadavg_end')}; {result.get('wall_s')} s"
    )
