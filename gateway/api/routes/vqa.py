"""``POST /v1/vqa``: decode, check against the served codebook, enqueue, await, respond.

The hot path: it reads the app's state directly instead of through dependencies (see
:mod:`gateway.api.deps`); :func:`~gateway.api.deps.authorize` still runs first, as a router dependency.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from edge_client.errors import (
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

from ...errors import (
    BodyTooLarge,
    BundleUnavailable,
    CodebookMismatch,
    DeadLettered,
    DeadlineExceeded,
    NoWorker,
    Overloaded,
    QuestionTooLong,
    RequestIdReused,
    StreamMismatch,
    UnknownModel,
    UnsupportedMediaType,
    error_responses,
)
from ...queue import now_ms
from ...validation import check_request
from ..deps import AUTH_ERRORS, Authorized, read_body, state
from ..idempotency import request_digest, scoped_request

router = APIRouter(prefix="/v1", tags=["vqa"], dependencies=[Authorized])

# Every way POST /v1/vqa can fail, for its OpenAPI entry (tests/gateway/api/test_openapi.py checks
# that each one is reachable and that nothing else is returned).
VQA_ERRORS = (
    *AUTH_ERRORS,
    BodyTooLarge,
    UnsupportedMediaType,
    RequestError,
    QuestionTooLong,
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
    RequestIdReused,
    Overloaded,
    NoWorker,
    DeadLettered,
    DeadlineExceeded,
)
# The msgpack request and reply as schemas, so schema-driven tools can build and serialise them.
_REPLY_SCHEMA = {"$ref": "#/components/schemas/VQAResponse"}


@router.post(
    "/vqa",
    response_model=VQAResponse,
    responses={
        200: {
            "description": "The answer, as JSON or (with Accept: application/msgpack) as a msgpack map",
            "content": {CONTENT_TYPE: {"schema": _REPLY_SCHEMA}},
        },
        **error_responses(*VQA_ERRORS),
    },
    summary="Answer a question about an image (AlignedVQ features or a cloud-only image)",
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
    request: Request, accept: Annotated[str, Header()] = "application/json"
) -> VQAResponse | Response:
    app = state(request)
    settings = app.settings
    body = await read_body(request, settings.max_body_bytes)
    arrived = now_ms()
    vqa = decode_request(body)
    if vqa.timeout_ms is not None and vqa.timeout_ms > settings.max_timeout_ms:
        raise RequestError(
            f"field 'timeout_ms': expected at most {settings.max_timeout_ms} on this gateway "
            f"(VQA_MAX_TIMEOUT_MS), got {vqa.timeout_ms}"
        )
    served = await app.registry.get(vqa.model)
    limits = dict(max_question_chars=settings.max_question_chars, max_image_pixels=settings.max_image_pixels)
    if vqa.image is None:
        # A feature stream decodes in well under a millisecond (even rANS at LLaVA-1.5 geometry) and
        # holds the GIL throughout: a worker thread would add a hand-off and gain no parallelism.
        check_request(vqa, served.streams, **limits)
    else:  # Pillow releases the GIL while it decodes an image of up to VQA_MAX_IMAGE_PIXELS
        await run_in_threadpool(check_request, vqa, served.streams, **limits)
    budget = vqa.timeout_ms or settings.request_timeout_ms
    if not await app.queue.worker_seen_within(vqa.model, settings.no_worker_grace_ms):
        raise NoWorker(
            f"no worker of model {vqa.model} has been live for {settings.no_worker_grace_ms} ms "
            "(VQA_NO_WORKER_GRACE_MS); the request was not queued, retry once a worker is up"
        )
    scoped, scoped_body = scoped_request(vqa, request.state.client_id)
    binding_ms = settings.result_ttl_s * 1000 + settings.max_timeout_ms  # outlives the stored result
    if not await app.queue.reserve_id(vqa.model, scoped.request_id, request_digest(vqa), binding_ms):
        raise RequestIdReused(
            f"request_id {vqa.request_id!r} was already used for a different request; "
            "use a new id for a new question (retries must repeat the same request)"
        )
    with app.metrics.waiting.track_inprogress():
        reply = await app.queue.submit(scoped, scoped_body, arrived + budget, settings.max_backlog)
    response = reply.response().model_copy(update={"request_id": vqa.request_id})
    app.metrics.observe_answer(response)
    if CONTENT_TYPE in accept:
        return Response(encode_response(response), media_type=CONTENT_TYPE)
    return response
