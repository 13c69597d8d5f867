"""``GET /v1/models`` (what is served, by whom) and ``GET /v1/models/{name}/edge-bundle``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel

from ...errors import BundleUnavailable, UnknownModel, error_responses
from ...served_models import ModelInfo
from ..deps import AUTH_ERRORS, Authorized, QueueDep, RegistryDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Authorized])

BUNDLE_MEDIA_TYPE = "application/octet-stream"


class ServedModelOut(ModelInfo):
    """A served model: its split site, geometry, codebook and bundle hashes, and live workers."""

    live_workers: int


class ModelList(BaseModel):
    models: list[ServedModelOut]


@router.get("/models", response_model=ModelList, responses=error_responses(*AUTH_ERRORS))
async def list_models(registry: RegistryDep, queue: QueueDep) -> ModelList:
    served = await registry.all()
    return ModelList(
        models=[
            ServedModelOut(**m.info.model_dump(), live_workers=await queue.live_workers(m.info.name))
            for m in served
        ]
    )


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
