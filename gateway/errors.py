"""The gateway's exception tree, and the one table that maps every error code to an HTTP status.

The gateway extends the edge client's tree (:mod:`edge_client.errors`), so client and server share
one set of stable snake_case codes; a worker's error reply carries the code of the error it raised
and the gateway re-raises it here (:func:`error_from_code`). Every error body is
``{"error": {"code": "<code>", "message": "<what was expected, what arrived>"}}``.

    AlignedVQError (edge_client)        alignedvq_error          400
    ├── RequestError (protocol)         bad_request              422
    ├── BitstreamError, its subclasses  bad_bitstream, ...       422
    ├── IndexRangeError                 index_out_of_range       422
    ├── ImageError                      bad_image                422
    ├── BundleError                     bad_bundle               500 (a published bundle is unreadable)
    ├── GatewayError (client side)      gateway_error, ...       502/504 (never raised here; mapped for
    │                                                            completeness: the client's view of us)
    └── ServerError                     server_error             500
        ├── Unauthorized                unauthorized             401
        ├── NotFound                    not_found                404
        │   ├── UnknownModel            unknown_model            404
        │   └── BundleUnavailable       bundle_unavailable       404
        ├── MethodNotAllowed            method_not_allowed       405
        ├── CodebookMismatch            codebook_mismatch        409
        ├── ImageExpired                image_expired            410
        ├── BodyTooLarge                body_too_large           413
        ├── UnsupportedMediaType        unsupported_media_type   415
        ├── StreamMismatch              stream_mismatch          422
        ├── QuestionTooLong             question_too_long        422
        ├── UnreadableQuestion          unreadable_question      422
        ├── Overloaded                  overloaded               429 (+ Retry-After)
        ├── RateLimited                 rate_limited             429 (+ Retry-After)
        ├── WorkerError                 worker_error             500
        ├── DeadLettered                dead_letter              502
        ├── Unavailable                 unavailable              503 (+ Retry-After)
        │   ├── QueueUnavailable        queue_unavailable        503 (+ Retry-After)
        │   └── NotReady                not_ready                503 (+ Retry-After)
        └── DeadlineExceeded            deadline_exceeded        504

Third-party errors are translated in one place each: Redis in :func:`gateway.queue.redis_errors`,
msgpack in :func:`edge_client.protocol.decode_request`, Pillow in
:func:`edge_client.preprocess.decode_image`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from edge_client.errors import (
    AlignedVQError,
    BitstreamError,
    BundleError,
    CorruptStreamError,
    EntropyModelError,
    GatewayError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ImageError,
    IndexRangeError,
    TruncatedStreamError,
    UnsupportedVersionError,
    all_error_codes,
)
from edge_client.protocol import RequestError

__all__ = [
    "HTTP_STATUS",
    "BodyTooLarge",
    "BundleUnavailable",
    "CodebookMismatch",
    "DeadLettered",
    "DeadlineExceeded",
    "ErrorBody",
    "ImageExpired",
    "MethodNotAllowed",
    "NotFound",
    "NoWorker",
    "NotReady",
    "Overloaded",
    "QuestionTooLong",
    "RequestIdReused",
    "QueueUnavailable",
    "RateLimited",
    "ServerError",
    "StreamMismatch",
    "Unauthorized",
    "Unavailable",
    "UnknownModel",
    "UnreadableQuestion",
    "UnsupportedMediaType",
    "WorkerError",
    "error_body",
    "error_from_code",
    "error_responses",
    "http_status",
]


class ServerError(AlignedVQError):
    """Base of errors raised by the gateway and its workers. ``retry_after``: seconds, or None."""

    code = "server_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(ServerError):
    """No ``Authorization: Bearer <key>`` header, or a key that is not configured."""

    code = "unauthorized"


class NotFound(ServerError):
    """No such route or resource."""

    code = "not_found"


class UnknownModel(NotFound):
    """The request names a model no worker serves."""

    code = "unknown_model"


class BundleUnavailable(NotFound):
    """The model is served but its edge bundle is not (or no longer) stored."""

    code = "bundle_unavailable"


class MethodNotAllowed(ServerError):
    code = "method_not_allowed"


class CodebookMismatch(ServerError):
    """The feature stream was encoded with another codebook than the one served."""

    code = "codebook_mismatch"


class ImageExpired(ServerError):
    """The ``image_ref`` names no feature stream this API key sent within ``VQA_IMAGE_TTL_S`` (or
    one evicted, or another key's: the same answer, so a ref reveals nothing): send the features."""

    code = "image_expired"


class RequestIdReused(ServerError):
    """The caller already used this request id for a different request (idempotency is per id)."""

    code = "request_id_reused"


class BodyTooLarge(ServerError):
    code = "body_too_large"


class UnsupportedMediaType(ServerError):
    code = "unsupported_media_type"


class StreamMismatch(ServerError):
    """A stream header field (model, split site, tokens, G/S/K, stat_bits) differs from the served one."""

    code = "stream_mismatch"


class QuestionTooLong(ServerError):
    code = "question_too_long"


class UnreadableQuestion(ServerError):
    """The model's tokenizer reads no word of the question (each would be its unknown token)."""

    code = "unreadable_question"


class Overloaded(ServerError):
    """The model's backlog is at ``VQA_MAX_BACKLOG``: retry after ``retry_after`` seconds."""

    code = "overloaded"


class RateLimited(ServerError):
    """The API key (or, anonymously, the client address) is over ``VQA_RATE_LIMIT_PER_S``, or the
    client address failed authentication too often (``VQA_AUTH_FAILURES_PER_MINUTE``)."""

    code = "rate_limited"


class WorkerError(ServerError):
    """A worker failed on this request for a reason that is not the request's fault."""

    code = "worker_error"


class DeadLettered(ServerError):
    """Workers died on this request ``VQA_MAX_DELIVERIES`` times; it was moved to the dead-letter stream."""

    code = "dead_letter"


class Unavailable(ServerError):
    code = "unavailable"


class QueueUnavailable(Unavailable):
    """Redis cannot be reached (the gateway reconnects by itself)."""

    code = "queue_unavailable"


class NoWorker(Unavailable):
    """No worker of the model was live within VQA_NO_WORKER_GRACE_MS: refused instead of queued."""

    code = "no_worker"


class NotReady(Unavailable):
    """Readiness failed: no live worker for a served model, or the in-process model is loading."""

    code = "not_ready"


class DeadlineExceeded(ServerError):
    """The request's deadline passed before its answer arrived (the worker drops it if still queued)."""

    code = "deadline_exceeded"


HTTP_STATUS: dict[str, int] = {
    AlignedVQError.code: 400,
    RequestError.code: 422,
    BitstreamError.code: 422,
    TruncatedStreamError.code: 422,
    CorruptStreamError.code: 422,
    UnsupportedVersionError.code: 422,
    EntropyModelError.code: 422,
    IndexRangeError.code: 422,
    ImageError.code: 422,
    BundleError.code: 500,
    GatewayError.code: 502,
    GatewayUnreachableError.code: 502,
    GatewayTimeoutError.code: 504,
    ServerError.code: 500,
    Unauthorized.code: 401,
    NotFound.code: 404,
    UnknownModel.code: 404,
    BundleUnavailable.code: 404,
    MethodNotAllowed.code: 405,
    CodebookMismatch.code: 409,
    ImageExpired.code: 410,
    RequestIdReused.code: 409,
    BodyTooLarge.code: 413,
    UnsupportedMediaType.code: 415,
    StreamMismatch.code: 422,
    QuestionTooLong.code: 422,
    UnreadableQuestion.code: 422,
    Overloaded.code: 429,
    RateLimited.code: 429,
    WorkerError.code: 500,
    DeadLettered.code: 502,
    Unavailable.code: 503,
    QueueUnavailable.code: 503,
    NotReady.code: 503,
    NoWorker.code: 503,
    DeadlineExceeded.code: 504,
}


def http_status(error: AlignedVQError) -> int:
    """The status of ``error``'s code; a code added later maps like its closest mapped base class."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if code in HTTP_STATUS:
            return HTTP_STATUS[code]
    return 500


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """``{"error": {"code": "<snake_case>", "message": "<what was expected, what arrived>"}}``."""

    error: ErrorDetail


# Statuses whose replies carry Retry-After (the OpenAPI descriptions say so).
RETRY_AFTER_STATUSES = frozenset({429, 503})


def error_responses(
    *errors: type[AlignedVQError], body: type[BaseModel] = ErrorBody
) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry of a route that can fail with exactly ``errors``: one entry
    per status, naming its codes, so a schema-driven client learns every status it may meet.
    ``body``: the error body's schema (the OpenAI-compatible route has its own)."""
    codes: dict[int, list[str]] = {}
    for error in errors:
        codes.setdefault(HTTP_STATUS[error.code], []).append(error.code)
    return {
        status: {
            "model": body,
            "description": ", ".join(sorted(names))
            + (" (with Retry-After)" if status in RETRY_AFTER_STATUSES else ""),
        }
        for status, names in sorted(codes.items())
    }


def error_from_code(code: str, message: str) -> AlignedVQError:
    """Rebuild the error a worker reported; codes this gateway cannot rebuild become WorkerError."""
    cls = all_error_codes().get(code)
    if cls is None or issubclass(cls, GatewayError):  # client-side classes take other arguments
        return WorkerError(f"worker reported {code}: {message}")
    return cls(message)
