"""``GET /v1/models`` (what is served, by whom; OpenAI's list shape), ``GET /v1/models/{name}`` and
``GET /v1/models/{name}/edge-bundle``."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel

from ...errors import BundleUnavailable, UnknownModel, error_responses
from ...queue import GatewayQueue
from ...served_models import ModelInfo, ServedModel
from ..deps import AUTH_ERRORS, Authorized, QueueDep, RegistryDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Authorized])

BUNDLE_MEDIA_TYPE = "application/octet-stream"


class ServedModelOut(ModelInfo):
    """A served model as an OpenAI model object (``id``, ``object``, ``created``, ``owned_by``: what
    OpenAI clients read) plus its split site, geometry, codebook and bundle hashes and live workers.
    ``created`` is the time of the reply, as vLLM sets it: the gateway keeps no creation date."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-alignedvq"
    live_workers: int


class ModelList(BaseModel):
    """OpenAI's list shape, so that ``client.models.list()`` of the ``openai`` package reads it."""

    object: Literal["list"] = "list"
    data: list[ServedModelOut]


async def _out(served: ServedModel, queue: GatewayQueue) -> ServedModelOut:
    info = served.info
    live = await queue.live_workers(info.name)
    return ServedModelOut(**info.model_dump(), id=info.name, created=int(time.time()), live_workers=live)


@router.get("/models", response_model=ModelList, responses=error_responses(*AUTH_ERRORS))
async def list_models(registry: RegistryDep, queue: QueueDep) -> ModelList:
    return ModelList(data=[await _out(served, queue) for served in await registry.all()])


@router.get(
    "/models/{name}", response_model=ServedModelOut, responses=error_responses(*AUTH_ERRORS, UnknownModel)
)
async def retrieve_model(name: str, registry: RegistryDep, queue: QueueDep) -> ServedModelOut:
    """One served model (OpenAI's ``client.models.retrieve``)."""
    return await _out(await registry.get(name), queue)


@router.get(
    "/models/{name}/edge-bundle",
    response_class=Response,
    responses={
        200: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "The edge bundle (safetensors)"},
        304: {"description": "If-None-Match matched the bundle's ETag"},
        **error_responses(*AUTH_ERRORS, UnknownModel, BundleUnavailable),
    },
)
async def edge_bundle(
    name: str,
    registry: RegistryDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    served = await registry.get(name)
    etag = f'"{served.info.bundle_sha256}"'
    headers = {
        "ETag": etag,
        "X-Codebook-Hash": served.info.codebook_hash,
        "Cache-Control": "no-cache",  # always revalidate: a worker may publish a new codebook
    }
    if if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{served.info.name}.bundle"'
    return Response(served.bundle, media_type=BUNDLE_MEDIA_TYPE, headers=headers)
