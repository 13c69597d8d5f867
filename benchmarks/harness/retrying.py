"""Open-loop load by EdgeClient-style clients: every logical request keeps one request id and is
sent again with it on connection errors, timeouts and 429/502/503/504 (``Retry-After`` honoured,
bounded exponential backoff, an overall budget), so a run can count what was answered, errored
and lost. Used where parts of the stack fail or run long (``fault_injection``, ``soak``)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgpack

from benchmarks.harness.payloads import Item, pack
from benchmarks.harness.stats import percentile, rounded
from edge_client.protocol import CONTENT_TYPE
from edge_client.transport import RETRY_STATUSES, retry_after

HEADERS = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}


@dataclass
class Outcome:
    request_id: str
    phase: str
    sent_at: float  # seconds since the load started
    attempts: int = 0
    final: str | None = None  # "answered" | "errored"; None while unfinished (lost at the end)
    code: str | None = None  # final error: "<status>:<code>" or the transport error's name
    answer: str | None = None
    latency_ms: float | None = None
    answers_seen: set = field(default_factory=set)  # every 200 answer this id received
    history: list = field(default_factory=list)  # what each failed attempt got


def error_code(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}:{response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}:?"


async def ask(client: httpx.AsyncClient, body: bytes, outcome: Outcome, cfg: dict, t_first: float) -> None:
    """One logical request, EdgeClient-style: same body (same id) on every retry, bounded overall."""
    deadline = t_first + cfg["budget_s"]
    attempt = 0
    while True:
        outcome.attempts += 1
        response = None
        try:
            response = await client.post("/v1/vqa", content=body, headers=HEADERS)
        except httpx.TransportError as exc:
            what = type(exc).__name__
        else:
            if response.status_code == 200:
                reply = msgpack.unpackb(response.content, raw=False)
                if reply.get("request_id") != outcome.request_id:
                    outcome.final, outcome.code = "errored", "wrong_request_id"
                    return
                outcome.answers_seen.add(reply["answer"])
                outcome.final, outcome.answer = "answered", reply["answer"]
                outcome.latency_ms = (time.perf_counter() - t_first) * 1e3
                return
            what = error_code(response)
            if response.status_code not in RETRY_STATUSES:
                outcome.final, outcome.code = "errored", what
                outcome.latency_ms = (time.perf_counter() - t_first) * 1e3
                return
        outcome.history.append(what)
        hinted = retry_after(response) if response is not None else None
        pause = (
            hinted if hinted is not None else cfg["backoff_s"] * 2 ** min(attempt, 8) * random.uniform(0.5, 1)
        )
        pause = min(pause, cfg["max_backoff_s"])
        attempt += 1
        if time.perf_counter() + pause >= deadline:
            outcome.final, outcome.code = "errored", f"budget_exhausted({what})"
            outcome.latency_ms = (time.perf_counter() - t_first) * 1e3
            return
        await asyncio.sleep(pause)


class Load:
    """Poisson arrivals of :func:`ask` requests, each tagged with the current :attr:`phase`."""

    def __init__(self, url: str, items: list[Item], settings: dict, clock: Callable[[], float]) -> None:
        self.url, self.items, self.settings, self.clock = url, items, settings, clock
        self.outcomes: list[Outcome] = []
        self.bodies: dict[str, bytes] = {}
        self.phase = "startup"
        self.stop_sending = False
        self.rng = random.Random(11)
        self.run_id = uuid.uuid4().hex[:8]

    def client(self, concurrency: int = 512) -> httpx.AsyncClient:
        cfg = self.settings["client"]
        return httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(cfg["attempt_timeout_s"], connect=cfg["connect_timeout_s"]),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=64),
            trust_env=False,
        )

    async def run(self) -> dict:
        """Open-loop arrivals until ``stop_sending``; then drain. Returns drain info."""
        tasks: list[asyncio.Task] = []
        async with self.client() as client:
            at = time.perf_counter()
            for n in range(self.settings["max_requests"]):
                at += self.rng.expovariate(self.settings["rate"])
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.stop_sending:
                    break
                item = self.items[self.rng.randrange(len(self.items))]
                request_id = f"fi-{self.run_id}-{n}"
                body = pack(item.fields, request_id)
                outcome = Outcome(request_id, self.phase, round(self.clock(), 3))
                self.outcomes.append(outcome)
                self.bodies[request_id] = body
                tasks.append(asyncio.create_task(ask(client, body, outcome, self.settings["client"], at)))
            drain_start = time.perf_counter()
            _, pending = (
                await asyncio.wait(tasks, timeout=self.settings["drain_s"]) if tasks else (set(), set())
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return {"drain_s": round(time.perf_counter() - drain_start, 2), "unfinished": len(pending)}

    async def replay(self) -> dict:
        """Send every answered request once more (same id): the same answer must come back."""
        answered = [o for o in self.outcomes if o.final == "answered"]
        mismatched, failed = [], Counter()
        semaphore = asyncio.Semaphore(self.settings["replay_concurrency"])

        async def again(client: httpx.AsyncClient, o: Outcome) -> None:
            async with semaphore:
                try:
                    response = await client.post(
                        "/v1/vqa", content=self.bodies[o.request_id], headers=HEADERS
                    )
                except httpx.TransportError as exc:
                    failed[type(exc).__name__] += 1
                    return
                if response.status_code != 200:
                    failed[error_code(response)] += 1
                    return
                answer = msgpack.unpackb(response.content, raw=False)["answer"]
                o.answers_seen.add(answer)
                if answer != o.answer:
                    mismatched.append({"request_id": o.request_id, "first": o.answer, "replay": answer})

        t0 = time.perf_counter()
        async with self.client(64) as client:
            await asyncio.gather(*(again(client, o) for o in answered))
        return {
            "replayed": len(answered),
            "same_answer": len(answered) - len(mismatched) - sum(failed.values()),
            "different_answer": len(mismatched),
            "different_examples": mismatched[:10],
            "failed": dict(failed),
            "seconds": round(time.perf_counter() - t0, 2),
        }


def summarize_outcomes(outcomes: list[Outcome]) -> dict:
    """Counts by final state, retries and latency (from the first send) of ``outcomes``."""
    answered = [o for o in outcomes if o.final == "answered"]
    errored = [o for o in outcomes if o.final == "errored"]
    lost = [o for o in outcomes if o.final is None]
    latencies = [o.latency_ms for o in answered]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "errored": len(errored),
        "errors": dict(Counter(o.code for o in errored)),
        "lost": len(lost),
        "lost_ids": [o.request_id for o in lost][:20],
        "retries": sum(max(0, o.attempts - 1) for o in outcomes),
        "requests_retried": sum(o.attempts > 1 for o in outcomes),
        "retry_causes": dict(Counter(h for o in outcomes for h in o.history)),
        "ids_with_two_answers": sum(len(o.answers_seen) > 1 for o in outcomes),
        "latency_ms": {
            "p50": rounded(percentile(latencies, 50), 1),
            "p99": rounded(percentile(latencies, 99), 1),
            "max": round(max(latencies), 1) if latencies else None,
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
        },
    }
