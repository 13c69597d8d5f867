"""Serving load: a real gateway and real CPU workers over the local Redis, driven by an async load generator.

    .venv/bin/python benchmarks/serving_load.py            # full run, ~6 min on 2 cores
    .venv/bin/python benchmarks/serving_load.py --quick    # smoke run, ~1 min, 2 configs
    .venv/bin/python benchmarks/serving_load.py --configs b16-w1,b1-w1 --out /tmp/load.json
    .venv/bin/python -m benchmarks.serving_load --overhead   # gateway overhead at 100-300 req/s

Starts ``vqa-gateway`` (anonymous, its own ``VQA_KEY_PREFIX``, a free port on 127.0.0.1) once, and
for each worker configuration (batching on/off x 1/2 workers) that many ``vqa-worker --device cpu``
processes. Request payloads are encoded once, before any load, by the real edge encoder from the
bundle the gateway serves; each send only stamps a fresh ``request_id`` into the msgpack map (the
gateway answers a repeated id from its result store, so ids must not repeat).

Load: closed loop (C clients, each sends its next request when the previous one returns) and open
loop (Poisson arrivals at a target rate; latency counted from the scheduled arrival, so a lagging
generator cannot hide queueing). Every run is bounded in requests and seconds. Per run: sent /
answered / errored, req/s, latency p50/p95/p99, the gateway's queue_ms, compute_ms and batch_size
from each reply, overhead = latency - queue_ms - compute_ms (HTTP, gateway, Redis round trips,
result delivery, client), and the share of answers matching the easy-VQA-style ground truth.
Beside them, ``latency_from_send_ms`` and ``overhead_from_send_ms`` count from the moment each
request was written to its socket: in open loop that leaves out the generator's own lag behind its
schedule, which ``latency_ms`` and ``overhead_ms`` keep.

Raw JSON (machine, load averages, settings, every run) goes to results/serving_load_cpu.json; one
table is printed. The load generator, the gateway, Redis and the workers share the same CPUs, so
each run also records the cores every process used and the generator's lag behind its schedule.

``--overhead`` measures the gateway's own cost at up to 300 req/s (results/serving_overhead_cpu.json):
the worker serves the tests' tiny random LLaVA (near-zero compute, so one CPU worker keeps up), and
the load generator uses :class:`RawClient` (httpx alone would take most of a core at that rate).
During every run the generator's garbage collector is paused (:func:`gc_paused`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import redis

from benchmarks.harness.payloads import Item, build_items, normalize, pack, shapes_dataset
from benchmarks.harness.record import RESULTS, describe, header, usable_cpus, write_result
from benchmarks.harness.stack import Stack, redis_version
from benchmarks.harness.stats import dist, percentile
from edge_client.protocol import CONTENT_TYPE

# ---- settings ---------------------------------------------------------------------------------
SETTINGS: dict = {
    "model": "llava-mini-shapes",
    "redis_url": "redis://127.0.0.1:6379/0",
    "dataset": shapes_dataset(64),
    "max_new_tokens": 8,
    # Worker configurations, each measured with every load below (baselines in the same run).
    "configs": [
        {"name": "b16-w1", "workers": 1, "max_batch": 16, "max_wait_ms": 10},
        {"name": "b1-w1", "workers": 1, "max_batch": 1, "max_wait_ms": 10},
        {"name": "b16-w2", "workers": 2, "max_batch": 16, "max_wait_ms": 10},
        {"name": "b1-w2", "workers": 2, "max_batch": 1, "max_wait_ms": 10},
    ],
    # torch threads per worker ("auto": cpu_count // workers). 1: on 2 shared cores, 2 OpenMP
    # threads per worker stall whenever one is descheduled (compute p95 far above its p50).
    "torch_threads": 1,
    "warmup_requests": 16,
    "closed_loop": {"concurrency": [1, 4, 16], "duration_s": 12.0, "max_requests": 2000},
    "open_loop": {"rates": [5.0, 15.0, 30.0], "duration_s": 12.0, "max_requests": 500},
    "drain_s": 30.0,  # after a run's send window: how long outstanding requests may still finish
    "request_timeout_ms": 30000,  # each request's timeout_ms: the gateway answers 504 past it
    "client_timeout_s": 35.0,  # per HTTP request, client side (so the gateway's 504 comes first)
    "startup_timeout_s": 90.0,  # gateway /healthz, workers live, /readyz
    "client": "httpx",  # the load generator's HTTP client: httpx, or "raw" (RawClient: far less CPU)
}
QUICK: dict = {
    "dataset": shapes_dataset(16),
    "configs": [SETTINGS["configs"][0], SETTINGS["configs"][1]],
    "warmup_requests": 8,
    "closed_loop": {"concurrency": [1, 8], "duration_s": 5.0, "max_requests": 500},
    "open_loop": {"rates": [10.0], "duration_s": 5.0, "max_requests": 100},
    "drain_s": 15.0,
}
# --overhead: the gateway's own cost at 300 req/s. CPU workers on the bundled model top out well
# below that (results/serving_load_cpu.json), so the worker serves the tiny random LLaVA the tests
# build (real weights files, real quantizer, real generate): compute is near-zero by design, and
# overhead excludes compute and queue wait anyway. Its answers are noise (accuracy means nothing).
OVERHEAD: dict = {
    "benchmark": "serving_overhead",
    "model": "llava-tiny",
    "tiny_model": {"builder": "tests.conftest.build_tiny_model_dir", "quantizer": "preln-16"},
    "dataset": shapes_dataset(32),
    "max_new_tokens": 2,
    "client": "raw",
    "configs": [{"name": "tiny-b32", "workers": 1, "max_batch": 32, "max_wait_ms": 5}],
    "warmup_requests": 64,
    "closed_loop": {"concurrency": [1], "duration_s": 10.0, "max_requests": 2000},
    "open_loop": {"rates": [100.0, 200.0, 300.0], "duration_s": 20.0, "max_requests": 8000},
}
OVERHEAD_NOTE = (
    " Overhead mode: the worker runs the tests' tiny random LLaVA (tests/conftest.py), so compute is "
    "near-zero by design and the worker keeps up at 300 req/s with batching on; answers are noise "
    "(accuracy is meaningless). Overhead = latency - queue_ms - compute_ms as above: it excludes "
    "compute and the queue wait (batch fill included) and counts everything else (client, HTTP, "
    "gateway validation, Redis round trips, reply delivery, the worker's per-entry decode and "
    "finish, and any CPU contention between the processes). As in every serving_load run the "
    "gateway is anonymous with no rate limit, so no API-key check is counted. versions lists uvloop, "
    "httptools and hiredis when installed (uvicorn and redis-py use them if present)."
)


# ---- CPU use per process ----------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process from Linux's /proc; None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used per role during a run, in cores (1.0 = one core busy): on a shared 2-core machine
    this shows which process the latency is waiting behind, the load generator included."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.start = self.snapshot()

    def restart(self) -> None:
        self.start = self.snapshot()

    def snapshot(self) -> dict[str, float]:
        used = {role: sum(cpu_seconds(p) or 0.0 for p in pids) for role, pids in self.pids.items()}
        return used | {"load_generator": time.process_time(), "wall": time.perf_counter()}

    def cores(self) -> dict[str, float]:
        """Cores used per role since the last :meth:`restart` (or construction)."""
        now = self.snapshot()
        wall = max(now["wall"] - self.start["wall"], 1e-9)
        return {role: round((now[role] - self.start[role]) / wall, 3) for role in now if role != "wall"}


def build_tiny_model(directory: Path, builder: str) -> Path:
    """The tests' tiny model directory, built in a child process: its k-means, torch threads and the
    test module's environment defaults stay out of the load generator."""
    module, _, function = builder.rpartition(".")
    code = f"import sys, pathlib, {module} as m; m.{function}(pathlib.Path(sys.argv[1]))"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(directory)], cwd=repo, check=True, timeout=300)
    return directory


# ---- load generator ----------------------------------------------------------------------------
@dataclass
class Record:
    ok: bool
    latency_ms: float  # closed loop: from the send; open loop: from the scheduled arrival
    latency_from_send_ms: float  # from the socket write (RawClient) or just before the httpx call
    status: int | str = 200
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    correct: bool = False


@dataclass(frozen=True)
class RawResponse:
    """The part of ``httpx.Response`` that :class:`Loader` reads, plus ``sent_at``: the
    ``perf_counter`` time the request was handed to the socket (a write the kernel takes at once)."""

    status_code: int
    content: bytes
    sent_at: float | None = None

    def json(self) -> object:
        return json.loads(self.content)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client with httpx's ``post`` signature, for the load generator.

    httpx spends milliseconds of CPU per request; at 300 req/s that is most of a core taken from
    the gateway it measures (and its generator falls behind schedule). This writes one prebuilt
    request and reads one ``Content-Length`` response per pooled connection, nothing else. Failures
    raise httpx's transport errors, so :class:`Loader` treats both clients alike.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        address = httpx.URL(base_url)
        self.host, self.port, self.timeout = address.host, address.port or 80, timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()

    async def post(self, path: str, *, content: bytes, headers: dict[str, str]) -> RawResponse:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(content)}"]
        request = "\r\n".join([*lines, *(f"{k}: {v}" for k, v in headers.items()), "", ""]).encode() + content
        try:
            async with asyncio.timeout(self.timeout):
                # A pooled connection the server closed while idle (uvicorn: after 5 s) fails before
                # any byte of a response arrives; the request goes again on the next connection
                # (a request id is answered once however often it is sent).
                while self._idle:
                    try:
                        return await self._exchange(self._idle.pop(), request)
                    except (ConnectionError, asyncio.IncompleteReadError) as exc:
                        if getattr(exc, "partial", b""):
                            raise
                connection = await asyncio.open_connection(self.host, self.port)
                return await self._exchange(connection, request)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no response within {self.timeout} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> RawResponse:
        reader, writer = connection
        try:
            sent_at = time.perf_counter()
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
            status = int(head[0].split()[1])
            fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            body = await reader.readexactly(int(fields["content-length"]))
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").strip() == "close":
            writer.close()
        else:
            self._idle.append(connection)
        return RawResponse(status, body, sent_at)


class Loader:
    def __init__(self, client: httpx.AsyncClient, items: list[Item], seed: int) -> None:
        self.client = client
        self.items = items
        self.rng = random.Random(seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0

    async def one(self, started: float | None = None) -> Record:
        """Send one request; latency from ``started`` (a scheduled arrival) or from the send, and
        always also from the moment the request was written to the socket."""
        item = self.items[self.rng.randrange(len(self.items))]
        self.count += 1
        body = pack(item.fields, f"{self.run_id}-{self.count}")
        t0 = time.perf_counter()
        started = t0 if started is None else started
        try:
            response = await self.client.post(
                "/v1/vqa", content=body, headers={"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
            )
        except httpx.TransportError as exc:
            now = time.perf_counter()
            return Record(False, (now - started) * 1e3, (now - t0) * 1e3, type(exc).__name__)
        now = time.perf_counter()
        sent_at = getattr(response, "sent_at", None) or t0  # httpx: just before the call
        latency, from_send = (now - started) * 1e3, (now - sent_at) * 1e3
        if response.status_code != 200:
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            return Record(False, latency, from_send, f"{response.status_code}:{code}")
        reply = msgpack.unpackb(response.content, raw=False)
        return Record(
            True,
            latency,
            from_send,
            queue_ms=float(reply["queue_ms"]),
            compute_ms=float(reply["compute_ms"]),
            batch_size=int(reply["batch_size"]),
            correct=normalize(reply["answer"]) == item.truth,
        )

    async def closed(
        self, concurrency: int, duration_s: float, max_requests: int
    ) -> tuple[list[Record], float]:
        records: list[Record] = []
        start = time.perf_counter()
        deadline = start + duration_s
        budget = [max_requests]

        async def client() -> None:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                records.append(await self.one())

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return records, time.perf_counter() - start

    async def open(
        self, rate: float, duration_s: float, max_requests: int, drain_s: float
    ) -> tuple[list[Record], float, dict]:
        """Poisson arrivals for ``duration_s`` (at most ``max_requests``); returns (records, elapsed,
        {send window s, offered req/s, p99 lag of the generator behind its schedule ms})."""
        tasks: list[asyncio.Task] = []
        lags: list[float] = []
        start = time.perf_counter()
        at = start
        for _ in range(max_requests):
            at += self.rng.expovariate(rate)
            if at - start > duration_s:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - at) * 1e3)
            tasks.append(asyncio.create_task(self.one(started=at)))
        window = time.perf_counter() - start
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        records = [t.result() for t in tasks if t in done]
        records += [Record(False, drain_s * 1e3, drain_s * 1e3, "unfinished")] * len(pending)
        sent = {
            "send_window_s": round(window, 2),
            "offered_req_per_s": round(len(tasks) / window, 2) if window > 0 else 0.0,
            "generator_lag_p50_ms": round(percentile(lags, 50), 2) if lags else None,
            "generator_lag_p99_ms": round(percentile(lags, 99), 2) if lags else None,
        }
        return records, time.perf_counter() - start, sent


# ---- summaries -----------------------------------------------------------------------------------
def summarize(records: list[Record], elapsed_s: float) -> dict:
    ok = [r for r in records if r.ok]
    sizes = Counter(r.batch_size for r in ok)
    overhead = [r.latency_ms - r.queue_ms - r.compute_ms for r in ok]
    overhead_from_send = [r.latency_from_send_ms - r.queue_ms - r.compute_ms for r in ok]
    return {
        "sent": len(records),
        "answered": len(ok),
        "errored": len(records) - len(ok),
        "errors": dict(Counter(str(r.status) for r in records if not r.ok)),
        "elapsed_s": round(elapsed_s, 2),
        "req_per_s": round(len(ok) / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "latency_ms": dist([r.latency_ms for r in ok]),
        "queue_ms": dist([r.queue_ms for r in ok]),
        "compute_ms": dist([r.compute_ms for r in ok]),
        "overhead_ms": dist(overhead),
        "latency_from_send_ms": dist([r.latency_from_send_ms for r in ok]),
        "overhead_from_send_ms": dist(overhead_from_send),
        "batch_size_hist": {str(k): sizes[k] for k in sorted(sizes)},
        "batch_size_mean": round(statistics.fmean(r.batch_size for r in ok), 2) if ok else None,
        # A request's compute_ms is its whole batch's; per answer it is compute_ms / batch_size.
        "compute_ms_per_answer": dist([r.compute_ms / r.batch_size for r in ok if r.batch_size]),
        "accuracy": round(sum(r.correct for r in ok) / len(ok), 4) if ok else None,
    }


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection in the load generator during a run: a full collection of its heap
    (torch arrives with models.data) takes far longer than the overhead measured, and every request
    in flight would count it as latency from its scheduled arrival. Collected and frozen before,
    re-enabled after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def measure(
    url: str, items: list[Item], config: dict, settings: dict, seed: int, meter: CpuMeter | None = None
) -> list[dict]:
    """Every closed- then open-loop load of ``settings`` against one worker configuration; with a
    ``meter``, each run also records the cores each process used (``cpu_cores``)."""
    closed, opened = settings["closed_loop"], settings["open_loop"]
    connections = max([*closed["concurrency"], 64])
    limits = httpx.Limits(max_connections=connections * 4, max_keepalive_connections=connections)
    timeout = httpx.Timeout(settings["client_timeout_s"], connect=5.0)
    runs = []
    if settings.get("client") == "raw":
        opened_client = RawClient(url, settings["client_timeout_s"])
    else:
        opened_client = httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False)
    async with opened_client as client:
        loader = Loader(client, items, seed)
        warm = settings["warmup_requests"]
        await loader.closed(min(warm, 8), settings["client_timeout_s"], warm)  # first batches are slow
        for c in closed["concurrency"]:
            load_before = os.getloadavg()[0]
            if meter:
                meter.restart()
            with gc_paused():
                records, elapsed = await loader.closed(c, closed["duration_s"], closed["max_requests"])
            runs.append(
                {**config, "mode": "closed", "concurrency": c, "loadavg_1m_before": round(load_before, 2)}
                | summarize(records, elapsed)
                | ({"cpu_cores": meter.cores()} if meter else {})
            )
            print_row(runs[-1])
        for rate in opened["rates"]:
            load_before = os.getloadavg()[0]
            if meter:
                meter.restart()
            with gc_paused():
                records, elapsed, sent = await loader.open(
                    rate, opened["duration_s"], opened["max_requests"], settings["drain_s"]
                )
            runs.append(
                {**config, "mode": "open", "rate": rate, "loadavg_1m_before": round(load_before, 2)}
                | summarize(records, elapsed)
                | sent
                | ({"cpu_cores": meter.cores()} if meter else {})
            )
            print_row(runs[-1])
    return runs


# ---- output ------------------------------------------------------------------------------------
COLUMNS = (
    ("config", 7), ("load", 6), ("ld1m", 5), ("sent", 5), ("ok", 5), ("err", 4), ("req/s", 6), ("p50", 6),
    ("p95", 6), ("p99", 6), ("queue50", 7), ("comp50", 6), ("comp/ans", 8), ("batch", 5), ("ovh50", 6),
    ("ovh99", 6), ("acc", 6),
)  # fmt: skip


def table_header() -> str:
    return " ".join(f"{name:>{width}}" for name, width in COLUMNS)


def row(run: dict) -> str:
    load = f"C={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate']:g}/s"
    cells = (
        run["name"], load, f"{run['loadavg_1m_before']:.1f}", run["sent"], run["answered"], run["errored"],
        fmt(run["req_per_s"], 1), *(fmt(run["latency_ms"][q], 0) for q in ("p50", "p95", "p99")),
        fmt(run["queue_ms"]["p50"], 0), fmt(run["compute_ms"]["p50"], 0),
        fmt(run["compute_ms_per_answer"]["p50"], 1), fmt(run["batch_size_mean"], 1),
        fmt(run["overhead_ms"]["p50"], 1), fmt(run["overhead_ms"]["p99"], 0), fmt(run["accuracy"], 3),
    )  # fmt: skip
    return " ".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_row(run: dict) -> None:
    print(f"  .. {row(run)}", flush=True)


CPU_COLUMNS = (
    ("config", 8), ("load", 6), ("ovh50", 6), ("ovh95", 6), ("ovh99", 6), ("snd50", 6), ("snd99", 6),
    ("lag50", 6), ("lag99", 6), ("gateway", 7), ("worker", 7), ("redis", 6), ("loadgen", 7),
)  # fmt: skip


def cpu_table(runs: list[dict]) -> str:
    """Overhead (from the schedule, and from the send: snd), the generator's lag behind its schedule
    and the cores each process used."""
    lines = [" ".join(f"{name:>{width}}" for name, width in CPU_COLUMNS)]
    for run in runs:
        load = f"C={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate']:g}/s"
        cores = run.get("cpu_cores", {})
        cells = (
            run["name"], load, *(fmt(run["overhead_ms"][q], 1) for q in ("p50", "p95", "p99")),
            *(fmt(run["overhead_from_send_ms"][q], 1) for q in ("p50", "p99")),
            fmt(run.get("generator_lag_p50_ms"), 1), fmt(run.get("generator_lag_p99_ms"), 1),
            *(fmt(cores.get(role), 2) for role in ("gateway", "worker", "redis", "load_generator")),
        )  # fmt: skip
        pairs = zip(cells, CPU_COLUMNS, strict=True)
        lines.append(" ".join(f"{cell!s:>{width}}" for cell, (_, width) in pairs))
    return "\n".join(lines)


def redis_timer_probe(url: str, prefix: str) -> dict:
    """Redis's ``hz`` and how long ``XREADGROUP ... BLOCK 10`` really blocks on an empty stream:
    Redis wakes blocked clients on timeout only at its cron ticks (1000/hz ms apart), which bounds
    how finely a worker's VQA_MAX_WAIT_MS can act."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    key = f"{prefix}:timer-probe"
    try:
        try:
            hz = int(client.config_get("hz").get("hz", 0))
        except redis.RedisError:
            hz = None
        client.xgroup_create(key, "probe", id="$", mkstream=True)
        blocked = []
        for _ in range(10):
            t0 = time.perf_counter()
            client.xreadgroup("probe", "probe", {key: ">"}, count=1, block=10)
            blocked.append((time.perf_counter() - t0) * 1e3)
        return {"hz": hz, "block_10ms_observed_ms": dist(blocked)}
    except redis.RedisError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.delete(key)
        client.close()


# ---- main --------------------------------------------------------------------------------------
def run(settings: dict, out: Path) -> dict:
    started = time.monotonic()
    cpus = usable_cpus()
    result = header(settings.get("benchmark", "serving_load"))
    result["versions"]["redis_server"] = redis_version(settings["redis_url"])
    result |= {
        "settings": settings,
        "notes": (
            "latency is client-side (closed loop: from send; open loop: from the scheduled Poisson "
            "arrival). queue_ms: gateway enqueue -> worker batch start (includes the batch-fill wait). "
            "compute_ms: the whole batch's generate call. overhead = latency - queue_ms - compute_ms. "
            "latency_from_send_ms / overhead_from_send_ms: the same counted from the moment the "
            "request was written to its socket (the raw client stamps the write; with httpx, just "
            "before the call), in both modes: in open loop they leave out the load generator's own "
            "lag behind its schedule (timer lateness, task start, request build; generator_lag_* "
            "covers only the timer part), which latency_ms and overhead_ms keep. "
            "Load generator, gateway, Redis and workers share the machine's CPUs; other jobs may too "
            "(see loadavg_*); cpu_cores: cores each process used during the run (load_generator "
            "is this script)." + (OVERHEAD_NOTE if "tiny_model" in settings else "")
        ),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="serving-load-") as tmp:
        workdir = Path(tmp)
        stack = Stack(settings["redis_url"], settings["model"], workdir)
        if "tiny_model" in settings:
            tiny = settings["tiny_model"]
            stack.model_dir = build_tiny_model(workdir / settings["model"], tiny["builder"])
            stack.quantizer = tiny["quantizer"]
        try:
            result["redis_timer"] = redis_timer_probe(stack.redis_url, stack.prefix)
            print(f"redis timer: {json.dumps(result['redis_timer'])}", flush=True)
            stack.start_gateway(settings["startup_timeout_s"])
            items: list[Item] = []
            for i, config in enumerate(settings["configs"]):
                threads = settings["torch_threads"]
                threads = max(1, cpus // config["workers"]) if threads == "auto" else int(threads)
                t0 = time.monotonic()
                stack.start_workers(
                    config["workers"],
                    config["max_batch"],
                    config["max_wait_ms"],
                    threads,
                    settings["startup_timeout_s"],
                )
                if not items:
                    items, result["payload"] = build_items(stack.url, settings, workdir / "cache")
                    print(f"payload: {json.dumps(result['payload'])}", flush=True)
                    print(table_header(), flush=True)
                print(f"{config['name']}: {config['workers']} worker(s) x {threads} thread(s) up in "
                      f"{time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
                config = {**config, "torch_threads": threads}
                meter = CpuMeter(stack.pids())
                result["runs"] += asyncio.run(measure(stack.url, items, config, settings, 1000 + i, meter))
                # Entries the drain gave up on would run under the next config: wait until the
                # workers have answered or expired them (timeout_ms bounds this).
                timeout = settings["request_timeout_ms"] / 1000 + 10
                stack.wait(lambda: stack.backlog() == 0, timeout, "an empty stream")
                stack.stop_workers()
                stack.wait(lambda: stack.live_workers() == 0, settings["startup_timeout_s"], "0 live workers")
        except BaseException:
            print(stack.log_tail(), file=sys.stderr)
            raise
        finally:
            stack.stop()
    return write_result(result, out, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 configs, shorter and fewer loads")
    parser.add_argument("--configs", help="comma-separated config names to keep (default: all)")
    parser.add_argument("--duration", type=float, help="seconds per run (closed and open loop)")
    parser.add_argument(
        "--overhead", action="store_true", help="gateway overhead at 100-300 req/s on the tiny model"
    )
    parser.add_argument("--rates", help="comma-separated open-loop rates (req/s) instead of the defaults")
    parser.add_argument("--out", type=Path, help="default: results/serving_{load,overhead}_cpu.json")
    args = parser.parse_args()
    base = {**SETTINGS, **OVERHEAD} if args.overhead else SETTINGS
    settings = {**base, **(QUICK if args.quick and not args.overhead else {})}
    out = args.out or RESULTS / ("serving_overhead_cpu.json" if args.overhead else "serving_load_cpu.json")
    if args.configs:
        keep = args.configs.split(",")
        settings["configs"] = [c for c in base["configs"] if c["name"] in keep]
        if not settings["configs"]:
            raise SystemExit(f"no config named {keep}; known: {[c['name'] for c in base['configs']]}")
    if args.rates:
        settings["open_loop"] = {**settings["open_loop"], "rates": [float(r) for r in args.rates.split(",")]}
    if args.duration:
        for key in ("closed_loop", "open_loop"):
            settings[key] = {**settings[key], "duration_s": args.duration}
    # SIGTERM ends the script like Ctrl-C does, so the finally block stops every subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(settings, out)

    print(f"\n{describe(result)}")
    print("latency/queue/compute/overhead in ms; comp/ans = compute_ms / batch_size; batch = mean batch size")
    print(table_header())
    for run_ in result["runs"]:
        print(row(run_))
    print(
        "\noverhead (ms; snd: from the socket write), load generator lag behind its Poisson schedule (ms), "
        "CPU cores used per process"
    )
    print(cpu_table(result["runs"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
