"""Every malformed request gets its 4xx code before anything is queued, and the worker keeps serving.

One gateway (with small limits) and one worker thread are shared by the module; each case checks
the status, the error code and the error body shape, and at the end the worker has answered only
the valid requests and rejected nothing: no bad payload reached it.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from edge_client.bitstream import decode_stream, encode_stream, header_bytes
from edge_client.protocol import CONTENT_TYPE
from gateway.api.main import create_app
from gateway.queue import Keys

from .conftest import WorkerThread, gateway_settings, worker_settings
from .helpers import AUTH, HEADERS, body, delete_prefix, png, rid, wait_for

MAX_BODY = 100_000


@pytest.fixture(scope="module")
def env(tiny_model_dir, redis_url, runner):
    """Module-wide gateway + worker; yields (client, worker thread, redis client, prefix)."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    worker = WorkerThread(runner, worker_settings(redis_url, prefix)).start()
    settings = gateway_settings(redis_url, prefix, max_body_bytes=MAX_BODY, max_question_chars=40)
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")
        r = redis.Redis.from_url(redis_url)
        yield client, worker, r, prefix
        r.close()
    worker.stop()
    delete_prefix(redis_url, prefix)


def check_error(reply, status: int, code: str, *needles: str) -> dict:
    assert reply.status_code == status, reply.text
    data = reply.json()
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
    assert data["error"]["code"] == code, data
    for needle in needles:
        assert needle in data["error"]["message"], data
    assert "Traceback" not in reply.text
    return data["error"]


@pytest.fixture(scope="module")
def stream(env, encoder) -> bytes:
    return encoder.encode_image(png(seed=3), entropy=False)


def restream(data: bytes, freqs=None, **header_changes) -> bytes:
    """Re-encode a valid stream with some header fields changed (a well-formed, CRC-valid stream)."""
    decoded = decode_stream(data, freqs)
    header = replace(decoded.header, **header_changes)
    indices = np.resize(decoded.indices, (header.tokens, header.groups, header.stages))
    return encode_stream(header, indices, decoded.stats, entropy=False)


def post(client, content: bytes, **headers):
    return client.post("/v1/vqa", content=content, headers={**HEADERS, **headers})


def test_unsupported_media_type(env, model_name, stream) -> None:
    client = env[0]
    check_error(
        post(client, body(model_name, features=stream), **{"Content-Type": "application/json"}),
        415,
        "unsupported_media_type",
        CONTENT_TYPE,
        "application/json",
    )
    reply = client.post("/v1/vqa", content=body(model_name, features=stream), headers=AUTH)
    check_error(reply, 415, "unsupported_media_type", "none")


def test_body_too_large_by_content_length(env, model_name) -> None:
    reply = post(env[0], b"\x00" * (MAX_BODY + 1))
    check_error(reply, 413, "body_too_large", "Content-Length", str(MAX_BODY))


def test_body_too_large_streamed_without_length(env) -> None:
    sent = []

    def chunks():
        for _ in range(100):
            sent.append(1)
            yield b"\x00" * 10_000

    reply = env[0].post("/v1/vqa", content=chunks(), headers=HEADERS)
    check_error(reply, 413, "body_too_large", str(MAX_BODY))
    assert "content-length" not in {k.lower() for k in reply.request.headers}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb([1, 2, 3]), "map"),
        (msgpack.packb({"v": 1, "request_id": "a", "model": "m"}), "question"),
        (
            msgpack.packb(
                {"v": 1, "request_id": "a", "model": "m", "question": "q", "image": b"x", "extra": 1}
            ),
            "extra",
        ),
        (
            msgpack.packb({"v": 1, "request_id": "a b", "model": "m", "question": "q", "image": b"x"}),
            "request_id",
        ),
        (msgpack.packb({"v": 1, "request_id": "a", "model": "m", "question": "q"}), "exactly one"),
        (
            msgpack.packb(
                {
                    "v": 1,
                    "request_id": "a",
                    "model": "m",
                    "question": "q",
                    "image": b"x",
                    "max_new_tokens": 513,
                }
            ),
            "max_new_tokens",
        ),
    ],
    ids=[
        "not-msgpack",
        "not-a-map",
        "missing-question",
        "extra-field",
        "bad-request-id",
        "no-payload",
        "max-new-tokens",
    ],
)
def test_schema_errors_name_the_field(env, content: bytes, needle: str) -> None:
    check_error(post(env[0], content), 422, "bad_request", needle)


def test_unknown_model(env, stream) -> None:
    check_error(post(env[0], body("no-such-model", features=stream)), 404, "unknown_model", "no-such-model")


def test_question_too_long(env, model_name, stream) -> None:
    check_error(
        post(env[0], body(model_name, features=stream, question="why " * 20)),
        422,
        "question_too_long",
        "40",
        "80",
    )


def test_corrupt_truncated_and_foreign_streams(env, model_name, stream) -> None:
    client = env[0]
    flipped = bytearray(stream)
    flipped[-1] ^= 0x01
    check_error(post(client, body(model_name, features=bytes(flipped))), 422, "corrupt_stream", "CRC")
    check_error(post(client, body(model_name, features=stream[:-1])), 422, "truncated_stream")
    check_error(post(client, body(model_name, features=b"JPEG" + stream[4:])), 422, "corrupt_stream", "magic")
    future = bytearray(stream)
    future[3] = 9
    check_error(post(client, body(model_name, features=bytes(future))), 422, "unsupported_version")


def test_header_model_must_match_request_model(env, model_name, stream) -> None:
    other = restream(stream, model="other-model")
    check_error(
        post(env[0], body(model_name, features=other)), 422, "stream_mismatch", "model", "other-model"
    )


def test_codebook_mismatch_names_both_prefixes(env, model_name, runner, stream) -> None:
    foreign = restream(stream, codebook_hash="0123456789abcdef")
    error = check_error(post(env[0], body(model_name, features=foreign)), 409, "codebook_mismatch")
    assert "0123456789abcdef" in error["message"] and runner.info.codebook_hash[:16] in error["message"]


@pytest.mark.parametrize(
    ("changes", "field", "expected", "got"),
    [
        ({"tokens": 16}, "tokens", "17", "16"),
        ({"codebook_size": 32}, "codebook_size", "16", "32"),
        ({"groups": 2}, "groups", "1", "2"),
        ({"split_site": "embed"}, "split_site", "'preln'", "'embed'"),
    ],
)
def test_geometry_mismatch_names_field_expected_got(
    env, model_name, stream, changes, field, expected, got
) -> None:
    bad = restream(stream, **changes)
    check_error(
        post(env[0], body(model_name, features=bad)),
        422,
        "stream_mismatch",
        f"'{field}'",
        f"expected {expected}",
        f"got {got}",
    )


def test_corrupt_rans_section_with_valid_crc_is_decoded_and_refused(env, model_name, stream) -> None:
    header = replace(decode_stream(stream).header, coder="rans")
    payload = b"\xff" * 7  # fewer bytes than packing (9): a legal rANS length, but garbage
    forged = header_bytes(header, payload) + payload
    check_error(post(env[0], body(model_name, features=forged)), 422, "corrupt_stream", "rANS")


def test_bad_images(env, model_name) -> None:
    client = env[0]
    check_error(post(client, body(model_name, image=b"definitely not an image")), 422, "bad_image")
    corrupt = b"\xff\xd8\xff\xe0" + bytes(60)  # a JPEG signature, then no readable header
    check_error(post(client, body(model_name, image=corrupt)), 422, "bad_image", "start like a JPEG image")
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")  # 100 M pixels in a few KB
    assert len(out.getvalue()) < MAX_BODY
    check_error(post(client, body(model_name, image=out.getvalue())), 422, "bad_image", "bomb")
    out = io.BytesIO()
    Image.new("1", (7_000, 7_000)).save(out, format="PNG")  # under Pillow's limit, over ours
    check_error(post(client, body(model_name, image=out.getvalue())), 422, "bad_image", "7000x7000")
    truncated = png(seed=5)[:1000]
    check_error(post(client, body(model_name, image=truncated)), 422, "bad_image")


def test_auth(env, model_name, stream) -> None:
    client = env[0]
    content = body(model_name, features=stream)
    check_error(
        client.post("/v1/vqa", content=content, headers={"Content-Type": CONTENT_TYPE}),
        401,
        "unauthorized",
        "Bearer",
    )
    check_error(post(client, content, Authorization="Bearer wrong-key-0123456789"), 401, "unauthorized")
    check_error(post(client, content, Authorization="Basic dXNlcjpwYXNz"), 401, "unauthorized")
    check_error(client.get("/v1/models"), 401, "unauthorized")
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_unknown_route_and_method(env) -> None:
    client = env[0]
    check_error(client.get("/v2/nothing"), 404, "not_found")
    wrong_method = client.get("/v1/vqa", headers=AUTH)
    check_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


def test_worker_never_saw_a_refused_payload(env, model_name, stream, encoder) -> None:
    """Runs last in this module: after every refusal above, a valid request is still answered."""
    client, worker, r, prefix = env
    reply = post(client, body(model_name, features=stream))
    assert reply.status_code == 200, reply.text
    assert worker.worker.stats.rejected == 0 and worker.worker.stats.failed == 0
    assert r.xlen(Keys(prefix).stream(model_name)) == 0


def test_worker_survives_bad_entries_that_bypass_the_gateway(env, model_name, stream) -> None:
    """Entries written straight into the stream: each gets an error reply (or the dead-letter
    stream when it cannot even be parsed), and the worker keeps answering."""
    client, worker, r, prefix = env
    keys = Keys(prefix)
    reply_to = keys.replies("bypass")
    deadline = int(time.time() * 1000) + 30_000
    flipped = bytearray(stream)
    flipped[-1] ^= 1
    cases = {
        "garbage": b"\xc1\xc1",
        "corrupt": body(model_name, features=bytes(flipped), request_id="corrupt"),
        "wrong-model": body("other", features=stream, request_id="wrong-model"),
    }
    for request_id, content in cases.items():
        r.xadd(
            keys.stream(model_name),
            {
                "request_id": request_id,
                "model": model_name,
                "reply_to": reply_to,
                "deadline_ms": deadline,
                "enqueued_ms": deadline - 30_000,
                "request": content,
            },
        )
    r.xadd(keys.stream(model_name), {"request_id": "no-fields"})
    codes = {}
    for _ in cases:
        popped = r.blpop([reply_to], timeout=10)
        assert popped is not None, "no error reply"
        data = msgpack.unpackb(popped[1])
        codes[data["request_id"]] = data["code"]
    assert codes == {"garbage": "bad_request", "corrupt": "corrupt_stream", "wrong-model": "unknown_model"}
    wait_for(lambda: r.xlen(keys.dead(model_name)) == 1, what="malformed entry dead-lettered")
    assert r.xlen(keys.stream(model_name)) == 0
    assert post(client, body(model_name, features=stream, request_id=rid())).status_code == 200
