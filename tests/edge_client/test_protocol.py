"""Golden bytes of the msgpack envelope: a change to key order, a default left in, or an integer
width shows up here, not in a deployed edge device that suddenly sends a byte more (or a gateway
that stops reading old clients). The feature stream inside has its own goldens (test_bitstream).
Fields added for conversations (image_ref, history, the reply's token counts) are additive: left
out at their defaults, so the first goldens are unchanged."""

from __future__ import annotations

import re

import msgpack
import pytest

from edge_client.protocol import (
    MAX_HISTORY_TURNS,
    MAX_QUESTION_CHARS,
    RequestError,
    VQARequest,
    VQAResponse,
    decode_request,
    encode_request,
    encode_response,
    image_ref,
    new_request_id,
    parse_request,
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


# A follow-up: the features named by their ref, the model left to the stored stream's header.
FOLLOW_UP = VQARequest(request_id="rid-3", question="and its color?", image_ref=bytes(range(16)))
GOLDEN_FOLLOW_UP = bytes.fromhex(
    "84a17601aa726571756573745f6964a57269642d33a87175657374696f6eae616e642069747320636f6c6f723fa969"
    "6d6167655f726566c410000102030405060708090a0b0c0d0e0f"
)
HISTORY = VQARequest(
    request_id="rid-4",
    model="tiny",
    question="and its size?",
    features=b"AVQ\x01\x04tiny",
    history=["what shape?", "circle"],
    max_new_tokens=300,
)
GOLDEN_HISTORY = bytes.fromhex(
    "87a17601aa726571756573745f6964a57269642d34a56d6f64656ca474696e79a87175657374696f6ead616e642069"
    "74732073697a653fa86665617475726573c409415651010474696e79ae6d61785f6e65775f746f6b656e73cd012ca7"
    "686973746f727992ab776861742073686170653fa6636972636c65"
)

GOLDEN_REPLY_ADDED = bytes.fromhex(
    "a9696d6167655f726566c410000102030405060708090a0b0c0d0e0fad70726f6d70745f746f6b656e731eb1636f6d"
    "706c6574696f6e5f746f6b656e7302ad756e6b6e6f776e5f776f72647391a47a6f7270"
)


@pytest.mark.parametrize(
    ("request_", "golden"),
    [
        (FEATURES, GOLDEN_FEATURES),
        (IMAGE, GOLDEN_IMAGE),
        (FOLLOW_UP, GOLDEN_FOLLOW_UP),
        (HISTORY, GOLDEN_HISTORY),
    ],
)
def test_request_envelope_bytes(request_: VQARequest, golden: bytes) -> None:
    assert encode_request(request_) == golden
    assert decode_request(golden) == request_


def test_feature_request_envelope_costs_what_it_carries() -> None:
    # Around a 9-byte stream: the question (24), request id (5) and model (4) plus 44 bytes of keys
    # and type tags; nothing else (no padding, no defaults).
    carried = len(FEATURES.features or b"") + len(FEATURES.question) + len("rid-1") + len("tiny")
    assert len(GOLDEN_FEATURES) - carried == 44


def test_a_short_follow_up_is_at_most_100_bytes() -> None:
    """What image_ref is for: a question about a picture already sent costs no features."""
    body = encode_request(
        VQARequest(request_id=new_request_id(), question="what color is it?", image_ref=image_ref(b"stream"))
    )
    assert len(body) == 93 <= 100  # 22-char id, 17-char question, 16-byte ref, keys and tags


def test_reply_bytes() -> None:
    assert encode_response(REPLY) == GOLDEN_REPLY


def test_reply_with_conversation_fields_and_its_json() -> None:
    reply = REPLY.model_copy(
        update={
            "image_ref": bytes(range(16)),
            "prompt_tokens": 30,
            "completion_tokens": 2,
            "unknown_words": ["zorp"],
        }
    )
    # A 10-entry map: the first reply's six fields, then the four added ones.
    assert encode_response(reply) == b"\x8a" + GOLDEN_REPLY[1:] + GOLDEN_REPLY_ADDED
    as_json = reply.model_dump_json()
    assert '"image_ref":"000102030405060708090a0b0c0d0e0f"' in as_json
    assert VQAResponse.model_validate_json(as_json) == reply


def test_image_ref_is_the_first_16_bytes_of_the_sha256() -> None:
    import hashlib

    assert image_ref(b"features") == hashlib.sha256(b"features").digest()[:16]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"features": b"x", "image_ref": bytes(16)}, "exactly one of"),
        ({"image_ref": bytes(15)}, "image_ref"),
        ({"features": b"x", "model": None}, "'model' is required unless 'image_ref'"),
        ({"image_ref": bytes(16), "history": ["what shape?"]}, "even"),
        ({"image_ref": bytes(16), "history": ["q", "a"] * (MAX_HISTORY_TURNS + 1)}, "history"),
        ({"image_ref": bytes(16), "history": ["q", "a" * (MAX_QUESTION_CHARS + 1)]}, "history.1"),
        ({"image_ref": bytes(16), "max_new_tokens": 513}, "max_new_tokens"),
    ],
)
def test_conversation_fields_are_checked(fields: dict, message: str) -> None:
    base = {"request_id": "r", "model": "tiny", "question": "what?"}
    with pytest.raises(RequestError, match=message):
        parse_request({k: v for k, v in {**base, **fields}.items() if v is not None})


def test_a_check_across_fields_says_only_what_is_wrong() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(
            {"request_id": "r", "question": "q", "image_ref": bytes(16), "history": ["a", "b", "c"]}
        )
    assert (
        str(info.value).startswith("'history' alternates questions and answers") and info.value.param is None
    )


def test_the_longest_history_decodes() -> None:
    history = ["what is it?", "a red circle"] * MAX_HISTORY_TURNS
    request = VQARequest(
        request_id="r", question="and now?", image_ref=bytes(16), history=history, max_new_tokens=512
    )
    assert decode_request(encode_request(request)) == request


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"question": "x" * 10**6}, "a string of 1000000 bytes; 'question' and each 'history' entry"),
        ({"history": ["q", "a"] * 20}, "an array of 40 items; 'history' takes at most 32"),
        ({f"k{i}": 1 for i in range(20)}, "a map of 22 keys"),
    ],
)
def test_a_value_over_msgpacks_limits_is_refused_naming_what_it_is_too_large_for(
    fields: dict, message: str
) -> None:
    """msgpack stops such a body before pydantic could name the field: the message says which
    fields the limit is for, not that the body is no map."""
    with pytest.raises(RequestError, match=re.escape(message)):
        decode_request(msgpack.packb({"request_id": "r", "model": "tiny", **fields}))


def test_a_golden_body_with_a_flipped_type_is_refused_with_the_field_named() -> None:
    broken = GOLDEN_IMAGE.replace(bytes.fromhex("cd1388"), bytes.fromhex("a3313030"))  # timeout as "100"
    with pytest.raises(RequestError, match="timeout_ms"):
        decode_request(broken)
