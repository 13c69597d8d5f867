"""The exception tree of the edge client and the wire format it shares with the gateway.

Every error raised on untrusted input (a request body, a downloaded bundle, a server reply) is an
`AlignedVQError`. Each class carries a stable snake_case `code` that client and server both use, so
one gateway handler can map the whole tree to HTTP responses and the client can map them back.
Messages say what was expected and what arrived: "expected 866 bytes, got 865".

    AlignedVQError                    alignedvq_error
    ├── BitstreamError                bad_bitstream
    │   ├── TruncatedStreamError      truncated_stream
    │   ├── CorruptStreamError        corrupt_stream
    │   ├── UnsupportedVersionError   unsupported_version
    │   └── EntropyModelError         entropy_model_mismatch
    ├── IndexRangeError               index_out_of_range
    ├── ImageError                    bad_image
    ├── BundleError                   bad_bundle
    └── GatewayError                  gateway_error (instances carry the gateway's own code)
        ├── GatewayUnreachableError   gateway_unreachable
        └── GatewayTimeoutError       gateway_timeout

To add an error: subclass the closest class, give it a new `code`, and add it to the tree above.
`code` must never change once released; clients match on it. `all_error_codes()` lists the codes
of the whole tree, so a test can check that they are unique and that the HTTP mapping covers them.

`GatewayError` is the client's view of a failed HTTP exchange: an error reply from the gateway
keeps the gateway's `code` and HTTP `status` on the instance (the class attribute stays
`gateway_error`), while the two subclasses mark replies that never came (`status` is None).
"""

from __future__ import annotations

__all__ = [
    "AlignedVQError",
    "BitstreamError",
    "BundleError",
    "CorruptStreamError",
    "EntropyModelError",
    "GatewayError",
    "GatewayTimeoutError",
    "GatewayUnreachableError",
    "ImageError",
    "IndexRangeError",
    "TruncatedStreamError",
    "UnsupportedVersionError",
    "all_error_codes",
]


class AlignedVQError(Exception):
    """Base class of every error raised on untrusted edge/wire input."""

    code: str = "alignedvq_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BitstreamError(AlignedVQError):
    """A feature bitstream (see `edge_client.bitstream`) is malformed."""

    code = "bad_bitstream"


class TruncatedStreamError(BitstreamError):
    """The data ends before the lengths it declares (or the layout requires)."""

    code = "truncated_stream"


class CorruptStreamError(BitstreamError):
    """The data is inconsistent: bad magic, checksum mismatch, trailing bytes, invalid field."""

    code = "corrupt_stream"


class UnsupportedVersionError(BitstreamError):
    """The stream was written in a format version this code cannot read."""

    code = "unsupported_version"


class EntropyModelError(BitstreamError):
    """An entropy-coded stream arrived without a matching frequency table (groups, stages, K)."""

    code = "entropy_model_mismatch"


class IndexRangeError(AlignedVQError):
    """A code index (or a quantized statistic) lies outside the range its field allows."""

    code = "index_out_of_range"


class ImageError(AlignedVQError):
    """An image could not be decoded, or is too large to decode safely."""

    code = "bad_image"


class BundleError(AlignedVQError):
    """An edge bundle is malformed, of another format version, or fails its shape or hash checks."""

    code = "bad_bundle"


class GatewayError(AlignedVQError):
    """The gateway answered with an error, or (subclasses) did not answer at all.

    `code` is the gateway's error code (from its JSON body `{"error": {"code", "message"}}`, or
    `http_<status>` when the body has no such field); `status` is the HTTP status, None when no
    reply arrived.
    """

    code = "gateway_error"

    def __init__(self, code: str, status: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"


class GatewayUnreachableError(GatewayError):
    """No connection to the gateway could be made (after all retries)."""

    code = "gateway_unreachable"

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, None, message)


class GatewayTimeoutError(GatewayError):
    """The gateway did not reply within the client's timeout (after all retries)."""

    code = "gateway_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, None, message)


def all_error_codes() -> dict[str, type[AlignedVQError]]:
    """Map every `code` in the tree (including subclasses defined elsewhere) to its class."""
    codes: dict[str, type[AlignedVQError]] = {}
    pending: list[type[AlignedVQError]] = [AlignedVQError]
    while pending:
        cls = pending.pop()
        if cls.code in codes and codes[cls.code] is not cls:
            raise RuntimeError(
                f"error code {cls.code!r} used by {codes[cls.code].__name__} and {cls.__name__}"
            )
        codes[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return codes
