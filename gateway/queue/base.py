"""What travels through the queue (:class:`Job`, :class:`Reply`) and the two sides of its interface.

- :class:`GatewayQueue` (async) is what the HTTP API uses: enqueue a validated request and await
  its reply (or, streamed, read its partial text as it comes), read what the workers published.
- :class:`WorkerQueue` (sync, bound to one model) is what the worker loop uses: read and claim
  batches, publish the model, beat, publish a streamed job's new text, and finish entries (reply
  + store + acknowledge).

A streamed request's partial stream (docs/conversations.md, "Streaming") holds
:class:`PartialEntry` items: the text each generation step added, then one entry with the reply,
written when the request is finished. Entry ids are Redis stream ids (``<ms>-<seq>``) in both
implementations, so they serve as the Server-Sent Events' ids.

:mod:`gateway.queue.redis_queue` implements both over Redis; :mod:`gateway.queue.memory` implements
both in one process for a laptop without Redis. The worker loop and batching code are the same.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields
from typing import Protocol

import msgpack

from edge_client.errors import AlignedVQError
from edge_client.protocol import MAX_QUESTION_CHARS, VQARequest, VQAResponse

from ..errors import Overloaded, RateLimited, error_from_code

__all__ = [
    "Claimed",
    "GatewayQueue",
    "Job",
    "PartialEntry",
    "Reply",
    "Standing",
    "Ticket",
    "WorkerQueue",
    "entry_key",
    "now_ms",
]

_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def now_ms() -> int:
    """Wall-clock epoch milliseconds: deadlines cross processes (and hosts kept in sync by NTP)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Standing:
    """See :meth:`GatewayQueue.standing`."""

    known: bool
    in_flight: int


@dataclass(frozen=True)
class Ticket:
    """What a new entry is queued under: its tenant (``scope``, see :class:`Job`), the model's
    backlog cap (Overloaded at it) and the tenant's cap on entries not yet finished, each counted
    at most ``IN_FLIGHT_GRACE_MS`` past its deadline (RateLimited at it; 0: none)."""

    scope: str
    max_backlog: int
    max_in_flight: int = 0

    def overloaded(self, model: str) -> Overloaded:
        return Overloaded(
            f"model {model} has {self.max_backlog} requests waiting (VQA_MAX_BACKLOG); retry later"
        )

    def busy(self) -> RateLimited:
        return RateLimited(
            f"this API key (anonymously: this address) has {self.max_in_flight} requests in flight "
            "(VQA_MAX_IN_FLIGHT_PER_KEY); wait for an answer before sending more"
        )


def entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``<ms>-<seq>`` as a sortable pair; ValueError if it is not one."""
    match = _ENTRY_ID.fullmatch(entry_id)
    key = (int(match.group(1)), int(match.group(2))) if match else None
    if key is None or max(key) >= 2**64:  # Redis's parts are unsigned 64-bit
        raise ValueError(f"expected a stream entry id like 1700000000000-0, got {entry_id[:40]!r}")
    return key


@dataclass(frozen=True)
class Job:
    """One queued request as a worker sees it. ``body`` is the msgpack request the gateway accepted
    (always with its ``features`` or ``image``: a worker never depends on the gateway's image cache).
    ``stream``: a client reads the answer as it is generated (:meth:`WorkerQueue.publish_partial`).
    ``scope``: the tenant (the gateway's client id) whose cached image prefixes this request may
    use; a worker never answers one tenant from another's prefix cache entry, whose speed would tell
    it that someone else asked about the same image."""

    entry_id: str
    model: str
    request_id: str
    reply_to: str
    deadline_ms: int
    enqueued_ms: int
    body: bytes
    scope: str
    deliveries: int = 1
    stream: bool = False

    def fields(self) -> dict[str, bytes | str | int]:
        """Stream entry fields (the entry id is the stream's own); ``stream`` only when set."""
        entry: dict[str, bytes | str | int] = {
            "request_id": self.request_id,
            "model": self.model,
            "reply_to": self.reply_to,
            "deadline_ms": self.deadline_ms,
            "enqueued_ms": self.enqueued_ms,
            "request": self.body,
            "scope": self.scope,
        }
        if self.stream:
            entry["stream"] = 1
        return entry

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        """Parse stream entry fields; ValueError (naming the field) if one is missing or malformed."""
        try:
            return cls(
                entry_id=entry_id,
                model=fields[b"model"].decode(),
                request_id=fields[b"request_id"].decode(),
                reply_to=fields[b"reply_to"].decode(),
                deadline_ms=int(fields[b"deadline_ms"]),
                enqueued_ms=int(fields[b"enqueued_ms"]),
                body=fields[b"request"],
                # An entry queued by a gateway older than the field shares its prefix with no one.
                scope=fields.get(b"scope", b"entry:" + entry_id.encode()).decode(),
                stream=fields.get(b"stream") == b"1",
            )
        except KeyError as exc:
            raise ValueError(f"stream entry {entry_id} has no field {exc.args[0]!r}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"stream entry {entry_id} is malformed: {exc}") from None


@dataclass(frozen=True)
class Reply:
    """A worker's answer (``code`` empty) or error (``code`` set) for one request id.

    ``prompt_tokens`` and ``completion_tokens`` count the model's tokens (the chat route's
    ``usage``); ``unknown_words`` are question words the tokenizer cannot spell.
    """

    request_id: str
    model: str
    answer: str = ""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    code: str = ""
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unknown_words: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.code

    @classmethod
    def failure(cls, job: Job, error: AlignedVQError) -> Reply:
        return cls(request_id=job.request_id, model=job.model, code=error.code, message=error.message)

    def pack(self) -> bytes:
        # vars(), not asdict(): the fields are flat, and asdict's deep copy cost 5 us per reply.
        packed: bytes = msgpack.packb(vars(self), use_bin_type=True)  # msgpack ships no type hints
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> Reply:
        """ValueError if ``data`` is not a reply map (replies come from our own workers, still checked).

        Fields this version does not know are dropped, so a newer worker's reply still reads.
        """
        try:
            packed = msgpack.unpackb(data, raw=False, max_map_len=32, max_array_len=MAX_QUESTION_CHARS)
            return cls(**{name: value for name, value in packed.items() if name in _REPLY_FIELDS})
        except (
            TypeError,
            ValueError,
            AttributeError,
            msgpack.ExtraData,
            msgpack.FormatError,
            msgpack.StackError,
        ) as exc:
            raise ValueError(f"malformed reply: {type(exc).__name__}: {exc}") from None

    def response(self) -> VQAResponse:
        """The client's response; raises the reported error if this reply is one."""
        if not self.ok:
            raise error_from_code(self.code, self.message)
        return VQAResponse(
            request_id=self.request_id,
            model=self.model,
            answer=self.answer,
            queue_ms=self.queue_ms,
            compute_ms=self.compute_ms,
            batch_size=self.batch_size,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            unknown_words=self.unknown_words,
        )


_REPLY_FIELDS = frozenset(f.name for f in fields(Reply))


@dataclass(frozen=True)
class PartialEntry:
    """One entry of a streamed request's partial stream: new ``text``, or (``reply`` set) the end."""

    entry_id: str
    text: str = ""
    reply: Reply | None = None


@dataclass
class Claimed:
    """Result of a claim pass: entries to process now, and entries moved to the dead-letter stream."""

    jobs: list[Job] = field(default_factory=list)
    dead: list[Job] = field(default_factory=list)


class GatewayQueue(Protocol):
    """The API's side of the queue (async). Errors: QueueUnavailable, DeadlineExceeded, and a
    :class:`Ticket`'s Overloaded or RateLimited."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise QueueUnavailable unless the queue answers."""

    async def submit(self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket) -> Reply:
        """Enqueue (once per request id) and wait for the reply until ``deadline_ms``."""

    async def enqueue_streamed(
        self, request: VQARequest, body: bytes, deadline_ms: int, ticket: Ticket
    ) -> Reply | None:
        """Enqueue (once per request id) a request whose answer is read with :meth:`read_partials`;
        the stored reply if the request id already finished, else None. Joining a request queued
        without streaming still ends its partial stream with the reply."""

    async def read_partials(
        self, model: str, request_id: str, after: str, block_ms: int
    ) -> list[PartialEntry]:
        """Entries of the request's partial stream after entry id ``after`` (``0-0``: all), waiting
        at most ``block_ms`` for the first (0: no wait); empty if none came."""

    async def reserve_id(self, model: str, request_id: str, digest: bytes, ttl_ms: int) -> bool:
        """Bind ``request_id`` to the request ``digest`` for ``ttl_ms``; False when it is already
        bound to a different digest (the id was reused for another request)."""

    async def backlog(self, model: str) -> int: ...

    async def standing(self, scope: str, model: str, request_id: str) -> Standing:
        """Where a request stands before it is enqueued: whether the queue knows it (in flight or
        answered: an enqueue joins it, or returns the answer) and how many entries its tenant has in
        flight (what ``max_in_flight`` of a :class:`Ticket` counts)."""

    async def model_names(self) -> list[str]: ...

    async def model_info(self, model: str) -> bytes | None:
        """The JSON a worker published for ``model`` (see gateway.served_models.ModelInfo), or None."""

    async def bundle(self, sha256: str) -> bytes | None: ...

    async def live_workers(self, model: str) -> int: ...

    async def worker_seen_within(self, model: str, grace_ms: int) -> bool:
        """Whether some worker of ``model`` was live at any time in the last ``grace_ms``."""


class WorkerQueue(Protocol):
    """A worker's side of one model's queue (sync: the worker thread blocks on the model anyway)."""

    model: str
    consumer: str

    def ensure_group(self) -> None:
        """Create the consumer group if it is missing (first worker, or a Redis that lost its data)."""

    def publish(self, info: bytes, bundle: bytes, sha256: str) -> None: ...

    def beat(self, status: bytes, ttl_s: float, info: bytes, bundle: bytes, sha256: str) -> None:
        """Refresh this worker's heartbeat; republish model info and bundle if they went missing."""

    def leave(self) -> None:
        """Remove this worker's heartbeat (clean shutdown)."""

    def live_workers(self, host: str | None = None) -> int:
        """Live workers of this model (worker ids start with their host name: a pod's name in k8s)."""

    def read(self, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new entries, blocking at most ``block_ms`` for the first one (0: no wait)."""

    def claim(self, count: int) -> Claimed:
        """Take over entries idle past VQA_CLAIM_IDLE_MS; dead-letter those delivered too often."""

    def publish_partial(self, job: Job, text: str) -> None:
        """Append ``text``, the answer's newest part, to ``job``'s partial stream; nothing unless
        ``job.stream`` (or ``text`` is empty)."""

    def finish(self, done: list[tuple[Job, Reply]]) -> None:
        """Reply to every waiter, store successful results, end the partial streams of streamed
        requests with their reply, acknowledge and delete the entries."""

    def backlog(self) -> int: ...

    def close(self) -> None: ...
