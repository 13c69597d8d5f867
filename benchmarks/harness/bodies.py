"""``POST /v1/vqa`` bodies exactly as ``EdgeClient`` builds them: every size a benchmark reports
is the length of a real request body (msgpack with ``v``, a 22-character ``request_id``,
``model``, ``question`` and the payload)."""

from __future__ import annotations

from edge_client.protocol import encode_request, new_request_id, parse_request

QUESTION = "What is the person in the picture holding?"  # a typical VQAv2-style question
MAX_NEW_TOKENS = 8  # EdgeClient.ask's default (encode_request leaves a default out)


def request_body(model: str, question: str, **payload: bytes) -> bytes:
    """The body ``EdgeClient`` sends with ``features=`` (a stream) or ``image=`` (cloud-only)."""
    fields = {
        "request_id": new_request_id(),
        "model": model,
        "question": question,
        "max_new_tokens": MAX_NEW_TOKENS,
        **payload,
    }
    return encode_request(parse_request(fields))
