"""``POST /v1/vqa``: decode, admit, then answer, as one reply or (``Accept: text/event-stream``) streamed.

The hot path: it reads the app's state directly instead of through dependencies (see
:mod:`gateway.api.deps`); :func:`~gateway.api.deps.authorize` still runs first, as a router
dependency. Everything between decoding and formatting is :mod:`gateway.api.pipeline`, shared with
the OpenAI-compatible route. Streamed events (docs/conversations.md): ``token`` with
``{"text"}``, then ``done`` with the reply as JSON, or ``error`` with ``{"error": {"code",
"message"}, "status"}`` (the HTTP status the error has elsewhere); ``id`` is the partial stream's
entry id, which ``Last-Event-ID`` resumes after (an error has none: a resume meets it again).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from edge_client.errors import (
    AlignedVQError,
    CorruptStreamError,
    EntropyModelError,
    ImageError,
    IndexRangeError,
    TruncatedStreamError,
    UnsupportedVersionError,
)
from edge_client.protocol import (
    CONTENT_TYPE,
    RequestError,
    VQARequest,
    VQAResponse,
    decode_request,
    encode_response,
)
from edge_client.sse import MEDIA_TYPE as EVENT_STREAM
from edge_client.sse import format_event

from ...errors import (
    BodyTooLarge,
    BundleUnavailable,
    CodebookMismatch,
    DeadLettered,
    DeadlineExceeded,
    ImageExpired,
    NoWorker,
    Overloaded,
    QuestionTooLong,
    RequestIdReused,
    StreamMismatch,
    UnknownModel,
    UnreadableQuestion,
    UnsupportedMediaType,
    error_body,
    error_responses,
    http_status,
)
from ...queue import Reply, now_ms
from .. import pipeline
from ..deps import AUTH_ERRORS, AppState, Authorized, read_body, state

router = APIRouter(prefix="/v1", tags=["vqa"], dependencies=[Authorized])

# Every way POST /v1/vqa can fail, for its OpenAPI entry (tests/gateway/api/test_openapi.py checks
# that each one is reachable and that nothing else is returned).
VQA_ERRORS = (
    *AUTH_ERRORS,
    BodyTooLarge,
    UnsupportedMediaType,
    RequestError,
    QuestionTooLong,
    UnreadableQuestion,
    StreamMismatch,
    ImageError,
    TruncatedStreamError,
    CorruptStreamError,
    UnsupportedVersionError,
    EntropyModelError,
    IndexRangeError,
    UnknownModel,
    BundleUnavailable,
    CodebookMismatch,
    ImageExpired,
    RequestIdReused,
    Overloaded,
    NoWorker,
    DeadLettered,
    DeadlineExceeded,
)
# The msgpack request and reply as schemas, so schema-driven tools can build and serialise them.
_REPLY_SCHEMA = {"$ref": "#/components/schemas/VQAResponse"}
# Streamed replies must reach the client as they are written: no caching, no proxy buffering.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it


@router.post(
    "/vqa",
    response_model=VQAResponse,
    responses={
        200: {
            "description": "The answer, as JSON or (with Accept: application/msgpack) as a msgpack map; "
            "with Accept: text/event-stream, as Server-Sent Events (token, done or error)",
            "content": {
                CONTENT_TYPE: {"schema": _REPLY_SCHEMA},
                EVENT_STREAM: {"schema": {"type": "string"}},
            },
        },
        **error_responses(*VQA_ERRORS),
    },
    summary="Answer a question about an image (AlignedVQ features, a cloud-only image or an image_ref)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {CONTENT_TYPE: {"schema": VQARequest.model_json_schema()}},
            "description": "A msgpack map (edge_client.protocol.VQARequest); bytes fields are msgpack "
            "bin. timeout_ms is further capped by the gateway's VQA_MAX_TIMEOUT_MS (422 above it).",
        }
    },
)
async def ask(
    request: Request,
    accept: Annotated[str, Header()] = "application/json",
    last_event_id: Annotated[
        str | None, Header(description="Resume a stream after this event id (with text/event-stream)")
    ] = None,
) -> VQAResponse | Response:
    app = state(request)
    body = await read_body(request, app.settings.max_body_bytes)
    arrived = now_ms()
    vqa = decode_request(body)
    streamed = EVENT_STREAM in accept
    after = pipeline.last_event_id(last_event_id) if streamed else None
    admitted = await pipeline.admit(app, vqa, request.state.client_id, arrived)
    if streamed:
        admitted, stored = await pipeline.enqueue_streamed(app, admitted)
        if after is not None:
            after = await pipeline.resume_cursor(app, admitted, after)
        events = _events(request, app, admitted, stored, after)
        return StreamingResponse(events, media_type=EVENT_STREAM, headers=STREAM_HEADERS)
    response = await pipeline.answer(app, admitted)
    if CONTENT_TYPE in accept:
        return Response(encode_response(response), media_type=CONTENT_TYPE)
    return response


async def _events(
    request: Request, app: AppState, admitted: pipeline.Admitted, stored: Reply | None, after: str | None
) -> AsyncIterator[bytes]:
    try:
        async for entry in pipeline.partials(app, admitted, stored, after):
            if entry is None:
                yield KEEPALIVE
            elif entry.reply is None:
                yield format_event(json.dumps({"text": entry.text}), "token", entry.entry_id)
            else:
                done = pipeline.respond(app, admitted, entry.reply)
                yield format_event(done.model_dump_json(), "done", entry.entry_id)
    except AlignedVQError as exc:
        # No id: a client that resumes from the last token's id meets the same end again.
        request.state.error_code = exc.code  # the status went out as 200; the metrics keep the code
        data = {**error_body(exc.code, exc.message), "status": http_status(exc)}
        yield format_event(json.dumps(data), "error")
