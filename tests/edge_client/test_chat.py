"""The alignedvq content part of the OpenAI-compatible route: built by the client, read back by the
gateway, refused with the field named when it is anything else."""

from __future__ import annotations

import hashlib

import pytest

from edge_client import chat_part, chat_ref_part
from edge_client.chat import read_chat_part
from edge_client.protocol import MAX_FEATURE_BYTES, RequestError

STREAM = b"AVQ\x01\x04tiny" + bytes(range(40))


def test_parts_round_trip() -> None:
    assert chat_part(STREAM)["type"] == "alignedvq"
    assert read_chat_part(chat_part(STREAM)["alignedvq"]) == ("features", STREAM)
    ref = chat_ref_part(STREAM)["alignedvq"]["image_ref"]
    assert ref == hashlib.sha256(STREAM).hexdigest()[:32]
    assert read_chat_part(chat_ref_part(STREAM)["alignedvq"]) == ("image_ref", bytes.fromhex(ref))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"features": "not base64!"}, "standard base64"),
        ({"features": "A" * (4 * MAX_FEATURE_BYTES // 3 + 8)}, "at most"),
        ({"image_ref": "00" * 15}, "32 hex"),
        ({"image_ref": "00 " * 16}, "32 hex"),
        ({"image_ref": "zz" * 16}, "32 hex"),
        ({"features": "AA==", "image_ref": "00" * 16}, "expected"),
        ({"url": "http://example.com"}, "expected"),
        ({"features": 3}, "expected"),
    ],
)
def test_anything_else_is_refused_naming_the_part(value: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        read_chat_part(value, "messages[0].content[1].alignedvq")
    assert caught.value.param == "messages[0].content[1].alignedvq"
