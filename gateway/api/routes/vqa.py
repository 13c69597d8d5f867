"""``POST /v1/vqa``: decode, check against the served codebook, enqueue, await, respond.

The hot path: it reads the app's state directly instead of through dependencies (see
:mod:`gateway.api.deps`); :func:`~gateway.api.deps.authorize` still runs first, as a router dependency.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from edge_client.protocol import CONTENT_TYPE, VQAResponse, decode_request, encode_response

from ...errors import ERROR_RESPONSES, NoWorker, RequestIdReused
from ...queue import now_ms
from ...validation import check_request
from ..deps import Authorized, read_body, state
from ..idempotency import request_digest, scoped_request

router = APIRouter(prefix="/v1", tags=["vqa"], dependencies=[Authorized])


@router.post(
    "/vqa",
    response_model=VQAResponse,
    responses=ERROR_RESPONSES,
    summary="Answer a question about an image (AlignedVQ features or a cloud-only image)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": "A msgpack map, see edge_client.protocol.VQARequest",
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
    served = await app.registry.get(vqa.model)
    limits = dict(max_question_chars=settings.max_question_chars, max_image_pixels=settings.max_image_pixels)
    if vqa.image is None:
        # A feature stream decodes in well under a millisecond (even rANS at LLaVA-1.5 geometry) and
        # holds the GIL throughout: a worker thread would add a hand-off and gain no parallelism.
        check_request(vqa, served.streams, **limits)
    else:  # Pillow releases the GIL while it decodes an image of up to VQA_MAX_IMAGE_PIXELS
        await run_in_threadpool(check_request, vqa, served.streams, **limits)
    budget = min(vqa.timeout_ms or settings.request_timeout_ms, settings.max_timeout_ms)
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
