"""Fault injection: does every request get exactly one final answer while parts of the stack fail?

    .venv/bin/python -m benchmarks.fault_injection            # full run, ~5 min on 2 cores
    .venv/bin/python -m benchmarks.fault_injection --out /tmp/faults.json

Starts its own ``redis-server`` (127.0.0.1, a free port, AOF with ``appendfsync always`` in a
temporary directory), one ``vqa-gateway`` (anonymous, short ``VQA_CLAIM_IDLE_MS``) and two
``vqa-worker --device cpu`` processes (``benchmarks.harness.stack.own_stack``). Open-loop Poisson
load runs throughout (``benchmarks.harness.retrying``); every logical request has one request id
and is retried with that same id, like :class:`edge_client.EdgeClient`, on connection errors,
timeouts and 429/502/503/504 (``Retry-After`` honoured, bounded exponential backoff, an overall
budget).

Faults, one after another, each followed by a recovery period (a request belongs to the phase in
which it was first sent): baseline; SIGKILL a worker (restarted a few seconds later); restart Redis
(SIGTERM, wait, start again on the same port and AOF directory); SIGKILL the gateway and start it
again on the same port; SIGSTOP a worker for longer than ``VQA_CLAIM_IDLE_MS``, then SIGCONT.

Per phase and in total: requests sent, answered (one final 200 per request id), errored (final
explicit error reply, by code), lost (neither by the end of the drain: must be 0), retries, latency
p50/p99 from the first send. After the drain every answered request is sent once more with the
same id: the gateway must return the same answer from its result store, and the workers' counters
(sampled from their heartbeats) must not move. Duplicate computations: answers computed by the
workers minus distinct answered ids (a lower bound: a SIGKILLed worker's last heartbeat is up to
VQA_HEARTBEAT_TTL_S / 3 old). Raw JSON goes to results/fault_injection.json; one table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from benchmarks.harness.payloads import Item, build_items, shapes_dataset
from benchmarks.harness.record import RESULTS, describe, header, write_result
from benchmarks.harness.retrying import Load, summarize_outcomes
from benchmarks.harness.stack import RedisServer, Stack, own_stack, redis_version

# ---- settings ---------------------------------------------------------------------------------
SETTINGS: dict = {
    "model": "llava-mini-shapes",
    "dataset": shapes_dataset(16),
    "max_new_tokens": 8,
    "workers": 2,
    "torch_threads": 1,
    "max_batch": 16,
    "max_wait_ms": 10,
    "claim_idle_ms": 3000,  # VQA_CLAIM_IDLE_MS: a stopped worker's entries move after ~3-4 s
    "request_timeout_ms": 60000,  # VQA_REQUEST_TIMEOUT_MS and each request's timeout_ms
    "max_deliveries": 3,  # VQA_MAX_DELIVERIES (the default)
    "rate": 8.0,  # open-loop Poisson arrivals per second, for the whole schedule
    "max_requests": 2000,
    # Client behaviour (like EdgeClient): retry the same body on these, within an overall budget.
    "client": {
        "attempt_timeout_s": 65.0,  # per HTTP attempt: above timeout_ms, so the gateway's 504 comes first
        "connect_timeout_s": 2.0,
        "budget_s": 90.0,  # per logical request, from its first send
        "backoff_s": 0.25,
        "max_backoff_s": 4.0,
    },
    # Phases in order: (name, fault, seconds of the phase including the fault and its recovery).
    "phases": [
        {"name": "baseline", "fault": None, "duration_s": 15.0},
        {
            "name": "kill_worker",
            "fault": "kill_worker",
            "duration_s": 30.0,
            "down_s": 4.0,
            "catch_pending_s": 5.0,
        },  # kill it while it holds unacknowledged entries (if seen within 5 s)
        {"name": "restart_redis", "fault": "restart_redis", "duration_s": 30.0, "down_s": 3.0},
        {"name": "restart_gateway", "fault": "restart_gateway", "duration_s": 25.0, "down_s": 0.0},
        {"name": "slow_worker", "fault": "slow_worker", "duration_s": 30.0, "down_s": 8.0},
    ],
    "fault_offset_s": 2.0,  # a phase's fault comes this long after the phase starts
    "drain_s": 95.0,  # after the last send: outstanding requests may still finish (> budget_s)
    "startup_timeout_s": 90.0,
    "replay_concurrency": 16,
}


# ---- worker counters ----------------------------------------------------------------------------
class StatsSampler(threading.Thread):
    """Reads every worker's heartbeat (its counters) once a second; keeps the latest per worker."""

    def __init__(self, url: str, prefix: str, model: str) -> None:
        super().__init__(name="stats-sampler", daemon=True)
        self.url, self.pattern = url, f"{prefix}:heartbeat:{model}:*"
        self.latest: dict[str, dict] = {}
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def sample(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            for key in client.scan_iter(match=self.pattern, count=100):
                raw = client.get(key)
                if raw:
                    status = json.loads(raw)
                    with self.lock:
                        self.latest[status["worker"]] = status
        except redis.RedisError:
            pass  # Redis is down (a fault): the next sample catches up
        finally:
            client.close()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            self.sample()

    def totals(self) -> dict:
        with self.lock:
            stats = list(self.latest.values())
        keys = ("batches", "answered", "rejected", "expired", "failed")
        return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys} | {"workers_seen": len(stats)}


# ---- the faults -----------------------------------------------------------------------------------
class Faults:
    """Runs the phase schedule in its own thread (blocking waits), recording a timeline."""

    def __init__(
        self, stack: Stack, redis_server: RedisServer, load: Load, settings: dict, clock: Callable[[], float]
    ) -> None:
        self.stack, self.redis, self.load, self.settings, self.clock = (
            stack,
            redis_server,
            load,
            settings,
            clock,
        )
        self.timeline: list[dict] = []
        self.error: BaseException | None = None

    def mark(self, phase: str, event: str, **info) -> None:
        entry = {"t_s": round(self.clock(), 2), "phase": phase, "event": event, **info}
        self.timeline.append(entry)
        print(f"  [{entry['t_s']:7.2f} s] {phase}: {event} {json.dumps(info) if info else ''}", flush=True)

    def sleep_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.clock()))

    def run(self) -> None:
        try:
            for phase in self.settings["phases"]:
                start = self.clock()
                self.load.phase = phase["name"]
                self.mark(phase["name"], "phase_start")
                if phase["fault"]:
                    self.sleep_until(start + self.settings["fault_offset_s"])
                    getattr(self, phase["fault"])(phase)
                self.sleep_until(start + phase["duration_s"])
            self.mark("end", "sending_stops")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            self.mark("error", "fault_driver_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.load.stop_sending = True

    def kill_worker(self, phase: dict) -> None:
        victim = self.stack.workers[0]
        pending = self.wait_pending(victim.pid, phase["catch_pending_s"])
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.stack.workers.remove(victim)
        self.mark(
            phase["name"], "injected", what="SIGKILL worker", pid=victim.pid, its_pending_entries=pending
        )
        time.sleep(phase["down_s"])
        worker = self.stack.spawn_worker(
            self.settings["max_batch"], self.settings["max_wait_ms"], self.settings["torch_threads"]
        )
        self.mark(phase["name"], "recovered", what="worker restarted", pid=worker.pid)
        t0 = time.monotonic()
        self.wait_workers(worker)
        self.mark(phase["name"], "worker_ready", after_s=round(time.monotonic() - t0, 2))

    def wait_pending(self, pid: int, timeout: float) -> int:
        """Poll (every few ms, at most ``timeout`` s) until the worker with ``pid`` holds an entry it
        has not acknowledged yet (mid-batch), so the kill leaves work to be claimed; its count."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        stream = f"{self.stack.prefix}:stream:{self.stack.model}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                summary = client.xpending(stream, "workers")
                for consumer in summary.get("consumers") or []:
                    name = (
                        consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
                    )
                    if f"-{pid}-" in name and int(consumer["pending"]) > 0:
                        return int(consumer["pending"])
                time.sleep(0.003)
            return 0
        finally:
            client.close()

    def wait_workers(self, worker: subprocess.Popen) -> None:
        """Until the new worker's heartbeat appears (its pid in a heartbeat key)."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        pattern = f"{self.stack.prefix}:heartbeat:{self.stack.model}:*-{worker.pid}-*"
        try:
            self.stack.wait(
                lambda: bool(list(client.scan_iter(match=pattern))), 90, "the new worker's heartbeat"
            )
        finally:
            client.close()

    def restart_redis(self, phase: dict) -> None:
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            backlog = client.xlen(f"{self.stack.prefix}:stream:{self.stack.model}")
        finally:
            client.close()
        self.redis.stop()
        self.mark(phase["name"], "injected", what="redis SIGTERM", stream_len_before=backlog)
        time.sleep(phase["down_s"])
        self.redis.start()
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            backlog_after = client.xlen(f"{self.stack.prefix}:stream:{self.stack.model}")
            groups = len(client.xinfo_groups(f"{self.stack.prefix}:stream:{self.stack.model}"))
        except redis.RedisError as exc:
            backlog_after, groups = f"{type(exc).__name__}: {exc}", None
        finally:
            client.close()
        self.mark(phase["name"], "recovered", what="redis started (same port, same AOF dir)",
                  stream_len_after=backlog_after, consumer_groups=groups)  # fmt: skip

    def restart_gateway(self, phase: dict) -> None:
        old = self.stack.gateway
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        self.mark(phase["name"], "injected", what="SIGKILL gateway", pid=old.pid)
        time.sleep(phase["down_s"])
        self.stack.start_gateway(self.settings["startup_timeout_s"])
        self.mark(
            phase["name"], "recovered", what="gateway restarted (same port)", pid=self.stack.gateway.pid
        )
        self.stack.wait(lambda: self.stack.status("/readyz") == 200, 30, "gateway /readyz")
        self.mark(phase["name"], "gateway_ready")

    def slow_worker(self, phase: dict) -> None:
        victim = self.stack.workers[-1]
        victim.send_signal(signal.SIGSTOP)
        self.mark(phase["name"], "injected", what="SIGSTOP worker", pid=victim.pid, seconds=phase["down_s"])
        time.sleep(phase["down_s"])
        victim.send_signal(signal.SIGCONT)
        self.mark(phase["name"], "recovered", what="SIGCONT worker", pid=victim.pid)


# ---- output -------------------------------------------------------------------------------------
COLUMNS = (("fault", 16), ("requests", 8), ("answered", 8), ("errored", 7), ("lost", 5), ("retries", 7),
           ("p50 ms", 8), ("p99 ms", 8), ("errors", 30))  # fmt: skip


def table(phases: dict) -> str:
    lines = [" ".join(f"{n:>{w}}" for n, w in COLUMNS)]
    for name, s in phases.items():
        cells = (name, s["requests"], s["answered"], s["errored"], s["lost"], s["retries"],
                 s["latency_ms"]["p50"], s["latency_ms"]["p99"],
                 json.dumps(s["errors"]) if s["errors"] else "-")  # fmt: skip
        lines.append(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------
def run(settings: dict, out: Path) -> dict:
    started = time.monotonic()
    result = header("fault_injection") | {"settings": settings}
    extra_env = {
        "VQA_CLAIM_IDLE_MS": str(settings["claim_idle_ms"]),
        "VQA_MAX_TIMEOUT_MS": str(max(120000, settings["request_timeout_ms"])),
        "VQA_MAX_DELIVERIES": str(settings["max_deliveries"]),
        "VQA_RESULT_TTL_S": "600",
    }
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as tmp:
        workdir = Path(tmp)
        try:
            with own_stack(settings, workdir, "fi", extra_env) as (redis_server, stack):
                result["versions"]["redis_server"] = redis_version(redis_server.url)
                items, result["payload"] = build_items(stack.url, settings, workdir / "cache")
                print(f"stack up in {time.monotonic() - started:.1f} s: redis :{redis_server.port}, gateway "
                      f"{stack.url}, {settings['workers']} workers; {len(items)} payloads",
                      flush=True)  # fmt: skip
                result |= inject(stack, redis_server, items, settings)
        finally:
            result["logs_tail"] = {
                p.name: p.read_text(errors="replace")[-1500:] for p in sorted(workdir.glob("*.log"))
            }
    return write_result(result, out, started)


def inject(stack: Stack, redis_server: RedisServer, items: list[Item], settings: dict) -> dict:
    """The load with its fault schedule, the drain and the replay; the result's sections."""
    sampler = StatsSampler(redis_server.url, stack.prefix, settings["model"])
    sampler.start()
    try:
        t0 = time.monotonic()
        clock = lambda: time.monotonic() - t0  # noqa: E731
        load = Load(stack.url, items, settings, clock)
        faults = Faults(stack, redis_server, load, settings, clock)
        driver = threading.Thread(target=faults.run, name="faults", daemon=True)
        driver.start()
        drain = asyncio.run(load.run())
        driver.join(60)
        faults.mark("end", "drained", **drain)
        sampler.sample()
        before_replay = sampler.totals()
        replay = asyncio.run(load.replay())
        time.sleep(4)  # a heartbeat (every VQA_HEARTBEAT_TTL_S / 3) after the replay
        sampler.sample()
        after_replay = sampler.totals()
    finally:
        sampler.halt.set()
    faults.mark("end", "replayed", **{k: v for k, v in replay.items() if k != "different_examples"})
    if faults.error is not None:
        raise RuntimeError("the fault driver failed") from faults.error
    phases = {p["name"]: summarize_outcomes([o for o in load.outcomes if o.phase == p["name"]])
              for p in settings["phases"]}  # fmt: skip
    phases["total"] = summarize_outcomes(load.outcomes)
    answered_ids = phases["total"]["answered"]
    return {
        "phases": phases,
        "timeline": faults.timeline,
        "replay": replay,
        "worker_stats": {
            "before_replay": before_replay,
            "after_replay": after_replay,
            "per_worker": sampler.latest,
            # answers computed by workers beyond one per answered id; a lower bound (negative
            # when the SIGKILLed worker's last heartbeat missed answers it computed after it)
            "duplicate_computations_lower_bound": before_replay["answered"] - answered_ids,
            "computed_during_replay": after_replay["answered"] - before_replay["answered"],
        },
        "dead_letters": dead_letters(redis_server.url, stack.prefix, settings["model"]),
        "process_exit_codes": stack.exit_codes(),
    }


def dead_letters(url: str, prefix: str, model: str) -> int | str:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return int(client.xlen(f"{prefix}:dead:{model}"))
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_injection.json")
    args = parser.parse_args()
    # SIGTERM ends the script like Ctrl-C does, so the finally block stops every subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(SETTINGS, args.out)
    print(f"\n{describe(result)}")
    print(
        f"{SETTINGS['rate']:g} req/s open loop; a request counts in the phase it was first sent in; "
        "latency from first send, retries included"
    )
    print(table(result["phases"]))
    ws = result["worker_stats"]
    replay = result["replay"]
    print(f"replay of answered ids: {replay['same_answer']} same, {replay['different_answer']} "
          f"different, failed {replay['failed']}; recomputed during replay: {ws['computed_during_replay']}; "
          f"duplicate computations >= {ws['duplicate_computations_lower_bound']} (lower bound); "
          f"dead letters: {result['dead_letters']}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
