"""The request/response wire format of ``POST /v1/vqa``: msgpack maps validated by pydantic.

Both sides import this module. A request carries ``features`` (an AlignedVQ bitstream, see
:mod:`edge_client.bitstream`, whose header names model, codebook hash, split site and geometry),
``image`` (encoded image bytes, cloud-only mode) or ``image_ref`` (a stream the gateway already
holds for this API key, docs/conversations.md). Nothing is ever unpickled; sizes are bounded
before anything is allocated.

Request map (protocol version 1):

==================  ========  ===================================================================
key                 type      meaning
==================  ========  ===================================================================
``v``               int       protocol version, 1
``request_id``      str       client-chosen id (1-64 chars of ``[A-Za-z0-9_.:-]``); retries reuse it
``model``           str       registry name, e.g. ``llava-mini-shapes``; optional with ``image_ref``
``question``        str       1..``MAX_QUESTION_CHARS`` characters
``features``        bin       AlignedVQ bitstream (edge-cloud mode), or
``image``           bin       JPEG/PNG/WebP bytes (cloud-only mode), or
``image_ref``       bin       :func:`image_ref` of features sent before; exactly one of the three
``max_new_tokens``  int       1..512, default 8 (a worker refuses more than its model can generate)
``timeout_ms``      int       optional budget from arrival; past it the request is dropped (504)
``history``         [str]     optional earlier questions and answers, alternating, oldest first
==================  ========  ===================================================================

Response map: ``request_id``, ``model``, ``answer``, ``queue_ms``, ``compute_ms``, ``batch_size``,
and, when not at their defaults, ``image_ref``, ``prompt_tokens``, ``completion_tokens`` and
``unknown_words`` (question words the model's vocabulary cannot spell, answered without them).
Fields at their defaults are left out of both maps, so a client or gateway that predates them
reads and writes the same bytes (``tests/edge_client/test_protocol.py`` pins them).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Annotated, Any

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from .errors import AlignedVQError

PROTOCOL_VERSION = 1
DEFAULT_MAX_NEW_TOKENS = 8
MAX_NEW_TOKENS = 512
MAX_QUESTION_CHARS = 1024
MAX_HISTORY_TURNS = 16  # question/answer pairs: 32 strings
MAX_FEATURE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_BODY_BYTES = MAX_IMAGE_BYTES + 64 * 1024
IMAGE_REF_BYTES = 16
CONTENT_TYPE = "application/msgpack"
MAX_REQUEST_FIELDS = 16  # a request map's keys at most (msgpack's max_map_len in decode_request)
# msgpack's own limits (decode_request) stop a body before pydantic could name the field; these say
# which fields the limit is there for.
_OVER_LIMIT = re.compile(r"(\d+) exceeds max_(str|bin|array|map)_len\(\d+\)")
_LIMIT_HINTS = {
    "str": "a string of {} bytes; 'question' and each 'history' entry take at most "
    f"{MAX_QUESTION_CHARS} characters",
    "bin": f"a byte string of {{}} bytes; 'image' takes at most {MAX_IMAGE_BYTES}, 'features' "
    f"{MAX_FEATURE_BYTES}",
    "array": f"an array of {{}} items; 'history' takes at most {2 * MAX_HISTORY_TURNS} (questions, answers)",
    "map": f"a map of {{}} keys; a request has at most {MAX_REQUEST_FIELDS} fields",
}

# Reply fields added after the first release: left out of the msgpack reply at these defaults.
_OPTIONAL_REPLY_FIELDS: dict[str, object] = {
    "image_ref": None,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "unknown_words": [],
}


class RequestError(AlignedVQError):
    """The request body is not a valid request (field named in the message; ``param`` names it
    for the OpenAI-compatible route's error objects)."""

    code = "bad_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def image_ref(features: bytes) -> bytes:
    """The name of a feature stream the gateway keeps: the first 16 bytes of its SHA-256.

    128 bits never collide within one API key's streams; the full 32 bytes would put a short
    follow-up over 100 bytes (docs/conversations.md).
    """
    return hashlib.sha256(features).digest()[:IMAGE_REF_BYTES]


Text = Annotated[str, Field(max_length=MAX_QUESTION_CHARS)]


class VQARequest(BaseModel):
    """One question about one image: edge-cloud (``features``), cloud-only (``image``), or a
    follow-up naming features sent before (``image_ref``), with optional earlier turns."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Annotated[int, Field(ge=1)] = PROTOCOL_VERSION
    request_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    # "" only when left out beside an image_ref: the stored stream's header names the model.
    model: Annotated[str, Field(max_length=48)] = ""  # required unless image_ref: _one_payload
    question: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    features: Annotated[bytes, Field(min_length=1, max_length=MAX_FEATURE_BYTES)] | None = None
    image: Annotated[bytes, Field(min_length=1, max_length=MAX_IMAGE_BYTES)] | None = None
    image_ref: Annotated[bytes, Field(min_length=IMAGE_REF_BYTES, max_length=IMAGE_REF_BYTES)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = DEFAULT_MAX_NEW_TOKENS
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] | None = None
    history: Annotated[list[Text], Field(max_length=2 * MAX_HISTORY_TURNS)] = []

    @model_validator(mode="after")
    def _one_payload(self) -> VQARequest:
        if sum(x is not None for x in (self.features, self.image, self.image_ref)) != 1:
            raise ValueError(
                "exactly one of 'features' (edge-cloud), 'image' (cloud-only) or 'image_ref' "
                "(features sent before) is required"
            )
        if not self.model and self.image_ref is None:
            raise ValueError("'model' is required unless 'image_ref' names a stored feature stream")
        if len(self.history) % 2:
            raise ValueError(
                f"'history' alternates questions and answers, so its length is even; got {len(self.history)}"
            )
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.v} is not supported; expected {PROTOCOL_VERSION}")
        return self

    @property
    def cloud_only(self) -> bool:
        return self.image is not None


class VQAResponse(BaseModel):
    """The answer. ``image_ref`` is 16 bytes in msgpack and 32 hex characters in JSON."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    model: str
    answer: str
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 1
    image_ref: bytes | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unknown_words: list[str] = []

    @field_validator("image_ref", mode="before")
    @classmethod
    def _ref_from_hex(cls, value: object) -> object:
        if isinstance(value, str):  # a JSON reply
            try:
                return bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"expected {2 * IMAGE_REF_BYTES} hex characters, got {value!r}") from None
        return value

    @field_serializer("image_ref", when_used="json")
    def _ref_to_hex(self, value: bytes | None) -> str | None:
        return None if value is None else value.hex()


def new_request_id() -> str:
    """128 random bits as 22 base64url characters (a uuid4 in hex spends 32 on 122 bits)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def encode_request(request: VQARequest) -> bytes:
    """Serialize to the msgpack body the gateway expects.

    ``None`` fields, an absent ``model``, an empty ``history`` and a default ``max_new_tokens`` are
    left out (the gateway fills in the same defaults): every byte counts on a thin uplink. ``v`` is
    always sent.
    """
    fields = request.model_dump(exclude_none=True)
    if fields["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS:
        del fields["max_new_tokens"]
    if not fields["model"]:
        del fields["model"]
    if not fields["history"]:
        del fields["history"]
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
            max_array_len=2 * MAX_HISTORY_TURNS,
            max_map_len=MAX_REQUEST_FIELDS,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        over = _OVER_LIMIT.fullmatch(str(exc))
        if over is not None:  # a well-formed body with a value larger than any field takes
            size, kind = over.group(1), over.group(2)
            raise RequestError(f"the body holds {_LIMIT_HINTS[kind].format(size)}") from None
        raise RequestError(f"body is not a single msgpack map: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError(f"body must be a msgpack map, got {type(data).__name__}")
    return parse_request(data)


def parse_request(data: dict[str, Any]) -> VQARequest:
    try:
        return VQARequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if not where:  # a check across fields (_one_payload): its message names them
            raise RequestError(str(first["msg"]).removeprefix("Value error, ")) from None
        raise RequestError(f"field '{where}': {first['msg']}", param=where) from None


def encode_response(response: VQAResponse) -> bytes:
    fields = response.model_dump()
    for name, default in _OPTIONAL_REPLY_FIELDS.items():
        if fields[name] == default:
            del fields[name]
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    return body
