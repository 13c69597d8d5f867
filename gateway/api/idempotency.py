"""Request ids are idempotency keys, scoped to the caller and bound to the request they first named.

A client's ``request_id`` is only unique within that client, so the queue never sees it: the gateway
keys everything (stream entry, in-flight marker, stored result) by a digest of the caller's
identity and the id, and answers under the client's own id. Two API keys using the same id therefore
never meet. The first request under an id binds it to a digest of what was asked (model, question,
payload, ``max_new_tokens``; not ``timeout_ms``, which a retry may change): a retry of the same
request waits for or returns the same answer, a different request under the same id gets 409
``request_id_reused`` instead of someone else's answer.
"""

from __future__ import annotations

import hashlib

import msgpack

from edge_client.protocol import VQARequest, encode_request


def scoped_id(request_id: str, client_id: str) -> str:
    """The queue's name for ``request_id`` of caller ``client_id`` (an API key's digest prefix)."""
    return hashlib.sha256(f"{client_id}\0{request_id}".encode()).hexdigest()[:40]


def scoped_request(request: VQARequest, client_id: str) -> tuple[VQARequest, bytes]:
    """The request as the queue sees it (the id scoped to ``client_id``) and its msgpack body."""
    scoped = request.model_copy(update={"request_id": scoped_id(request.request_id, client_id)})
    return scoped, encode_request(scoped)


def request_digest(request: VQARequest) -> bytes:
    """What a retry must repeat to count as the same request."""
    content = [request.model, request.question, request.features, request.image, request.max_new_tokens]
    return hashlib.sha256(msgpack.packb(content, use_bin_type=True)).digest()
