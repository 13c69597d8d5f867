"""The in-process queue (``VQA_QUEUE=memory``): gateway and worker loop in one process, no Redis.

For a laptop demo: the gateway process loads the model and runs the same worker loop and batching
code (:mod:`gateway.worker`) in a background thread, reading from this queue. It keeps the Redis
queue's semantics where they matter to clients: one entry per request id (retries of a finished
request get the stored answer, retries of an in-flight one wait for it), the backlog limit, and
deadlines, and streamed requests' partial streams (kept per request id for ``PARTIAL_TTL_MS``,
with the same entry ids and the same end-of-stream reply). What only makes sense across processes
(claiming from dead workers, dead letters) is a no-op: nobody else can die holding an entry.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from edge_client.protocol import VQARequest

from ..config import QueueSettings
from ..errors import DeadlineExceeded
from .base import Claimed, Job, PartialEntry, Reply, Standing, Ticket, entry_key, now_ms
from .keys import IN_FLIGHT_GRACE_MS, INFLIGHT_SLACK_MS, PARTIAL_MAXLEN, PARTIAL_TTL_MS

__all__ = ["MemoryQueue", "MemoryWorkerQueue"]

_REPLY_TO = "memory"
# Partial streams are pruned of expired ones once this many are held.
_PARTIALS_PRUNE_AT = 1_000


@dataclass
class _PartialStream:
    """One request's partial stream: entries in order, expiry on the monotonic clock."""

    expires: float
    entries: list[PartialEntry] = field(default_factory=list)


class MemoryQueue:
    """Both sides of the queue in one process; thread-safe (the worker loop runs in a thread)."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._streams: dict[str, deque[Job]] = defaultdict(deque)
        self._taken: dict[str, int] = defaultdict(int)  # read by the worker, not finished yet
        self._results: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._inflight: dict[tuple[str, str], str] = {}
        self._busy: dict[str, dict[str, int]] = {}  # tenant -> entry id -> deadline + grace (ms)
        self._reserved: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._waiting: dict[tuple[str, str], list[asyncio.Future[Reply]]] = defaultdict(list)
        self._info: dict[str, bytes] = {}
        self._bundles: dict[str, bytes] = {}
        self._beats: dict[tuple[str, str], float] = {}
        self._partials: dict[tuple[str, str], _PartialStream] = {}
        self._partial_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = defaultdict(list)
        self._ids = itertools.count(1)
        self._partial_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    # ---- gateway side ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    async def ping(self) -> None:
        return None

    def _stored(self, key: tuple[str, str]) -> bytes | None:
        entry = self._results.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._results[key]
            return None
        return entry[1]

    async def reserve_id(self, model: str, request_id: str, digest: bytes, ttl_ms: int) -> bool:
        with self._cond:
            expires, bound = self._reserved.get((model, request_id), (0.0, digest))
            if expires < time.monotonic():
                bound = digest
                self._reserved[model, request_id] = (time.monotonic() + ttl_ms / 1000, digest)
            return bound == digest

    def _enqueue(
        self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket, streamed: bool
    ) -> Reply | None:
        """ENQUEUE's semantics (see gateway.queue.scripts); the caller holds the lock."""
        key = (request.model, request.request_id)
        stored = self._stored(key)
        if stored is not None:
            return Reply.unpack(stored)
        if key in self._inflight:
            if streamed and self._partial(key) is None:  # joined: FINISH must end the stream
                ttl_ms = max(deadline_ms - now_ms(), 1) + INFLIGHT_SLACK_MS
                self._partials[key] = _PartialStream(time.monotonic() + ttl_ms / 1000)
            return None
        if len(self._streams[request.model]) + self._taken[request.model] >= ticket.max_backlog:
            raise ticket.overloaded(request.model)
        if ticket.max_in_flight and self._in_flight(ticket.scope) >= ticket.max_in_flight:
            raise ticket.busy()
        job = Job(
            entry_id=str(next(self._ids)),
            model=request.model,
            request_id=request.request_id,
            reply_to=_REPLY_TO,
            deadline_ms=deadline_ms,
            enqueued_ms=now_ms(),
            body=body,
            scope=ticket.scope,
            stream=streamed,
        )
        self._partials.pop(key, None)  # an earlier, failed attempt's
        if ticket.max_in_flight:
            self._busy.setdefault(ticket.scope, {})[job.entry_id] = deadline_ms + IN_FLIGHT_GRACE_MS
        self._inflight[key] = job.entry_id
        self._streams[request.model].append(job)
        self._cond.notify_all()
        return None

    async def submit(self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket) -> Reply:
        assert self._loop is not None, "MemoryQueue.start() was not called"
        key = (request.model, request.request_id)
        future: asyncio.Future[Reply] = self._loop.create_future()
        with self._cond:
            stored = self._enqueue(request, body, deadline_ms, ticket, streamed=False)
            if stored is not None:
                return stored
            self._waiting[key].append(future)
        try:
            budget_s = max(deadline_ms - now_ms(), 0) / 1000
            return await asyncio.wait_for(future, budget_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer before the deadline ({budget_s * 1000:.0f} ms left)") from None
        finally:
            with self._cond:
                futures = self._waiting.get(key, [])
                if future in futures:
                    futures.remove(future)
                if not futures:
                    self._waiting.pop(key, None)

    async def enqueue_streamed(
        self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket
    ) -> Reply | None:
        with self._cond:
            return self._enqueue(request, body, deadline_ms, ticket, streamed=True)

    def _partial(self, key: tuple[str, str]) -> _PartialStream | None:
        stream = self._partials.get(key)
        if stream is not None and stream.expires < time.monotonic():
            del self._partials[key]
            return None
        return stream

    def _partials_after(self, key: tuple[str, str], after: tuple[int, int]) -> list[PartialEntry]:
        stream = self._partial(key)
        if stream is None:
            return []
        out = []
        for entry in stream.entries:
            if entry_key(entry.entry_id) > after:
                out.append(entry)
                if entry.reply is not None:
                    break
        return out

    async def read_partials(
        self, model: str, request_id: str, after: str, block_ms: int
    ) -> list[PartialEntry]:
        assert self._loop is not None, "MemoryQueue.start() was not called"
        key, cursor = (model, request_id), entry_key(after)
        with self._cond:
            entries = self._partials_after(key, cursor)
            if entries or block_ms <= 0:
                return entries
            future: asyncio.Future[None] = self._loop.create_future()
            self._partial_waiters[key].append(future)
        try:
            await asyncio.wait_for(future, block_ms / 1000)
        except TimeoutError:
            pass
        finally:
            with self._cond:
                waiters = self._partial_waiters.get(key, [])
                if future in waiters:
                    waiters.remove(future)
                if not waiters:
                    self._partial_waiters.pop(key, None)
        with self._cond:
            return self._partials_after(key, cursor)

    def _append_partial(self, job: Job, text: str = "", reply: Reply | None = None) -> None:
        """Add an entry and wake the readers (the worker thread calls this, holding the lock)."""
        key = (job.model, job.request_id)
        expires = time.monotonic() + PARTIAL_TTL_MS / 1000
        stream = self._partial(key)
        if stream is None:
            if len(self._partials) > _PARTIALS_PRUNE_AT:
                now = time.monotonic()
                self._partials = {k: v for k, v in self._partials.items() if v.expires >= now}
            stream = self._partials[key] = _PartialStream(expires)
        stream.expires = expires
        if len(stream.entries) < PARTIAL_MAXLEN:
            stream.entries.append(PartialEntry(f"0-{next(self._partial_ids)}", text, reply))
        for future in self._partial_waiters.pop(key, []):
            if self._loop is not None:
                self._loop.call_soon_threadsafe(_wake, future)

    async def backlog(self, model: str) -> int:
        with self._cond:
            return len(self._streams[model]) + self._taken[model]

    async def standing(self, scope: str, model: str, request_id: str) -> Standing:
        key = (model, request_id)
        with self._cond:
            return Standing(self._stored(key) is not None or key in self._inflight, self._in_flight(scope))

    def _in_flight(self, scope: str) -> int:
        """The scope's entries in flight, the expired ones forgotten; the caller holds the lock."""
        busy = self._busy.get(scope, {})
        now = now_ms()
        for entry_id in [e for e, until in busy.items() if until < now]:
            del busy[entry_id]
        return len(busy)

    async def model_names(self) -> list[str]:
        with self._cond:
            return sorted(self._info)

    async def model_info(self, model: str) -> bytes | None:
        with self._cond:
            return self._info.get(model)

    async def bundle(self, sha256: str) -> bytes | None:
        with self._cond:
            return self._bundles.get(sha256)

    async def live_workers(self, model: str) -> int:
        return self._live(model)

    async def worker_seen_within(self, model: str, grace_ms: int) -> bool:
        since = time.monotonic() - grace_ms / 1000
        with self._cond:
            return any(until > since for (name, _), until in self._beats.items() if name == model)

    def _live(self, model: str) -> int:
        now = time.monotonic()
        with self._cond:
            return sum(1 for (name, _), until in self._beats.items() if name == model and until > now)

    def for_worker(self, model: str, consumer: str) -> MemoryWorkerQueue:
        return MemoryWorkerQueue(self, model, consumer)

    # ---- worker side (called from the worker thread through MemoryWorkerQueue) ------------------

    def _read(self, model: str, count: int, block_ms: int) -> list[Job]:
        with self._cond:
            stream = self._streams[model]
            if not stream and not self.closed and block_ms > 0:
                self._cond.wait(block_ms / 1000)
            jobs = [stream.popleft() for _ in range(min(count, len(stream)))]
            self._taken[model] += len(jobs)
            return jobs

    def _finish(self, done: list[tuple[Job, Reply]]) -> None:
        expires = time.monotonic() + self.settings.result_ttl_s
        with self._cond:
            for job, reply in done:
                key = (job.model, job.request_id)
                self._taken[job.model] = max(0, self._taken[job.model] - 1)
                if reply.ok:
                    self._results[key] = (expires, reply.pack())
                if job.stream or self._partial(key) is not None:
                    self._append_partial(job, reply=reply)
                if self._inflight.get(key) == job.entry_id:
                    del self._inflight[key]
                self._busy.get(job.scope, {}).pop(job.entry_id, None)
                for future in self._waiting.get(key, ()):
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(_resolve, future, reply)
            if len(self._results) > 10_000:
                now = time.monotonic()
                for key in [k for k, (until, _) in self._results.items() if until < now]:
                    del self._results[key]


def _resolve(future: asyncio.Future[Reply], reply: Reply) -> None:
    if not future.done():
        future.set_result(reply)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MemoryWorkerQueue:
    """A worker's view of one model in a :class:`MemoryQueue` (same interface as RedisWorkerQueue)."""

    def __init__(self, queue: MemoryQueue, model: str, consumer: str) -> None:
        self.queue = queue
        self.model = model
        self.consumer = consumer

    def ensure_group(self) -> None:
        return None

    def publish(self, info: bytes, bundle: bytes, sha256: str) -> None:
        with self.queue._cond:
            self.queue._info[self.model] = info
            self.queue._bundles[sha256] = bundle

    def beat(self, status: bytes, ttl_s: float, info: bytes, bundle: bytes, sha256: str) -> None:
        with self.queue._cond:
            self.queue._beats[(self.model, self.consumer)] = time.monotonic() + ttl_s

    def leave(self) -> None:
        with self.queue._cond:
            self.queue._beats[self.model, self.consumer] = time.monotonic()  # left now: not live

    def live_workers(self, host: str | None = None) -> int:
        return self.queue._live(self.model)  # one process: its worker is this host's

    def read(self, count: int, block_ms: int) -> list[Job]:
        return self.queue._read(self.model, count, block_ms)

    def claim(self, count: int) -> Claimed:
        return Claimed()

    def publish_partial(self, job: Job, text: str) -> None:
        if job.stream and text:
            with self.queue._cond:
                self.queue._append_partial(job, text)

    def finish(self, done: list[tuple[Job, Reply]]) -> None:
        self.queue._finish(done)

    def backlog(self) -> int:
        with self.queue._cond:
            return len(self.queue._streams[self.model]) + self.queue._taken[self.model]

    def close(self) -> None:
        return None
