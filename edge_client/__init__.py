"""Edge client: the runtime that encodes images to AlignedVQ payloads and asks the gateway (no torch).

    from edge_client import EdgeClient
    answer = EdgeClient("http://127.0.0.1:8000").ask("photo.jpg", "what color is the shape?")

Layers, lowest first: ``errors``; ``bitpack``/``entropy``/``ranking``/``bitstream`` (the feature
stream); ``preprocess``; ``protocol`` (the msgpack request); ``bundle`` (edge weights + codebook);
``rdo`` (rate-distortion optimised index choice); ``encoder`` (the edge half in numpy);
``bundle_cache`` and ``cloud_only`` (the JPEG baseline); ``sse`` (Server-Sent Events) and
``transport`` (retrying sans-I/O HTTP); ``chat`` (the content part of the OpenAI-compatible
route); ``client`` (the API); ``cli`` (``edge-client``). Names resolve lazily (PEP 562):
``import edge_client.bitpack`` loads the codec alone, without the HTTP stack, Pillow or pydantic.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "bits_for": "bitpack",
    "pack_indices": "bitpack",
    "packed_size": "bitpack",
    "unpack_indices": "bitpack",
    "DecodedStream": "bitstream",
    "StreamHeader": "bitstream",
    "decode_stream": "bitstream",
    "encode_stream": "bitstream",
    "read_header": "bitstream",
    "EdgeBundle": "bundle",
    "VisionSpec": "bundle",
    "Answer": "client",
    "BundleCache": "bundle_cache",
    "chat_part": "chat",
    "chat_ref_part": "chat",
    "Conversation": "client",
    "EdgeClient": "client",
    "EdgeEncoder": "encoder",
    "normalize_freqs": "entropy",
    "rans_decode": "entropy",
    "rans_encode": "entropy",
    "AlignedVQError": "errors",
    "BitstreamError": "errors",
    "BundleError": "errors",
    "CorruptStreamError": "errors",
    "EntropyModelError": "errors",
    "GatewayError": "errors",
    "GatewayTimeoutError": "errors",
    "GatewayUnreachableError": "errors",
    "ImageError": "errors",
    "IndexRangeError": "errors",
    "TruncatedStreamError": "errors",
    "UnsupportedVersionError": "errors",
    "all_error_codes": "errors",
    "ImageSpec": "preprocess",
    "load_image": "preprocess",
    "preprocess": "preprocess",
    "RequestError": "protocol",
    "VQARequest": "protocol",
    "VQAResponse": "protocol",
    "decode_request": "protocol",
    "encode_request": "protocol",
    "image_ref": "protocol",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
