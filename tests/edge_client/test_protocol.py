"""Golden bytes of the msgpack envelope: a change to key order, a default left in, or an integer
width shows up here, not in a deployed edge device that suddenly sends a byte more (or a gateway
that stops reading old clients). The feature stream inside has its own goldens (test_bitstream)."""

from __future__ import annotations

import pytest

from edge_client.protocol import (
    RequestError,
    VQARequest,
    VQAResponse,
    decode_request,
    encode_request,
    encode_response,
)

FEATURES = VQARequest(
    request_id="rid-1", model="tiny", question="what color is the shape?", features=b"AVQ\x01\x04tiny"
)
# v, request_id, model, question, features; max_new_tokens at its default is left out.
GOLDEN_FEATURES = bytes.fromhex(
    "85a17601aa726571756573745f6964a57269642d31a56d6f64656ca474696e79a87175657374696f6eb8776861742063"
    "6f6c6f72206973207468652073686170653fa86665617475726573c409415651010474696e79"
)
IMAGE = VQARequest(
    request_id="rid-2",
    model="tiny",
    question="how many?",
    image=b"\x89PNG",
    max_new_tokens=3,
    timeout_ms=5000,
)
GOLDEN_IMAGE = bytes.fromhex(
    "87a17601aa726571756573745f6964a57269642d32a56d6f64656ca474696e79a87175657374696f6ea9686f77206d61"
    "6e793fa5696d616765c40489504e47ae6d61785f6e65775f746f6b656e7303aa74696d656f75745f6d73cd1388"
)
REPLY = VQAResponse(
    request_id="rid-1", model="tiny", answer="red", queue_ms=1.5, compute_ms=2.25, batch_size=4
)
GOLDEN_REPLY = bytes.fromhex(
    "86aa726571756573745f6964a57269642d31a56d6f64656ca474696e79a6616e73776572a3726564a871756575655f6d"
    "73cb3ff8000000000000aa636f6d707574655f6d73cb4002000000000000aa62617463685f73697a6504"
)


@pytest.mark.parametrize(("request_", "golden"), [(FEATURES, GOLDEN_FEATURES), (IMAGE, GOLDEN_IMAGE)])
def test_request_envelope_bytes(request_: VQARequest, golden: bytes) -> None:
    assert encode_request(request_) == golden
    assert decode_request(golden) == request_


def test_feature_request_envelope_costs_what_it_carries() -> None:
    # Around a 9-byte stream: the question (24), request id (5) and model (4) plus 44 bytes of keys
    # and type tags; nothing else (no padding, no defaults).
    carried = len(FEATURES.features or b"") + len(FEATURES.question) + len("rid-1") + len("tiny")
    assert len(GOLDEN_FEATURES) - carried == 44


def test_reply_bytes() -> None:
    assert encode_response(REPLY) == GOLDEN_REPLY


def test_a_golden_body_with_a_flipped_type_is_refused_with_the_field_named() -> None:
    broken = GOLDEN_IMAGE.replace(bytes.fromhex("cd1388"), bytes.fromhex("a3313030"))  # timeout as "100"
    with pytest.raises(RequestError, match="timeout_ms"):
        decode_request(broken)
