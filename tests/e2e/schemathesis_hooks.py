"""Schemathesis hooks for the schema fuzz test: msgpack bodies in and out, as the OpenAPI says.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``; schemathesis generates each request body from
the published JSON schema of :class:`edge_client.protocol.VQARequest`, and these turn it into
msgpack the way any schema-driven client would (``format: binary`` strings become msgpack bin).
"""

from __future__ import annotations

from typing import Any

import msgpack
import schemathesis


def _wire(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wire(item) for item in value]
    data = getattr(value, "data", None)
    return data() if callable(data) else value


@schemathesis.serializer("application/msgpack")
def to_msgpack(ctx: Any, value: Any) -> bytes:
    return msgpack.packb(_wire(value), use_bin_type=True)


@schemathesis.deserializer("application/msgpack")
def from_msgpack(ctx: Any, response: Any) -> Any:
    return msgpack.unpackb(response.content, raw=False)
