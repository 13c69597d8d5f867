"""``POST /v1/chat/completions``: OpenAI's chat API on the same keys, limits, queue and workers.

The route parses the JSON body (:mod:`gateway.api.openai_chat` maps it to a VQARequest), then
takes :mod:`gateway.api.pipeline`, the path of ``/v1/vqa``, and formats the reply as a
``chat.completion``, or with ``"stream": true`` as ``chat.completion.chunk`` events ending in
``data: [DONE]``. Every error is an OpenAI error object (the app's error handler formats them for
this path), mid-stream ones too. Chat requests carry no request id of their own: each gets a fresh
one, so they are never joined with a retry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from edge_client.errors import AlignedVQError
from edge_client.protocol import RequestError, new_request_id
from edge_client.sse import MEDIA_TYPE as EVENT_STREAM
from edge_client.sse import format_event

from ...errors import RequestIdReused, error_responses, http_status
from ...queue import Reply, now_ms
from .. import pipeline
from ..deps import AppState, Authorized, read_body, state
from ..openai_chat import (
    CHAT_PATH,
    ChatCompletion,
    ChatRequest,
    Delta,
    OpenAIErrorBody,
    chunk,
    completion,
    error_object,
    to_request,
)
from .vqa import KEEPALIVE, STREAM_HEADERS, VQA_ERRORS

router = APIRouter(tags=["chat"], dependencies=[Authorized])

CHAT_ERRORS = tuple(error for error in VQA_ERRORS if error is not RequestIdReused)
JSON = "application/json"
# A data: URL spends 4 characters on 3 bytes: the same image fits as on /v1/vqa, plus the JSON.
_BASE64_SLACK = 64 * 1024


@router.post(
    CHAT_PATH,
    response_model=ChatCompletion,
    responses={
        200: {
            "description": 'The completion, or with "stream": true chat.completion.chunk events',
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        **error_responses(*CHAT_ERRORS, body=OpenAIErrorBody),
    },
    summary="OpenAI-compatible chat completion about one image (data: URL or AlignedVQ features)",
    openapi_extra={
        "requestBody": {"required": True, "content": {JSON: {"schema": ChatRequest.model_json_schema()}}}
    },
)
async def chat_completions(request: Request) -> ChatCompletion | Response:
    app = state(request)
    body = await read_body(request, app.settings.max_body_bytes * 4 // 3 + _BASE64_SLACK, JSON)
    arrived = now_ms()
    try:
        chat = ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        # The deepest error is the most telling: "content" as a list of parts rather than as text.
        worst = max(exc.errors(), key=lambda error: len(error["loc"]))
        where = _where(worst["loc"])
        raise RequestError(f"{where}: {worst['msg']}", where) from None
    admitted = await pipeline.admit(app, to_request(chat, new_request_id()), request.state.client_id, arrived)
    created = arrived // 1000
    if chat.stream:
        admitted, stored = await pipeline.enqueue_streamed(app, admitted)
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        chunks = _chunks(request, app, admitted, stored, created, chat.max_new_tokens, include_usage)
        return StreamingResponse(chunks, media_type=EVENT_STREAM, headers=STREAM_HEADERS)
    return completion(await pipeline.answer(app, admitted), created, chat.max_new_tokens)


async def _chunks(
    request: Request,
    app: AppState,
    admitted: pipeline.Admitted,
    stored: Reply | None,
    created: int,
    max_new_tokens: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    rid, model = admitted.request_id, admitted.scoped.model
    yield format_event(chunk(rid, created, model, Delta(role="assistant", content="")).model_dump_json())
    try:
        async for entry in pipeline.partials(app, admitted, stored, None):
            if entry is None:
                yield KEEPALIVE
            elif entry.reply is None:
                if entry.text:
                    delta = Delta(content=entry.text)
                    yield format_event(chunk(rid, created, model, delta).model_dump_json())
            else:
                done = pipeline.respond(app, admitted, entry.reply)
                last = chunk(rid, created, model, None, done=(done, max_new_tokens))
                yield format_event(last.model_dump_json())
                if include_usage:
                    yield format_event(chunk(rid, created, model, None, usage=done).model_dump_json())
    except AlignedVQError as exc:
        request.state.error_code = exc.code  # the status went out as 200; the metrics keep the code
        yield format_event(json.dumps(error_object(http_status(exc), exc.code, exc.message)))
    yield format_event("[DONE]")


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a JSON path (``messages[1].content[0].alignedvq.features``),
    without the names pydantic gives union members: type names, and the tag of a tagged content
    part, which pydantic puts before the part's field of the same name (``alignedvq.alignedvq``)."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif 0 < i < len(loc) - 1 and isinstance(loc[i - 1], int) and loc[i + 1] == part:
            continue  # the tag
        elif "[" not in part and part not in ("str", "int", "bool", "function-after"):
            path += f".{part}" if path else part
    return path or "body"
