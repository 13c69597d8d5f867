r"""What the gateway serves, as published by the workers.

Workers load the model and quantizer, export the edge bundle and publish a :class:`ModelInfo` plus
the bundle bytes into the queue (the gateway never imports torch, so it learns everything from
there). :class:`Registry` caches them for ``VQA_REGISTRY_TTL_MS`` as :class:`ServedModel`\ s, each
with the :class:`~gateway.validation.StreamValidator` that requests are checked with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from edge_client.bundle import EdgeBundle
from edge_client.errors import BundleError

from .errors import BundleUnavailable, QueueUnavailable, ServerError, UnknownModel
from .queue import GatewayQueue
from .validation import StreamValidator

__all__ = ["INFO_VERSION", "ModelInfo", "Registry", "ServedModel"]

log = logging.getLogger(__name__)

INFO_VERSION = 1


class ModelInfo(BaseModel):
    """What a worker publishes about the model it serves (JSON under ``{prefix}:model:{name}``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = INFO_VERSION
    name: str
    quantizer: str
    split_site: str
    tokens: int
    groups: int
    stages: int
    codebook_size: int
    code_dim: int
    stat_bits: int
    codebook_hash: str
    bundle_sha256: str
    bundle_bytes: int
    image_size: int
    # The most new tokens a request may ask for (a one-token question without history; longer
    # prompts leave fewer positions). 64, the old protocol limit, for infos published without it.
    max_new_tokens: int = 64

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelInfo:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ServerError(f"published model info is malformed: {exc.errors()[0]['msg']}") from None


@dataclass
class ServedModel:
    """A served model: its published info, edge bundle bytes and the validator of its streams."""

    info: ModelInfo
    bundle: bytes
    streams: StreamValidator
    fetched: float = field(default_factory=time.monotonic)

    @classmethod
    def from_published(cls, info: ModelInfo, bundle: bytes) -> ServedModel:
        try:
            parsed = EdgeBundle.from_bytes(bundle)
        except BundleError as exc:
            raise BundleError(
                f"the published edge bundle of {info.name} is unreadable: {exc.message}"
            ) from None
        if parsed.codebook_hash != info.codebook_hash or parsed.sha256 != info.bundle_sha256:
            raise BundleError(
                f"the published edge bundle of {info.name} does not match its model info: codebook "
                f"{parsed.codebook_hash[:16]} vs {info.codebook_hash[:16]}, sha256 {parsed.sha256[:16]} "
                f"vs {info.bundle_sha256[:16]}"
            )
        streams = StreamValidator(info, info.codebook_hash, parsed.freqs, parsed.ranking)
        return cls(info=info, bundle=bundle, streams=streams)


class Registry:
    """Served models, cached for ``ttl_ms``; a Redis outage serves the last known copy."""

    def __init__(self, queue: GatewayQueue, ttl_ms: int) -> None:
        self.queue = queue
        self.ttl_s = ttl_ms / 1000
        self._cache: dict[str, ServedModel] = {}

    async def get(self, name: str) -> ServedModel:
        cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached.fetched < self.ttl_s:
            return cached
        try:
            raw = await self.queue.model_info(name)
        except QueueUnavailable:
            if cached is not None:
                return cached
            raise
        if raw is None:
            self._cache.pop(name, None)
            served = await self.queue.model_names()
            raise UnknownModel(f"model {name!r} is not served here; served models: {served}")
        info = ModelInfo.from_json(raw)
        if cached is not None and cached.info == info:
            cached.fetched = time.monotonic()
            return cached
        bundle = await self.queue.bundle(info.bundle_sha256)
        if bundle is None:
            raise BundleUnavailable(f"the edge bundle {info.bundle_sha256[:16]} of {name} is not stored")
        model = ServedModel.from_published(info, bundle)
        self._cache[name] = model
        return model

    async def all(self) -> list[ServedModel]:
        """Every published model whose info and bundle are present."""
        models = []
        for name in await self.queue.model_names():
            try:
                models.append(await self.get(name))
            except (UnknownModel, BundleUnavailable):
                continue
        return models
