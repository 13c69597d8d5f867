"""``POST /v1/vqa``: decode, check against the served codebook, enqueue, await, respond."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from starlette.concurrency import run_in_threadpool

from edge_client.protocol import CONTENT_TYPE, VQAResponse, decode_request, encode_response

from ...errors import ERROR_RESPONSES
from ...queue import now_ms
from ..deps import Authorized, Body, MetricsDep, QueueDep, RegistryDep, SettingsDep

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
    body: Body,
    settings: SettingsDep,
    queue: QueueDep,
    registry: RegistryDep,
    metrics: MetricsDep,
    accept: Annotated[str, Header()] = "application/json",
) -> VQAResponse | Response:
    arrived = now_ms()
    request = decode_request(body)
    served = await registry.get(request.model)
    limits = dict(max_question_chars=settings.max_question_chars, max_image_pixels=settings.max_image_pixels)
    if request.image is None:
        # A feature stream decodes in well under a millisecond (even rANS at LLaVA-1.5 geometry) and
        # holds the GIL throughout: a worker thread would add a hand-off and gain no parallelism.
        served.check(request, **limits)
    else:  # Pillow releases the GIL while it decodes an image of up to VQA_MAX_IMAGE_PIXELS
        await run_in_threadpool(served.check, request, **limits)
    budget = min(request.timeout_ms or settings.request_timeout_ms, settings.max_timeout_ms)
    with metrics.waiting.track_inprogress():
        reply = await queue.submit(request, body, arrived + budget, settings.max_backlog)
    response = reply.response()
    metrics.observe_answer(response)
    if CONTENT_TYPE in accept:
        return Response(encode_response(response), media_type=CONTENT_TYPE)
    return response
