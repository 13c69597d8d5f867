"""Edge client: numpy-only runtime that encodes images to AlignedVQ payloads (no torch import).

    from edge_client import EdgeClient
    answer = EdgeClient("http://127.0.0.1:8000").ask("photo.jpg", "what color is the shape?")

Layers, lowest first: ``errors``; ``bitpack``/``entropy``/``ranking``/``bitstream`` (the feature
stream); ``preprocess``; ``protocol`` (the msgpack request); ``bundle`` (edge weights + codebook);
``rdo`` (rate-distortion optimised index choice); ``encoder`` (the edge half in numpy); ``client``
(HTTP); ``cli`` (``edge-client``, not imported here so that importing the package stays light).
"""

from .bitpack import bits_for, pack_indices, packed_size, unpack_indices
from .bitstream import DecodedStream, StreamHeader, decode_stream, encode_stream, read_header
from .bundle import EdgeBundle, VisionSpec
from .client import Answer, BundleCache, EdgeClient
from .encoder import EdgeEncoder
from .entropy import normalize_freqs, rans_decode, rans_encode
from .errors import (
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
from .preprocess import ImageSpec, load_image, preprocess
from .protocol import RequestError, VQARequest, VQAResponse, decode_request, encode_request

__all__ = [
    "AlignedVQError",
    "Answer",
    "BitstreamError",
    "BundleCache",
    "BundleError",
    "CorruptStreamError",
    "DecodedStream",
    "EdgeBundle",
    "EdgeClient",
    "EdgeEncoder",
    "EntropyModelError",
    "GatewayError",
    "GatewayTimeoutError",
    "GatewayUnreachableError",
    "ImageError",
    "ImageSpec",
    "IndexRangeError",
    "RequestError",
    "StreamHeader",
    "TruncatedStreamError",
    "UnsupportedVersionError",
    "VQARequest",
    "VQAResponse",
    "VisionSpec",
    "all_error_codes",
    "bits_for",
    "decode_request",
    "decode_stream",
    "encode_request",
    "encode_stream",
    "load_image",
    "normalize_freqs",
    "pack_indices",
    "packed_size",
    "preprocess",
    "rans_decode",
    "rans_encode",
    "read_header",
    "unpack_indices",
]
