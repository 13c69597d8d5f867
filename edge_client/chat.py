"""The AlignedVQ content part of ``POST /v1/chat/completions`` (OpenAI's chat API), both ways.

A message's ``content`` may hold, beside OpenAI's ``text`` and ``image_url`` parts, our extension
part, which carries an edge-encoded feature stream or names one sent before
(docs/conversations.md)::

    {"type": "alignedvq", "alignedvq": {"features": "<base64 stream>"}}
    {"type": "alignedvq", "alignedvq": {"image_ref": "<32 hex>"}}

:func:`chat_part` and :func:`chat_ref_part` build them (for the ``openai`` package, or any HTTP
client); :func:`read_chat_part` is their inverse, what the gateway runs on untrusted input.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Literal

from .protocol import IMAGE_REF_BYTES, MAX_FEATURE_BYTES, RequestError, image_ref

__all__ = ["CHAT_PART_TYPE", "chat_part", "chat_ref_part", "read_chat_part"]

CHAT_PART_TYPE = "alignedvq"
_MAX_BASE64_CHARS = 4 * -(-MAX_FEATURE_BYTES // 3)
_REF_HEX = re.compile(f"[0-9a-fA-F]{{{2 * IMAGE_REF_BYTES}}}")


def chat_part(features: bytes) -> dict[str, Any]:
    """The content part that sends ``features`` (an encoded stream) with a message."""
    return {"type": CHAT_PART_TYPE, CHAT_PART_TYPE: {"features": base64.b64encode(features).decode()}}


def chat_ref_part(features: bytes) -> dict[str, Any]:
    """The content part that names ``features`` sent before (by any request of the same API key)
    instead of sending them again."""
    return {"type": CHAT_PART_TYPE, CHAT_PART_TYPE: {"image_ref": image_ref(features).hex()}}


def read_chat_part(
    value: Mapping[str, object], param: str = CHAT_PART_TYPE
) -> tuple[Literal["features", "image_ref"], bytes]:
    """The ``alignedvq`` object of a part as a request field: ``("features", stream)`` or
    ``("image_ref", ref)``; :class:`RequestError` naming ``param`` if it is neither."""
    if set(value) == {"features"} and isinstance(value["features"], str):
        text = value["features"]
        if len(text) > _MAX_BASE64_CHARS:
            raise RequestError(
                f"{param}.features: expected at most {MAX_FEATURE_BYTES} bytes, "
                f"got {len(text)} base64 characters",
                param,
            )
        try:
            return "features", base64.b64decode(text, validate=True)
        except binascii.Error:
            raise RequestError(f"{param}.features: expected standard base64", param) from None
    if set(value) == {"image_ref"} and isinstance(value["image_ref"], str):
        text = value["image_ref"]
        if not _REF_HEX.fullmatch(text):
            raise RequestError(
                f"{param}.image_ref: expected {2 * IMAGE_REF_BYTES} hex characters, got {text[:40]!r}", param
            )
        return "image_ref", bytes.fromhex(text)
    raise RequestError(
        f"{param}: expected {{'features': '<base64>'}} or {{'image_ref': '<32 hex>'}}, "
        f"got keys {sorted(value)[:4]}",
        param,
    )
