"""The Redis queue: one stream per model (consumer group ``workers``), one reply list per gateway.

Gateway side (:class:`RedisGatewayQueue`, asyncio): ``submit`` runs the ENQUEUE script (stored
result -> return it; same request id in flight -> join it; backlog full -> 429; else ``XADD``), then
awaits an in-process future. ONE background task per gateway process pops the gateway's reply list
(``BLMPOP``) and resolves those futures, so a waiting request holds no Redis connection. A streamed
request is enqueued by the same script and then read from its partial stream with ``XREAD BLOCK``
(one pooled connection per streaming client while it waits, for at most a second per call).

Worker side (:class:`RedisWorkerQueue`, blocking): ``XREADGROUP`` new entries, ``XAUTOCLAIM``
entries a dead worker left pending (moving those delivered more than ``VQA_MAX_DELIVERIES`` times to
the dead-letter stream), ``XADD`` each step's new text of a streamed entry to its partial stream,
and FINISH each batch in one script call: reply to every waiter, store the results, end the
partial streams, ``XACK`` + ``XDEL``. The stream therefore holds exactly the unanswered requests and is
never trimmed by length.

Every Redis exception is translated to :class:`~gateway.errors.QueueUnavailable` by
:func:`redis_errors`; the client reconnects by itself once Redis is back, so neither process needs
a restart after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff

from edge_client.protocol import VQARequest

from ..config import QueueSettings
from ..errors import DeadLettered, DeadlineExceeded, QueueUnavailable
from .base import Claimed, Job, PartialEntry, Reply, Standing, Ticket, entry_key, now_ms
from .keys import (
    DEAD_LETTER_BODY_BYTES,
    DEAD_LETTER_MAXLEN,
    GROUP,
    IN_FLIGHT_GRACE_MS,
    INFLIGHT_SLACK_MS,
    MODEL_INFO_TTL_S,
    PARTIAL_MAXLEN,
    PARTIAL_TTL_MS,
    REPLY_LIST_TTL_MS,
    STALE_WORKER_KEEP_MS,
    Keys,
    Status,
)
from .scripts import ENQUEUE, FINISH

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

__all__ = ["RedisGatewayQueue", "RedisWorkerQueue", "redis_errors"]

log = logging.getLogger(__name__)

# Two quick retries absorb a pooled connection that died with a Redis restart; more would only
# delay the 503 a client should get while Redis is down (redis-py's default is 10 retries).
_RETRIES = 2


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate any redis-py error into QueueUnavailable (the one place that knows redis errors).

    The message names only the error type: it reaches clients in the 503 body, and redis-py's own
    text names the internal Redis address. The full error stays the ``__cause__``, for the logs.
    """
    try:
        yield
    except redis.RedisError as exc:
        raise QueueUnavailable(f"queue unavailable ({type(exc).__name__}); retry later") from exc


# Both clients are made with decode_responses=False, so every Redis reply is bytes. redis-py types
# replies as ``bytes | str`` (its annotations cannot see that option): the casts below say bytes.
# Stream entries as parsed by redis-py: (entry id, fields), fields None for an entry deleted while
# pending.
_Entries = Sequence[tuple[bytes, dict[bytes, bytes] | None]]


def _client_options(settings: QueueSettings, block_s: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s + block_s,
        "decode_responses": False,
    }


class RedisGatewayQueue:
    """The API's side: enqueue once per request id, await the reply through one reader task."""

    def __init__(self, settings: QueueSettings, gateway_id: str) -> None:
        self.keys = Keys(settings.key_prefix)
        self.settings = settings
        self.gateway_id = gateway_id
        self.reply_key = self.keys.replies(gateway_id)
        self._block_s = max(0.05, min(1.0, settings.redis_timeout_s / 2))
        self._client: aioredis.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[tuple[str, str], list[asyncio.Future[Reply]]] = {}
        self._closing = False

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisGatewayQueue.start() was not called")
        return self._client

    async def start(self) -> None:
        from redis.asyncio.retry import Retry

        self._client = aioredis.Redis.from_url(
            self.settings.redis_url,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), _RETRIES),
            **_client_options(self.settings, self._block_s),
        )
        self._enqueue = self._client.register_script(ENQUEUE)
        self._reader = asyncio.create_task(self._read_replies(), name=f"vqa-replies-{self.gateway_id}")

    async def close(self) -> None:
        # The reader also stops by itself at its next turn: redis-py (8.1, Python 3.11) can swallow
        # a cancel that lands in a blocking read, which then returns as a timeout, and the loop
        # would go on (a shutdown that never ended).
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(QueueUnavailable("the gateway is shutting down"))
        if self._client is not None:
            await self._client.aclose()

    async def _read_replies(self) -> None:
        """The one consumer of this gateway's reply list; survives Redis outages with a backoff."""
        delay = 0.05
        while not self._closing:
            try:
                popped = await self.client.blmpop(
                    self._block_s, 1, self.reply_key, direction="LEFT", count=256
                )
                delay = 0.05
            except redis.RedisError as exc:
                log.warning("reply reader: %s: %s (retrying in %.2fs)", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except Exception:  # never let the one reader die: every waiting request depends on it
                log.exception("reply reader failed (retrying in %.2fs)", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if popped:
                for payload in cast("list[bytes]", popped[1]):
                    self._resolve(payload)

    def _resolve(self, payload: bytes) -> None:
        try:
            reply = Reply.unpack(payload)
        except ValueError as exc:
            log.error("dropping a reply: %s", exc)
            return
        for future in self._waiting.get((reply.model, reply.request_id), ()):
            if not future.done():
                future.set_result(reply)

    async def ping(self) -> None:
        with redis_errors():
            await self.client.ping()

    async def _run_enqueue(
        self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket, streamed: bool
    ) -> tuple[bytes, bytes]:
        """The ENQUEUE script: (status, value), or the ticket's Overloaded or RateLimited."""
        key = (request.model, request.request_id)
        now = now_ms()
        args: list[EncodableT] = [
            self.reply_key,
            deadline_ms,
            max(deadline_ms - now, 1) + INFLIGHT_SLACK_MS,
            ticket.max_backlog,
            request.request_id,
            now,
            body,
            request.model,
            "1" if streamed else "0",
            ticket.scope,
            ticket.max_in_flight,
            IN_FLIGHT_GRACE_MS,
        ]
        with redis_errors():
            status, value = await self._enqueue(
                keys=[
                    self.keys.result(*key),
                    self.keys.inflight(*key),
                    self.keys.waiters(*key),
                    self.keys.stream(request.model),
                    self.keys.partial(*key),
                    self.keys.busy(ticket.scope),
                ],
                args=args,
            )
        if status == Status.OVERLOADED:
            raise ticket.overloaded(request.model)
        if status == Status.BUSY:
            raise ticket.busy()
        return status, value

    async def submit(self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket) -> Reply:
        key = (request.model, request.request_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        # Registered before the entry exists, so even an instant reply finds its future.
        self._waiting.setdefault(key, []).append(future)
        try:
            now = now_ms()
            status, value = await self._run_enqueue(request, body, deadline_ms, ticket, streamed=False)
            if status == Status.DONE:
                return Reply.unpack(value)
            # A timer that fails the future itself: asyncio.wait_for would add a second future and
            # a second event-loop pass between the reply and this task.
            budget_s = max(deadline_ms - now_ms(), 0) / 1000
            timer = asyncio.get_running_loop().call_later(budget_s, _expire, future, deadline_ms - now)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            futures = self._waiting.get(key, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(key, None)

    async def enqueue_streamed(
        self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket
    ) -> Reply | None:
        status, value = await self._run_enqueue(request, body, deadline_ms, ticket, streamed=True)
        return Reply.unpack(value) if status == Status.DONE else None

    async def read_partials(
        self, model: str, request_id: str, after: str, block_ms: int
    ) -> list[PartialEntry]:
        key = self.keys.partial(model, request_id)
        # The socket timeout allows a block of _block_s; a longer wait is the caller's loop.
        block = min(block_ms, int(self._block_s * 1000)) or None  # None: no BLOCK (0 would be forever)
        with redis_errors():
            response = await self.client.xread({key: after}, count=PARTIAL_MAXLEN, block=block)
        # [[stream name, entries]]: one stream was read.
        entries: _Entries = cast("list[list[Any]]", response)[0][1] if response else []
        partials = []
        for raw_id, fields in entries:
            if fields is None or b"open" in fields:  # the marker of a joined request: no text
                continue
            entry_id = raw_id.decode()
            if b"reply" in fields:
                try:
                    partials.append(PartialEntry(entry_id, reply=Reply.unpack(fields[b"reply"])))
                except ValueError as exc:
                    log.error("dropping a malformed reply in %s: %s", key, exc)
                    continue
                break
            partials.append(PartialEntry(entry_id, text=fields.get(b"t", b"").decode(errors="replace")))
        return partials

    async def reserve_id(self, model: str, request_id: str, digest: bytes, ttl_ms: int) -> bool:
        key = self.keys.request(model, request_id)
        with redis_errors():
            if await self.client.set(key, digest, nx=True, px=ttl_ms):
                return True
            return await self.client.get(key) in (digest, None)  # None: expired in between

    async def backlog(self, model: str) -> int:
        with redis_errors():
            return int(await self.client.xlen(self.keys.stream(model)))

    async def standing(self, scope: str, model: str, request_id: str) -> Standing:
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self.keys.result(model, request_id), self.keys.inflight(model, request_id))
            pipe.zcount(self.keys.busy(scope), now_ms(), "+inf")
            known, in_flight = await pipe.execute()
        return Standing(known=bool(known), in_flight=int(in_flight))

    async def model_names(self) -> list[str]:
        with redis_errors():
            names = await self.client.smembers(self.keys.models())
        return sorted(name.decode() for name in cast("set[bytes]", names))

    async def model_info(self, model: str) -> bytes | None:
        with redis_errors():
            return cast("bytes | None", await self.client.get(self.keys.model(model)))

    async def bundle(self, sha256: str) -> bytes | None:
        with redis_errors():
            return cast("bytes | None", await self.client.get(self.keys.bundle(sha256)))

    async def live_workers(self, model: str) -> int:
        with redis_errors():
            return int(await self.client.zcount(self.keys.workers(model), now_ms(), "+inf"))

    async def worker_seen_within(self, model: str, grace_ms: int) -> bool:
        with redis_errors():
            return bool(await self.client.zcount(self.keys.workers(model), now_ms() - grace_ms, "+inf"))


class RedisWorkerQueue:
    """One worker's side of one model's stream. Blocking calls; every method raises QueueUnavailable."""

    def __init__(self, settings: QueueSettings, model: str, consumer: str, *, block_s: float = 1.0) -> None:
        from redis.retry import Retry

        self.keys = Keys(settings.key_prefix)
        self.settings = settings
        self.model = model
        self.consumer = consumer
        self.stream = self.keys.stream(model)
        self.client = redis.Redis.from_url(
            settings.redis_url,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), _RETRIES),
            **_client_options(settings, block_s),
        )
        self._finish = self.client.register_script(FINISH)
        self._claim_cursor = "0-0"

    def close(self) -> None:
        self.client.close()

    def ensure_group(self) -> None:
        with redis_errors():
            try:
                # From id 0: entries added before the group existed are work too.
                self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def publish(self, info: bytes, bundle: bytes, sha256: str) -> None:
        with redis_errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.bundle(sha256), bundle, ex=MODEL_INFO_TTL_S)
            pipe.set(self.keys.model(self.model), info, ex=MODEL_INFO_TTL_S)
            pipe.sadd(self.keys.models(), self.model)
            pipe.execute()

    def beat(self, status: bytes, ttl_s: float, info: bytes, bundle: bytes, sha256: str) -> None:
        now = now_ms()
        ttl_ms = int(ttl_s * 1000)
        workers = self.keys.workers(self.model)
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.keys.heartbeat(self.model, self.consumer), status, px=ttl_ms)
            pipe.zadd(workers, {self.consumer: now + ttl_ms})
            pipe.zremrangebyscore(workers, "-inf", now - STALE_WORKER_KEEP_MS)
            pipe.pexpire(workers, max(ttl_ms, MODEL_INFO_TTL_S * 1000))
            pipe.expire(self.keys.model(self.model), MODEL_INFO_TTL_S)
            pipe.expire(self.keys.bundle(sha256), MODEL_INFO_TTL_S)
            *_, info_alive, bundle_alive = pipe.execute()
            if not (info_alive and bundle_alive):  # Redis lost its data (restart without persistence)
                log.warning("model info or bundle of %s missing in Redis: republishing", self.model)
                self.publish(info, bundle, sha256)
                self.ensure_group()

    def leave(self) -> None:
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.keys.heartbeat(self.model, self.consumer))
            pipe.zadd(self.keys.workers(self.model), {self.consumer: now_ms()})  # left now: not live
            pipe.execute()

    def live_workers(self, host: str | None = None) -> int:
        """Live workers of this model; with ``host``, only those whose id starts with ``host-``."""
        with redis_errors():
            if host is None:
                return int(self.client.zcount(self.keys.workers(self.model), now_ms(), "+inf"))
            members = cast(
                "list[bytes]", self.client.zrangebyscore(self.keys.workers(self.model), now_ms(), "+inf")
            )
        return sum(1 for m in members if m.decode().startswith(f"{host}-"))

    def backlog(self) -> int:
        with redis_errors():
            return int(self.client.xlen(self.stream))

    def read(self, count: int, block_ms: int) -> list[Job]:
        with redis_errors():
            try:
                # block_ms == 0: a non-blocking read (redis-py omits BLOCK when block is None).
                response = self.client.xreadgroup(
                    GROUP, self.consumer, {self.stream: ">"}, count=count, block=block_ms or None
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing on %s: recreating it", self.stream)
                self.ensure_group()
                return []
        # [[stream name, entries]]: one stream was read.
        entries: _Entries = cast("list[list[Any]]", response)[0][1] if response else []
        return self._parse(entries, deliveries=1)

    def _parse(self, entries: _Entries, deliveries: int) -> list[Job]:
        jobs = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if fields is None:  # deleted while pending (Redis < 7 reports these in XAUTOCLAIM)
                continue
            try:
                jobs.append(Job.from_fields(entry_id, fields))
            except ValueError as exc:
                log.error("moving malformed entry %s to %s: %s", entry_id, self.keys.dead(self.model), exc)
                self._bury(entry_id, fields, reason=str(exc), deliveries=deliveries)
        return jobs

    def _bury(self, entry_id: str, fields: dict[bytes, bytes], reason: str, deliveries: int) -> None:
        """Move an entry that must never be processed to the dead-letter stream."""
        with redis_errors():
            pipe = self.client.pipeline(transaction=True)
            # redis-py's xadd takes an invariant Dict[FieldT, EncodableT] (it only reads it).
            record = _dead_record(dict(fields), fields.get(b"request", b""))
            record.update(
                {
                    b"entry_id": entry_id,
                    b"reason": reason,
                    b"deliveries": deliveries,
                    b"consumer": self.consumer,
                }
            )
            pipe.xadd(self.keys.dead(self.model), record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.execute()

    def claim(self, count: int) -> Claimed:
        with redis_errors():
            try:
                cursor, entries, *_ = self.client.xautoclaim(
                    self.stream,
                    GROUP,
                    self.consumer,
                    self.settings.claim_idle_ms,
                    self._claim_cursor,
                    count=count,
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()
                return Claimed()
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            entries = [(raw_id, fields) for raw_id, fields in entries if fields is not None]
            if not entries:
                return Claimed()
            ids = [raw_id.decode() for raw_id, _ in entries]
            pending = self.client.xpending_range(
                self.stream,
                GROUP,
                min=min(ids, key=entry_key),
                max=max(ids, key=entry_key),
                count=len(ids) + 16,
                consumername=self.consumer,
            )
        deliveries = {cast(bytes, p["message_id"]).decode(): int(p["times_delivered"]) for p in pending}
        claimed = Claimed()
        for job in self._parse(entries, deliveries=0):
            job = replace(job, deliveries=deliveries.get(job.entry_id, 1))
            if job.deliveries > self.settings.max_deliveries:
                claimed.dead.append(job)
            else:
                claimed.jobs.append(job)
        failures = []
        for job in claimed.dead:
            reason = (
                f"delivered {job.deliveries - 1} times without an answer (VQA_MAX_DELIVERIES="
                f"{self.settings.max_deliveries}): the workers handling it died"
            )
            log.error("dead-lettering %s (request %s): %s", job.entry_id, job.request_id, reason)
            record = _dead_record({k.encode(): v for k, v in job.fields().items()}, job.body)
            with redis_errors():
                self.client.xadd(
                    self.keys.dead(self.model),
                    {**record, b"entry_id": job.entry_id, b"reason": reason, b"deliveries": job.deliveries},
                    maxlen=DEAD_LETTER_MAXLEN,
                    approximate=True,
                )
            failures.append((job, Reply.failure(job, DeadLettered(f"request {job.request_id}: {reason}"))))
        self.finish(failures)
        return claimed

    def publish_partial(self, job: Job, text: str) -> None:
        if not (job.stream and text):
            return
        key = self.keys.partial(job.model, job.request_id)
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(key, {"t": text}, maxlen=PARTIAL_MAXLEN, approximate=True)
            pipe.pexpire(key, PARTIAL_TTL_MS)
            pipe.execute()

    def finish(self, done: list[tuple[Job, Reply]]) -> None:
        """The whole batch in one FINISH call: one round trip between compute and the replies."""
        if not done:
            return
        result_ttl_ms = self.settings.result_ttl_s * 1000
        keys = [self.stream]
        args: list[EncodableT] = [GROUP, REPLY_LIST_TTL_MS, PARTIAL_TTL_MS, PARTIAL_MAXLEN]
        for job, reply in done:
            keys += [
                self.keys.result(job.model, job.request_id),
                self.keys.inflight(job.model, job.request_id),
                self.keys.waiters(job.model, job.request_id),
                self.keys.partial(job.model, job.request_id),
                self.keys.busy(job.scope),
            ]
            # Only answers are stored: a retry after an error should run again.
            ttl = result_ttl_ms if reply.ok else 0
            args += [job.entry_id, reply.pack(), ttl, job.reply_to, "1" if job.stream else "0"]
        with redis_errors():
            self._finish(keys=keys, args=args)


def _dead_record(fields: dict[bytes, Any], body: bytes) -> dict[FieldT, EncodableT]:
    """A dead letter's fields: the entry's, its request body replaced by size and sha256 when over
    DEAD_LETTER_BODY_BYTES (a cloud-only image above all)."""
    record = cast("dict[FieldT, EncodableT]", fields)
    if len(body) > DEAD_LETTER_BODY_BYTES:
        record[b"request"] = b""
        record[b"request_bytes"] = len(body)
        record[b"request_sha256"] = hashlib.sha256(body).hexdigest()
    return record


def _expire(future: asyncio.Future[Reply], budget_ms: int) -> None:
    if not future.done():
        future.set_exception(
            DeadlineExceeded(f"no answer before the deadline ({budget_ms} ms after it was queued)")
        )
