"""The request/response wire format of ``POST /v1/vqa``: msgpack maps validated by pydantic.

Both sides import this module. A request carries either ``features`` (an AlignedVQ bitstream, see
:mod:`edge_client.bitstream`, whose header names model, codebook hash, split site and geometry) or
``image`` (encoded image bytes, cloud-only mode). Nothing is ever unpickled; sizes are bounded
before anything is allocated.

Request map (protocol version 1):

================  ========  =====================================================================
key               type      meaning
================  ========  =====================================================================
``v``             int       protocol version, 1
``request_id``    str       client-chosen id (1-64 chars of ``[A-Za-z0-9_.:-]``); retries reuse it
``model``         str       registry name, e.g. ``llava-mini-shapes``
``question``      str       1..``MAX_QUESTION_CHARS`` characters
``features``      bin       AlignedVQ bitstream (edge-cloud mode), or
``image``         bin       JPEG/PNG/WebP bytes (cloud-only mode); exactly one of the two
``max_new_tokens``int       1..64, default 8
``timeout_ms``    int       optional budget from arrival; past it the request is dropped (504)
================  ========  =====================================================================

Response map: ``request_id``, ``model``, ``answer``, ``queue_ms``, ``compute_ms``, ``batch_size``.
"""

from __future__ import annotations

import base64
import secrets
from typing import Annotated, Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import AlignedVQError

PROTOCOL_VERSION = 1
DEFAULT_MAX_NEW_TOKENS = 8
MAX_QUESTION_CHARS = 1024
MAX_FEATURE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_BODY_BYTES = MAX_IMAGE_BYTES + 64 * 1024
CONTENT_TYPE = "application/msgpack"


class RequestError(AlignedVQError):
    """The request body is not a valid msgpack request (field named in the message)."""

    code = "bad_request"


class VQARequest(BaseModel):
    """One question about one image, in edge-cloud (``features``) or cloud-only (``image``) mode."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Annotated[int, Field(ge=1)] = PROTOCOL_VERSION
    request_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    model: Annotated[str, Field(min_length=1, max_length=48)]
    question: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    features: Annotated[bytes, Field(min_length=1, max_length=MAX_FEATURE_BYTES)] | None = None
    image: Annotated[bytes, Field(min_length=1, max_length=MAX_IMAGE_BYTES)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=64)] = DEFAULT_MAX_NEW_TOKENS
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> VQARequest:
        if (self.features is None) == (self.image is None):
            raise ValueError("exactly one of 'features' (edge-cloud) or 'image' (cloud-only) is required")
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.v} is not supported; expected {PROTOCOL_VERSION}")
        return self

    @property
    def cloud_only(self) -> bool:
        return self.image is not None


class VQAResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    model: str
    answer: str
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 1


def new_request_id() -> str:
    """128 random bits as 22 base64url characters (a uuid4 in hex spends 32 on 122 bits)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def encode_request(request: VQARequest) -> bytes:
    """Serialize to the msgpack body the gateway expects.

    ``None`` fields and a default ``max_new_tokens`` are left out (the gateway fills in the same
    default): every byte counts on a thin uplink. ``v`` is always sent.
    """
    fields = request.model_dump(exclude_none=True)
    if fields["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS:
        del fields["max_new_tokens"]
    body: bytes = msgpack.packb(fields, use_bin_type=True)  # msgpack ships no type hints
    return body


def decode_request(body: bytes) -> VQARequest:
    """Parse and validate an untrusted body; raises :class:`RequestError` naming the field."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_IMAGE_BYTES,
            max_str_len=4 * MAX_QUESTION_CHARS,
            max_array_len=0,
            max_map_len=16,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise RequestError(f"body is not a single msgpack map: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError(f"body must be a msgpack map, got {type(data).__name__}")
    return parse_request(data)


def parse_request(data: dict[str, Any]) -> VQARequest:
    try:
        return VQARequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"field '{where}': {first['msg']}") from None


def encode_response(response: VQAResponse) -> bytes:
    body: bytes = msgpack.packb(response.model_dump(), use_bin_type=True)
    return body
