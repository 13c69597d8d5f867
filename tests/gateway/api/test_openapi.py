"""The OpenAPI document describes what the routes really do: the msgpack request and reply as
schemas, on each route only the error statuses that route can return, and a ``timeout_ms`` limit
that is enforced, not silently clamped."""

from __future__ import annotations

import json
import re

import jsonschema
import msgpack

from edge_client.protocol import CONTENT_TYPE
from gateway.api.main import create_app

from ..conftest import gateway_settings
from ..helpers import HEADERS, body, png


def statuses(schema: dict, path: str, method: str = "get") -> set[int]:
    return {int(code) for code in schema["paths"][path][method]["responses"]}


def test_each_route_lists_only_its_own_error_statuses(redis_url, prefix) -> None:
    schema = create_app(gateway_settings(redis_url, prefix)).openapi()
    assert statuses(schema, "/healthz") == {200}
    assert statuses(schema, "/readyz") == statuses(schema, "/readyz/gateway") == {200, 503}
    assert statuses(schema, "/v1/models") == {200, 401, 429, 503}
    assert statuses(schema, "/v1/models/{name}/edge-bundle") == {200, 304, 401, 404, 429, 503}
    every = {200, 401, 404, 409, 410, 413, 415, 422, 429, 502, 503, 504}
    assert statuses(schema, "/v1/vqa", "post") == every
    assert statuses(schema, "/v1/chat/completions", "post") == every
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["409"]["description"] == "codebook_mismatch"  # chat requests never reuse an id
    assert chat["410"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorBody"
    }
    vqa = schema["paths"]["/v1/vqa"]["post"]["responses"]
    assert "codebook_mismatch" in vqa["409"]["description"] and "Retry-After" in vqa["503"]["description"]


def test_msgpack_request_and_reply_are_schemas_a_tool_can_fill(redis_url, prefix) -> None:
    schema = create_app(gateway_settings(redis_url, prefix)).openapi()
    post = schema["paths"]["/v1/vqa"]["post"]
    request = post["requestBody"]["content"][CONTENT_TYPE]["schema"]
    assert request["required"] == ["request_id", "question"]  # model may be left out with an image_ref
    assert request["properties"]["features"]["anyOf"][0]["format"] == "binary"
    example = {"request_id": "r1", "model": "tiny", "question": "what shape is it?", "timeout_ms": 500}
    jsonschema.validate(example, request)  # what a schema-driven tool would generate, then msgpack
    assert msgpack.unpackb(body("tiny", image=png(), request_id="r1"))["request_id"] == "r1"
    reply = post["responses"]["200"]["content"]
    assert reply[CONTENT_TYPE]["schema"] == reply["application/json"]["schema"]


def test_timeout_above_the_gateway_cap_is_refused_not_clamped(redis_url, prefix, open_client) -> None:
    client = open_client(gateway_settings(redis_url, prefix, max_timeout_ms=5_000, request_timeout_ms=1_000))
    reply = client.post("/v1/vqa", content=body("tiny", image=png(), timeout_ms=5_001), headers=HEADERS)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["code"] == "bad_request"
    assert "timeout_ms" in reply.json()["error"]["message"] and "5000" in reply.json()["error"]["message"]


def test_every_reference_resolves_inside_the_document(redis_url, prefix) -> None:
    schema = create_app(gateway_settings(redis_url, prefix)).openapi()
    text = json.dumps(schema)
    assert "#/$defs/" not in text
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in schema["components"]["schemas"], ref
