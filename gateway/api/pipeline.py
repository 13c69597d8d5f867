"""The one path of every answering route (``/v1/vqa``, ``/v1/chat/completions``), whatever its format.

1. :func:`admit`: the timeout cap; ``image_ref`` resolved from the tenant's image cache (410
   ``image_expired`` when it is not there); every check of :mod:`gateway.validation` against the
   served model; 503 at once when no worker is alive; the request id scoped to the caller and bound
   to the request (:mod:`gateway.api.idempotency`).
2. :func:`answer` enqueues and awaits the reply; or :func:`enqueue_streamed` enqueues and
   :func:`partials` reads the answer as the worker writes it (docs/conversations.md, "Streaming").
   Either way the stream just sent is kept for follow-ups (:mod:`gateway.api.image_cache`) first.
3. :func:`respond`: the client's reply (its own request id, the ``image_ref`` echoed), or the
   worker's error raised.

Routes differ only in how they parse the request and format the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.concurrency import run_in_threadpool

from edge_client.bitstream import read_header
from edge_client.protocol import RequestError, VQARequest, VQAResponse, image_ref

from ..errors import DeadlineExceeded, ImageExpired, NoWorker, RequestIdReused
from ..queue import PartialEntry, Reply, Ticket, entry_key, now_ms
from ..validation import StreamValidator, check_request
from .deps import AppState
from .idempotency import binding_id, request_digest, scoped_request

__all__ = [
    "KEEPALIVE_S",
    "Admitted",
    "admit",
    "answer",
    "enqueue_streamed",
    "last_event_id",
    "resume_cursor",
    "partials",
    "respond",
]

# Ids of a finished request's answer replayed from its stored reply once its partial stream has
# expired: below any real entry id, so a resume from them never skips real entries.
_REPLAY_TEXT_ID, _REPLAY_REPLY_ID = "0-1", "0-2"
# Longest silence on a stream (while the request waits in the queue): under common proxy idle
# timeouts (60 s) and the edge client's read timeout (30 s).
KEEPALIVE_S = 10


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check: ``scoped`` (features resolved, id scoped) and its msgpack
    ``body`` are what the queue sees; ``keep`` is a stream to store for follow-ups."""

    request_id: str
    scoped: VQARequest
    body: bytes
    deadline_ms: int
    client_id: str
    image_ref: bytes | None
    keep: bytes | None


async def admit(app: AppState, vqa: VQARequest, client_id: str, arrived_ms: int) -> Admitted:
    """Step 1 of the module docstring; raises the 4xx/503 the request deserves."""
    settings = app.settings
    if vqa.timeout_ms is not None and vqa.timeout_ms > settings.max_timeout_ms:
        raise RequestError(
            f"field 'timeout_ms': expected at most {settings.max_timeout_ms} on this gateway "
            f"(VQA_MAX_TIMEOUT_MS), got {vqa.timeout_ms}",
            "timeout_ms",
        )
    ref, keep = vqa.image_ref, None
    if ref is not None:
        features = await app.images.get(client_id, ref) if settings.image_cache_bytes else None
        if features is None:
            raise ImageExpired(
                f"image_ref {ref.hex()} names no feature stream this API key sent in the last "
                f"{settings.image_ttl_s} s (VQA_IMAGE_TTL_S); send the features again"
            )
        model = vqa.model or read_header(features).model
        vqa = vqa.model_copy(update={"features": features, "image_ref": None, "model": model})
    elif vqa.features is not None and settings.image_cache_bytes:
        ref, keep = image_ref(vqa.features), vqa.features
    served = await app.registry.get(vqa.model)
    if vqa.max_new_tokens > served.info.max_new_tokens:
        raise RequestError(
            f"field 'max_new_tokens': expected at most {served.info.max_new_tokens} for {vqa.model}, "
            f"got {vqa.max_new_tokens}",
            "max_new_tokens",
        )
    digest = request_digest(vqa)  # hashes the whole payload, up to a 16 MB image: once
    scoped, body = scoped_request(vqa, client_id, digest)
    timeout_ms = vqa.timeout_ms or settings.request_timeout_ms
    deadline_ms = arrived_ms + timeout_ms
    limits = dict(max_question_chars=settings.max_question_chars, max_image_pixels=settings.max_image_pixels)
    if vqa.image is None:
        # A feature stream decodes in well under a millisecond (even rANS at LLaVA-1.5 geometry) and
        # holds the GIL throughout: a worker thread would add a hand-off and gain no parallelism.
        check_request(vqa, served.streams, **limits)
    else:
        await _check_image(app, scoped, client_id, served.streams, deadline_ms, limits)
    if not await app.queue.worker_seen_within(vqa.model, settings.no_worker_grace_ms):
        raise NoWorker(
            f"no worker of model {vqa.model} has been live for {settings.no_worker_grace_ms} ms "
            "(VQA_NO_WORKER_GRACE_MS); the request was not queued, retry once a worker is up"
        )
    binding_ms = settings.result_ttl_s * 1000 + settings.max_timeout_ms  # outlives the stored result
    binding = binding_id(vqa.request_id, client_id)
    if not await app.queue.reserve_id(vqa.model, binding, digest, binding_ms):
        raise RequestIdReused(
            f"request_id {vqa.request_id!r} was already used for a different request; "
            "use a new id for a new question (retries must repeat the same request)"
        )
    if now_ms() >= deadline_ms:  # a slow image check: no worker could answer it in time
        raise DeadlineExceeded(
            f"the deadline ({timeout_ms} ms after arrival) passed while the request was checked; "
            "it was not queued"
        )
    return Admitted(vqa.request_id, scoped, body, deadline_ms, client_id, ref, keep)


async def _check_image(
    app: AppState,
    scoped: VQARequest,
    client_id: str,
    streams: StreamValidator,
    deadline_ms: int,
    limits: dict[str, int],
) -> None:
    """Check a cloud-only request, its image decoded in one of ``VQA_IMAGE_DECODES`` slots (in a
    worker thread: Pillow releases the GIL while it decodes).

    A tenant at its in-flight cap, its images waiting here for a slot included, is refused before it
    waits, unless the queue knows the request already (a retry joins it or gets its answer). No
    slot free before the deadline: 504, not queued.
    """
    ticket = _ticket(app, client_id)
    if ticket.max_in_flight:
        standing = await app.queue.standing(client_id, scoped.model, scoped.request_id)
        waiting = app.image_waiting.get(client_id, 0)
        if not standing.known and standing.in_flight + waiting >= ticket.max_in_flight:
            raise ticket.busy()
    app.image_waiting[client_id] = app.image_waiting.get(client_id, 0) + 1
    try:
        try:
            async with asyncio.timeout(max(deadline_ms - now_ms(), 0) / 1000):
                await app.image_decodes.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                "the deadline passed while the image waited for a decode slot (VQA_IMAGE_DECODES); "
                "it was not queued"
            ) from None
        try:
            await run_in_threadpool(check_request, scoped, streams, **limits)
        finally:
            app.image_decodes.release()
    finally:
        app.image_waiting[client_id] -= 1
        if not app.image_waiting[client_id]:
            del app.image_waiting[client_id]


async def _keep(app: AppState, admitted: Admitted) -> Admitted:
    """Store the stream just sent for follow-ups, before it is queued: no answer can go out, and no
    follow-up come back, ahead of it. The reply names it only if it was kept."""
    if admitted.keep is None or admitted.image_ref is None:
        return admitted
    if await app.images.put(admitted.client_id, admitted.image_ref, admitted.keep):
        return admitted
    return replace(admitted, image_ref=None)


def _ticket(app: AppState, client_id: str) -> Ticket:
    """The caller's queue ticket: its tenant (whose prefix cache entries the worker may use) and
    the backlog and per-key in-flight caps."""
    settings = app.settings
    return Ticket(client_id, settings.max_backlog, settings.max_in_flight_per_key)


async def answer(app: AppState, admitted: Admitted) -> VQAResponse:
    """Enqueue (once per request id), await the reply, :func:`respond`."""
    admitted = await _keep(app, admitted)
    with app.metrics.waiting.track_inprogress():
        reply = await app.queue.submit(
            admitted.scoped, admitted.body, admitted.deadline_ms, _ticket(app, admitted.client_id)
        )
    return respond(app, admitted, reply)


async def enqueue_streamed(app: AppState, admitted: Admitted) -> tuple[Admitted, Reply | None]:
    """Enqueue a streamed request: the request as admitted (see :func:`_keep`), and its stored
    reply if its id already finished (read the rest with :func:`partials`). Errors (429) come
    before any event is sent, as HTTP statuses."""
    admitted = await _keep(app, admitted)
    stored = await app.queue.enqueue_streamed(
        admitted.scoped, admitted.body, admitted.deadline_ms, _ticket(app, admitted.client_id)
    )
    return admitted, stored


async def partials(
    app: AppState, admitted: Admitted, stored: Reply | None, after: str | None
) -> AsyncIterator[PartialEntry | None]:
    """The answer's entries after event id ``after`` (None: from the start), the last one with the
    reply; DeadlineExceeded if none ends it in time. ``None`` after ``KEEPALIVE_S`` without one:
    send a comment, so that proxies and the client's read timeout see a live connection.

    A finished request (``stored``) replays its partial stream while it lives, then its stored
    answer as one text entry (left out when resuming: the client has part of it) and the reply.
    """
    queue, model, rid = app.queue, admitted.scoped.model, admitted.scoped.request_id
    cursor = after or "0-0"
    if stored is not None:
        entries = await queue.read_partials(model, rid, cursor, 0)
        if not entries or entries[-1].reply is None:
            entries = [PartialEntry(_REPLAY_REPLY_ID, reply=stored)]
            if after is None:
                entries.insert(0, PartialEntry(_REPLAY_TEXT_ID, text=stored.answer))
        for entry in entries:
            yield entry
        return
    with app.metrics.waiting.track_inprogress():
        quiet_since = now_ms()
        while True:
            left = admitted.deadline_ms - now_ms()
            if left <= 0:
                raise DeadlineExceeded(
                    "no answer before the request's deadline (its timeout_ms, else VQA_REQUEST_TIMEOUT_MS)"
                )
            entries = await queue.read_partials(model, rid, cursor, min(left, KEEPALIVE_S * 1000))
            if not entries and now_ms() - quiet_since >= KEEPALIVE_S * 1000:
                quiet_since = now_ms()
                yield None
            for entry in entries:
                quiet_since, cursor = now_ms(), entry.entry_id
                yield entry
                if entry.reply is not None:
                    return


async def resume_cursor(app: AppState, admitted: Admitted, after: str) -> str:
    """Where a resumed stream continues: after ``after``, an id this request's partial stream sent;
    422 for an id past its newest entry, which no entry would ever follow. With no entries yet (a
    new attempt replaced an earlier one's stream), from the start: every entry is new to the
    client."""
    sent = await app.queue.read_partials(admitted.scoped.model, admitted.scoped.request_id, "0-0", 0)
    if not sent:
        return "0-0"
    newest = sent[-1].entry_id
    if entry_key(after) > entry_key(newest):
        raise RequestError(
            f"header 'Last-Event-ID': {after} names no event of this request (its newest is {newest})",
            "Last-Event-ID",
        )
    return after


def respond(app: AppState, admitted: Admitted, reply: Reply) -> VQAResponse:
    """The client's reply: its own request id, the ``image_ref`` to name its stream by; raises the
    error the worker reported instead."""
    response = reply.response().model_copy(
        update={"request_id": admitted.request_id, "image_ref": admitted.image_ref}
    )
    app.metrics.observe_answer(response)
    return response


def last_event_id(value: str | None) -> str | None:
    """A ``Last-Event-ID`` header, checked: a resume names an entry id we sent."""
    if value is None:
        return None
    try:
        entry_key(value)
    except ValueError as exc:
        raise RequestError(f"header 'Last-Event-ID': {exc}", "Last-Event-ID") from None
    return value
