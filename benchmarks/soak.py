"""Soak: does a real stack serve steady load for 30 minutes without losing requests or growing memory?

    .venv/bin/python -m benchmarks.soak --minutes 30          # the full run, ~32 min
    .venv/bin/python -m benchmarks.soak --minutes 0.3 --rate 3 --workers 1 --sample-s 5 \\
        --result-ttl-s 3 --out /tmp/soak.json                 # smoke run, < 1 min

Starts its own ``redis-server`` (a free port), one ``vqa-gateway`` (anonymous) and ``--workers``
``vqa-worker --device cpu`` processes serving the bundled model (``benchmarks.harness.stack.own_stack``,
as ``fault_injection``). Open-loop Poisson arrivals at a fixed rate well under capacity (one CPU
worker's: results/serving_load_cpu.json); every logical request keeps one request id and is retried
with it on retryable errors, EdgeClient-style (``benchmarks.harness.retrying``).

Every ``--sample-s`` seconds: requests sent / answered / errored so far; latency p50/p99 of the
window's requests (by first send, retries included: p99 drift over time); VmRSS of the gateway and
each worker (``/proc/PID/status``); Redis ``INFO memory`` used_memory, the keys under the run's
prefix by kind, and the stream lengths. Stream entries are deleted when acknowledged and result
keys expire after ``VQA_RESULT_TTL_S``, so every one of these must level off rather than grow. After
the drain the script waits until the result keys have expired and counts the keys again.

Raw JSON (machine, versions, date, settings, every sample) goes to results/soak.json, a plot of
p99 / RSS / Redis memory over time to results/soak.png; one table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis

from benchmarks.harness.payloads import Item, build_items, shapes_dataset
from benchmarks.harness.record import RESULTS, describe, header, loadavg, write_result
from benchmarks.harness.retrying import Load, Outcome, summarize_outcomes
from benchmarks.harness.stack import Stack, own_stack, redis_version
from benchmarks.harness.stats import percentile

# ---- settings ---------------------------------------------------------------------------------
SETTINGS: dict = {
    "model": "llava-mini-shapes",
    "dataset": shapes_dataset(16),
    "max_new_tokens": 8,
    "minutes": 30.0,
    "rate": 10.0,  # open-loop Poisson arrivals per second: well under one worker's capacity
    "workers": 2,
    "torch_threads": 1,  # per worker: 2 cores are shared by the workers, gateway, Redis and this script
    "max_batch": 16,
    "max_wait_ms": 10,
    "request_timeout_ms": 30000,  # VQA_REQUEST_TIMEOUT_MS and each request's timeout_ms
    "result_ttl_s": 60,  # VQA_RESULT_TTL_S: result keys level off at about rate x TTL
    "sample_s": 30.0,
    "drift_windows": 5,  # p99 drift: the first vs the last this many windows, pooled
    "client": {
        "attempt_timeout_s": 35.0,  # above timeout_ms, so the gateway's 504 comes first
        "connect_timeout_s": 2.0,
        "budget_s": 60.0,  # per logical request, from its first send
        "backoff_s": 0.25,
        "max_backoff_s": 4.0,
    },
    "drain_s": 65.0,  # after the last send (> budget_s)
    "expiry_slack_s": 30.0,  # after the drain: wait up to result_ttl_s + this for the keys to expire
    "startup_timeout_s": 90.0,
}
MIB = 1024 * 1024


# ---- what one sample reads ----------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    """VmRSS of ``pid`` in MiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def redis_state(client: redis.Redis, prefix: str, model: str) -> dict:
    """used_memory, the run's keys by kind (``{prefix}:<kind>:...``) and the stream lengths."""
    memory = client.info("memory")
    kinds = Counter(key.split(b":")[1].decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000))
    stream = f"{prefix}:stream:{model}"
    return {
        "used_memory_mib": round(memory["used_memory"] / MIB, 3),
        "used_memory_rss_mib": round(memory["used_memory_rss"] / MIB, 2),
        "keys": sum(kinds.values()),
        "keys_by_kind": dict(sorted(kinds.items())),
        "stream_len": client.xlen(stream) if client.exists(stream) else 0,
        "pending": int(client.xpending(stream, "workers")["pending"]) if client.exists(stream) else 0,
        "dead_len": client.xlen(f"{prefix}:dead:{model}"),
    }


def progress(outcomes: list[Outcome]) -> dict:
    finals = Counter(o.final for o in outcomes)
    return {
        "sent": len(outcomes),
        "answered": finals["answered"],
        "errored": finals["errored"],
        "outstanding": finals[None],
    }


class Sampler(threading.Thread):
    """Moves the load to a new window every ``sample_s`` and samples the stack at each boundary;
    stops the load after the last window. Runs beside the asyncio load, in its own thread."""

    def __init__(
        self, stack: Stack, redis_url: str, load: Load, settings: dict, clock: Callable[[], float]
    ) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.stack, self.load, self.settings, self.clock = stack, load, settings, clock
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.windows = max(1, round(settings["minutes"] * 60 / settings["sample_s"]))
        self.samples: list[dict] = []
        self.error: BaseException | None = None

    def take(self, label: str) -> dict:
        workers = {f"worker-{i}": rss_mib(w.pid) for i, w in enumerate(self.stack.workers)}
        return {
            "label": label,
            "t_s": round(self.clock(), 2),
            "loadavg_1m": loadavg()[0],
            **progress(list(self.load.outcomes)),
            "rss_mib": {"gateway": rss_mib(self.stack.gateway.pid), **workers},
            "redis": redis_state(self.client, self.stack.prefix, self.stack.model),
        }

    def run(self) -> None:
        try:
            self.load.phase = window_label(0)
            for i in range(self.windows):
                time.sleep(max(0.0, (i + 1) * self.settings["sample_s"] - self.clock()))
                if i == self.windows - 1:
                    self.load.stop_sending = True
                else:
                    self.load.phase = window_label(i + 1)
                self.samples.append(self.take(window_label(i)))
                print_sample(self.samples[-1], self.load.outcomes)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.load.stop_sending = True


def window_label(i: int) -> str:
    return f"w{i:03d}"


def wait_for_expiry(take: Callable[[str], dict], timeout_s: float) -> dict:
    """Sample until no result key is left (they expire after VQA_RESULT_TTL_S) or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        sample = take("after_expiry")
        if "result" not in sample["redis"]["keys_by_kind"] or time.monotonic() > deadline:
            return sample
        time.sleep(2.0)


# ---- summaries ----------------------------------------------------------------------------------
def with_window_stats(samples: list[dict], outcomes: list[Outcome]) -> list[dict]:
    """Each window sample gets the final outcome of the requests first sent in that window."""
    by_window: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_window.setdefault(o.phase, []).append(o)
    return [s | {"window": window_stats(by_window.get(s["label"], []))} for s in samples]


def window_stats(outcomes: list[Outcome]) -> dict:
    total = summarize_outcomes(outcomes)
    keep = ("requests", "answered", "errored", "lost", "retries", "errors")
    return {k: total[k] for k in keep} | {
        "p50_ms": total["latency_ms"]["p50"],
        "p99_ms": total["latency_ms"]["p99"],
    }


def growth(series: list[float | None]) -> dict:
    """First, last, max, last - first and last - middle of a sampled quantity (MiB): warm-up shows
    in ``growth``, a leak also in ``second_half_growth``."""
    values = [v for v in series if v is not None]
    if not values:
        return {"first": None, "last": None, "max": None, "growth": None, "second_half_growth": None}
    return {
        "first": values[0],
        "last": values[-1],
        "max": max(values),
        "growth": round(values[-1] - values[0], 3),
        "second_half_growth": round(values[-1] - values[len(values) // 2], 3),
    }


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def pooled_p99(outcomes: list[Outcome], labels: set[str]) -> float | None:
    latencies = [o.latency_ms for o in outcomes if o.phase in labels and o.final == "answered"]
    return round(percentile(latencies, 99), 1) if latencies else None


def summary(samples: list[dict], outcomes: list[Outcome], after: dict, settings: dict) -> dict:
    total = summarize_outcomes(outcomes)
    n = min(settings["drift_windows"], max(1, len(samples) // 2))
    first, last = {s["label"] for s in samples[:n]}, {s["label"] for s in samples[-n:]}
    processes = samples[0]["rss_mib"].keys()
    return {
        "sent": total["requests"],
        "answered": total["answered"],
        "errored": total["errored"],
        "lost": total["lost"],
        "error_rate": round(total["errored"] / total["requests"], 6) if total["requests"] else None,
        "errors": total["errors"],
        "lost_ids": total["lost_ids"],
        "retries": total["retries"],
        "retry_causes": total["retry_causes"],
        "ids_with_two_answers": total["ids_with_two_answers"],
        "latency_ms": total["latency_ms"],
        "p99_drift_ms": {
            "windows": n,
            "first": pooled_p99(outcomes, first),
            "last": pooled_p99(outcomes, last),
            "first_window": samples[0]["window"]["p99_ms"],
            "last_window": samples[-1]["window"]["p99_ms"],
            "window_p99_median": median([s["window"]["p99_ms"] for s in samples]),
        },
        "rss_mib": {name: growth([s["rss_mib"].get(name) for s in samples]) for name in processes},
        "redis_used_memory_mib": growth([s["redis"]["used_memory_mib"] for s in samples]),
        "redis_keys": {
            "first_sample": samples[0]["redis"]["keys"],
            "max": max(s["redis"]["keys"] for s in samples),
            "last_sample": samples[-1]["redis"]["keys"],
            "after_expiry": after["redis"]["keys"],
            "after_expiry_by_kind": after["redis"]["keys_by_kind"],
        },
        "stream_len_max": max(s["redis"]["stream_len"] for s in samples),
        "stream_len_after": after["redis"]["stream_len"],
        "dead_letters": after["redis"]["dead_len"],
    }


# ---- output -------------------------------------------------------------------------------------
SAMPLE_COLUMNS = (("t s", 7), ("sent", 6), ("ok", 6), ("err", 4), ("open", 4), ("win p99", 7),
                  ("gw MiB", 7), ("workers MiB", 13), ("redis MiB", 9), ("keys", 6), ("xlen", 4),
                  ("ld1m", 5))  # fmt: skip


def sample_header() -> str:
    return " ".join(f"{name:>{width}}" for name, width in SAMPLE_COLUMNS)


def print_sample(sample: dict, outcomes: list[Outcome]) -> None:
    """One live line; the window's p99 counts the requests of the window answered so far."""
    answered = [o.latency_ms for o in list(outcomes) if o.phase == sample["label"] and o.final == "answered"]
    p99 = percentile(answered, 99)
    rss = sample["rss_mib"]
    cells = (
        f"{sample['t_s']:.0f}", sample["sent"], sample["answered"], sample["errored"], sample["outstanding"],
        "-" if p99 is None else f"{p99:.0f}", rss["gateway"],
        "/".join(str(v) for k, v in rss.items() if k != "gateway"),
        f"{sample['redis']['used_memory_mib']:.2f}", sample["redis"]["keys"], sample["redis"]["stream_len"],
        sample["loadavg_1m"],
    )  # fmt: skip
    print(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, SAMPLE_COLUMNS, strict=True)), flush=True)


def table(s: dict) -> str:
    drift = s["p99_drift_ms"]
    rows = [
        ("sent / answered / errored / lost", f"{s['sent']} / {s['answered']} / {s['errored']} / {s['lost']}"),
        ("error rate", f"{s['error_rate']:.4%}" if s["error_rate"] is not None else "-"),
        ("retries (same request id)", f"{s['retries']} {json.dumps(s['retry_causes'])}"),
        ("latency p50 / p99 / max ms", f"{s['latency_ms']['p50']} / {s['latency_ms']['p99']} / "
                                       f"{s['latency_ms']['max']}"),
        (f"p99 ms, first vs last {drift['windows']} windows", f"{drift['first']} -> {drift['last']}"),
        ("p99 ms, first vs last window", f"{drift['first_window']} -> {drift['last_window']}"),
        *((f"RSS {name} MiB", mib(g)) for name, g in s["rss_mib"].items()),
        ("Redis used_memory MiB", mib(s["redis_used_memory_mib"])),
        ("Redis keys: first / max / last / after expiry", f"{s['redis_keys']['first_sample']} / "
         f"{s['redis_keys']['max']} / {s['redis_keys']['last_sample']} / {s['redis_keys']['after_expiry']}"),
        ("stream length max / after; dead letters", f"{s['stream_len_max']} / {s['stream_len_after']}; "
                                                    f"{s['dead_letters']}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def mib(g: dict) -> str:
    """first -> last (growth; second-half growth), max."""
    return (f"{g['first']} -> {g['last']} ({g['growth']:+}; 2nd half {g['second_half_growth']:+}), "
            f"max {g['max']}")  # fmt: skip


def plot(samples: list[dict], path: Path) -> None:
    """p99 per window, RSS per process, Redis used_memory and keys against time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    axes[0].plot(minutes, [s["window"]["p99_ms"] for s in samples], marker=".", label="p99")
    axes[0].plot(minutes, [s["window"]["p50_ms"] for s in samples], marker=".", label="p50")
    axes[0].set_ylabel("latency per window, ms")
    load = axes[0].twinx()  # other jobs on the shared machine: p99 follows the load average
    load.plot(minutes, [s["loadavg_1m"] for s in samples], color="grey", alpha=0.5, label="load avg 1 min")
    load.set_ylabel("load average (1 min)")
    load.legend(loc="upper left", fontsize=8)
    for name in samples[0]["rss_mib"]:
        axes[1].plot(minutes, [s["rss_mib"].get(name) for s in samples], marker=".", label=name)
    axes[1].set_ylabel("VmRSS, MiB")
    axes[2].plot(minutes, [s["redis"]["used_memory_mib"] for s in samples], marker=".", label="used_memory")
    axes[2].set_ylabel("Redis used_memory, MiB")
    axes[3].plot(minutes, [s["redis"]["keys"] for s in samples], marker=".", label="keys under the prefix")
    axes[3].plot(minutes, [s["redis"]["stream_len"] for s in samples], marker=".", label="stream length")
    axes[3].set_ylabel("Redis keys / entries")
    axes[3].set_xlabel("minutes since the load started")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("soak: steady open-loop load on gateway + CPU workers + Redis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------
def run(settings: dict, out: Path) -> dict:
    started = time.monotonic()
    result = header("soak") | {"settings": settings}
    extra_env = {"VQA_RESULT_TTL_S": str(settings["result_ttl_s"])}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        with own_stack(settings, workdir, "soak", extra_env) as (redis_server, stack):
            result["versions"]["redis_server"] = redis_version(redis_server.url)
            items, result["payload"] = build_items(stack.url, settings, workdir / "cache")
            print(f"stack up in {time.monotonic() - started:.1f} s: redis :{redis_server.port}, gateway "
                  f"{stack.url}, {settings['workers']} worker(s); {settings['rate']:g} req/s for "
                  f"{settings['minutes']:g} min", flush=True)  # fmt: skip
            result |= soak(stack, redis_server.url, items, settings)
            result["process_exit_codes"] = stack.exit_codes()
    return write_result(result, out, started)


def soak(stack: Stack, redis_url: str, items: list[Item], settings: dict) -> dict:
    """The load and the sampler; then the drain and the wait for expiry. The result's sections."""
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    load_settings = settings | {"max_requests": int(settings["rate"] * settings["minutes"] * 60 * 3) + 100}
    load = Load(stack.url, items, load_settings, clock)
    sampler = Sampler(stack, redis_url, load, settings, clock)
    baseline = sampler.take("baseline")
    print(sample_header(), flush=True)
    sampler.start()
    drain = asyncio.run(load.run())
    sampler.join(settings["sample_s"] + 30)
    if sampler.error is not None:
        raise RuntimeError("the sampler failed") from sampler.error
    after_drain = sampler.take("after_drain")
    after_expiry = wait_for_expiry(sampler.take, settings["result_ttl_s"] + settings["expiry_slack_s"])
    samples = with_window_stats(sampler.samples, load.outcomes)
    return {
        "drain": drain,
        "baseline": baseline,
        "samples": samples,
        "after_drain": after_drain,
        "after_expiry": after_expiry,
        "summary": summary(samples, load.outcomes, after_expiry, settings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=SETTINGS["minutes"])
    parser.add_argument("--rate", type=float, default=SETTINGS["rate"], help="requests per second")
    parser.add_argument("--workers", type=int, default=SETTINGS["workers"])
    parser.add_argument("--sample-s", type=float, default=SETTINGS["sample_s"])
    parser.add_argument("--result-ttl-s", type=int, default=SETTINGS["result_ttl_s"])
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG next to --out")
    args = parser.parse_args()
    settings = SETTINGS | {
        "minutes": args.minutes,
        "rate": args.rate,
        "workers": args.workers,
        "sample_s": args.sample_s,
        "result_ttl_s": args.result_ttl_s,
    }
    # SIGTERM ends the script like Ctrl-C does, so the finally block stops every subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(settings, args.out)
    if not args.no_plot:
        plot(result["samples"], args.out.with_suffix(".png"))
    print(f"\n{describe(result)}; {settings['minutes']:g} min at {settings['rate']:g} req/s, "
          f"{settings['workers']} worker(s)")  # fmt: skip
    print(table(result["summary"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
