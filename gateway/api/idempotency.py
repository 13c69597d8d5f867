"""Request ids are idempotency keys, scoped to the caller and bound to the request they first named.

A client's ``request_id`` is only unique within that client, so the queue never sees it. The queue
keys everything (stream entry, in-flight marker, stored result, partial stream) by a digest of the
caller's identity, the id *and what was asked* (model, question, payload, history,
``max_new_tokens``; not ``timeout_ms``, which a retry may change), and the gateway answers under the
client's own id. So a retry of the same request waits for or returns the same answer, while a
different request under the same id can never be handed that answer, however the lifetimes of the
stored result and of the binding below compare. Two API keys using the same id never meet.

The binding only turns a reuse into a clear error: the first request under an id binds
(caller, id) to its digest, and a different request under a bound id gets 409
``request_id_reused``.
"""

from __future__ import annotations

import hashlib

import msgpack

from edge_client.protocol import VQARequest, encode_request


def binding_id(request_id: str, client_id: str) -> str:
    """The name under which ``request_id`` of caller ``client_id`` (an API key's digest prefix) is
    bound to the first request it named."""
    return hashlib.sha256(f"{client_id}\0{request_id}".encode()).hexdigest()[:40]


def request_digest(request: VQARequest) -> bytes:
    """What a retry must repeat to count as the same request."""
    content = [
        request.model,
        request.question,
        request.features,
        request.image,
        request.max_new_tokens,
        request.history,
    ]
    return hashlib.sha256(msgpack.packb(content, use_bin_type=True)).digest()


def scoped_request(request: VQARequest, client_id: str, digest: bytes) -> tuple[VQARequest, bytes]:
    """The request as the queue sees it (its id scoped to ``client_id`` and to what it asks, its
    :func:`request_digest`) and its msgpack body."""
    queue_id = hashlib.sha256(f"{client_id}\0{request.request_id}\0".encode() + digest)
    scoped = request.model_copy(update={"request_id": queue_id.hexdigest()[:40]})
    return scoped, encode_request(scoped)
