"""What the gateway serves, as published by the workers, and the checks a request must pass.

Workers load the model and quantizer, export the edge bundle and publish a :class:`ModelInfo` plus
the bundle bytes into the queue (the gateway never imports torch, so it learns everything from
there). :class:`Registry` caches them for ``VQA_REGISTRY_TTL_MS``; :class:`ServedModel` checks a
request against the served codebook before anything is queued, so a worker never sees a payload
the gateway should have refused:

1. question length;
2. ``features``: the stream container (:func:`~edge_client.bitstream.read_header`: magic, version,
   lengths, CRC), then header model == request model, codebook hash (409 ``codebook_mismatch``),
   split site, tokens, groups, stages, codebook size, stat bits (422 ``stream_mismatch`` naming the
   field), then a full :func:`~edge_client.bitstream.decode_stream` with the bundle's frequency
   table, which rejects corrupt rANS data and out-of-range indices;
3. ``image``: the pixel count from the image header (``VQA_MAX_IMAGE_PIXELS``) before decoding,
   then a full decode (:func:`~edge_client.preprocess.load_image`).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_client.bitstream import DecodedStream, decode_stream, read_header
from edge_client.bundle import EdgeBundle
from edge_client.errors import BundleError, ImageError
from edge_client.preprocess import load_image
from edge_client.protocol import VQARequest
from edge_client.ranking import NeighbourRanks

from .errors import (
    BundleUnavailable,
    CodebookMismatch,
    QuestionTooLong,
    QueueUnavailable,
    ServerError,
    StreamMismatch,
    UnknownModel,
)
from .queue import GatewayQueue

__all__ = ["INFO_VERSION", "ModelInfo", "Registry", "ServedModel", "check_image"]

log = logging.getLogger(__name__)

INFO_VERSION = 1
# The formats the wire format promises (edge_client.protocol). Opening only these keeps Pillow's
# other parsers (EPS hands files to Ghostscript, for one) away from untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Header fields compared one by one against the served quantizer, in the order they are reported.
_STREAM_FIELDS = ("split_site", "tokens", "groups", "stages", "codebook_size", "stat_bits")


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

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelInfo:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ServerError(f"published model info is malformed: {exc.errors()[0]['msg']}") from None


def check_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an untrusted image to RGB; ImageError for non-images, bombs and images over ``max_pixels``.

    The format (one of :data:`IMAGE_FORMATS`) and pixel count are read from the image header,
    before anything is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                width, height = probe.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"expected a {', '.join(IMAGE_FORMATS)} image, got bytes of none of these") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image could not be decoded: {type(exc).__name__}") from None
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    return load_image(data)


@dataclass
class ServedModel:
    """A served model: its published info, edge bundle bytes and the bundle's frequency table."""

    info: ModelInfo
    bundle: bytes
    freqs: np.ndarray | None
    ranking: NeighbourRanks | None
    fetched: float = field(default_factory=time.monotonic)
    # (name, served value) of every header field a stream must match: read once, not per request.
    stream_fields: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stream_fields = tuple((name, getattr(self.info, name)) for name in _STREAM_FIELDS)

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
        return cls(info=info, bundle=bundle, freqs=parsed.freqs, ranking=parsed.ranking)

    def check(self, request: VQARequest, *, max_question_chars: int, max_image_pixels: int) -> None:
        """Every check listed in the module docstring; raises the matching 4xx error."""
        if len(request.question) > max_question_chars:
            raise QuestionTooLong(
                f"field 'question': expected at most {max_question_chars} characters, "
                f"got {len(request.question)}"
            )
        if request.features is not None:
            self.check_features(request.model, request.features, resolve_ranks=False)
        else:
            assert request.image is not None  # VQARequest guarantees exactly one payload
            check_image(request.image, max_image_pixels)

    def check_features(self, model: str, data: bytes, *, resolve_ranks: bool = True) -> DecodedStream:
        """Check a feature stream against the served quantizer and decode it (indices, stats).

        ``resolve_ranks=False`` (the gateway, which only validates) leaves a ranked stream's
        neighbour ranks unmapped: the same checks, without the per-token codeword search.
        """
        header = read_header(data)
        if header.model != model:
            raise StreamMismatch(
                f"stream header field 'model': expected {model!r} (the request's model), got {header.model!r}"
            )
        if not header.matches_codebook(self.info.codebook_hash):
            raise CodebookMismatch(
                f"the stream was encoded with codebook {header.codebook_hash}, but {model} serves codebook "
                f"{self.info.codebook_hash[:16]}: download the current edge bundle"
            )
        for name, expected in self.stream_fields:
            if getattr(header, name) != expected:
                raise StreamMismatch(
                    f"stream header field '{name}': expected {expected!r}, got {getattr(header, name)!r}"
                )
        return decode_stream(data, self.freqs, self.ranking, resolve_ranks=resolve_ranks)


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
