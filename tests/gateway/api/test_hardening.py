"""Hardening checks: key comparison, the body cap on a streamed body, opaque 500s, CORS off by default."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api import deps
from gateway.api.main import create_app

from ..conftest import gateway_settings
from ..helpers import API_KEY, AUTH, HEADERS, body, png

KEYS = [f"{API_KEY}-{i}" for i in range(3)]


def test_keys_are_stored_hashed_and_compared_against_every_digest(
    redis_url, prefix, open_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gateway_settings(redis_url, prefix, api_keys=",".join(KEYS))
    assert settings.api_keys == [f"sha256:{hashlib.sha256(k.encode()).hexdigest()}" for k in KEYS]
    assert not any(key in settings.model_dump_json() for key in KEYS)
    client = open_client(settings)
    calls, original = [], hmac.compare_digest

    def compare_digest(a, b) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", compare_digest)
    for key, status in [(KEYS[0], 200), (KEYS[2], 200), ("not-a-configured-key-000", 401)]:
        calls.clear()
        reply = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == status
        # No early exit on a match, and only digests are compared (never the presented key).
        assert len(calls) == len(KEYS) and all(len(a) == len(b) == 64 for a, b in calls)


def test_streamed_body_over_the_cap_is_refused_before_it_is_read(redis_url, prefix, open_client) -> None:
    """A 2 GiB chunked body without Content-Length, driven straight through the ASGI interface
    (TestClient would read the whole body first): 413 after the chunk that crosses the cap."""
    cap, chunk = 100_000, b"\x00" * 65_536
    client = open_client(gateway_settings(redis_url, prefix, max_body_bytes=cap))
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < 2**31 // len(chunk)}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/vqa",
        "raw_path": b"/v1/vqa",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"transfer-encoding", b"chunked"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b'"body_too_large"' in b"".join(m.get("body", b"") for m in sent[1:])
    assert pulled == cap // len(chunk) + 1  # held at most cap + one chunk, never the whole body


class BrokenRegistry:
    """A registry whose every lookup fails with an internal error naming a source path."""

    async def get(self, name: str):
        raise RuntimeError(f"registry exploded in {__file__} line 1")

    async def all(self):
        raise RuntimeError(f"registry exploded in {__file__} line 2")


def test_internal_errors_answer_an_opaque_500(redis_url, prefix) -> None:
    model_name = "any-model"
    app = create_app(gateway_settings(redis_url, prefix))
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.registry = BrokenRegistry()  # what every route reads, hot path and dependencies alike
        replies = [
            client.get("/v1/models", headers=AUTH),
            client.get(f"/v1/models/{model_name}/edge-bundle", headers=AUTH),
            client.post("/v1/vqa", content=body(model_name, image=b"x"), headers=HEADERS),
            client.get("/readyz"),
        ]
    for reply in replies:
        assert reply.status_code == 500, reply.text
        assert reply.json() == {
            "error": {"code": "server_error", "message": "internal error; see the gateway log"}
        }
        for leak in ("Traceback", "/work/", ".py", "RuntimeError", "exploded"):
            assert leak not in reply.text


def test_cors_is_off_by_default(redis_url, prefix, open_client) -> None:
    client = open_client(gateway_settings(redis_url, prefix))
    origin = {"Origin": "https://evil.example"}
    for reply in [
        client.get("/healthz", headers=origin),
        client.get("/v1/models", headers={**AUTH, **origin}),
        client.options("/v1/vqa", headers={**origin, "Access-Control-Request-Method": "POST"}),  # a preflight
    ]:
        assert not any(h.startswith("access-control-") for h in reply.headers), reply.headers


def test_cors_origins_opt_in(redis_url, prefix, open_client) -> None:
    client = open_client(gateway_settings(redis_url, prefix, cors_origins="https://app.example.com"))
    allowed = client.get("/v1/models", headers={**AUTH, "Origin": "https://app.example.com"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    preflight = client.options(
        "/v1/vqa",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    other = client.get("/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ValidationError, match="origins like"):
        gateway_settings(redis_url, prefix, cors_origins="https://app.example.com/path")


def test_queue_errors_do_not_reveal_the_redis_address(open_client) -> None:
    client = open_client(gateway_settings("redis://127.0.0.1:1/0", "nowhere"))
    reply = client.get("/v1/models", headers=AUTH)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_unavailable"
    assert "ConnectionError" in reply.text and "127.0.0.1" not in reply.text


def test_cloud_only_images_are_decoded_a_few_at_a_time(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG of a few hundred KB can declare 40 MP (160 MB decoded): VQA_IMAGE_DECODES bounds how
    many the gateway holds at once, whatever the request concurrency; the rest wait and pass."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.api import pipeline

    client, _, settings = serve(image_decodes=1)
    model = client.get("/v1/models", headers=AUTH).json()["data"][0]["name"]
    now, most, lock, check = [0], [0], threading.Lock(), pipeline.check_request

    def counted(*args, **kwargs) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        try:
            check(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(pipeline, "check_request", counted)
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda seed: client.post(
                    "/v1/vqa", content=body(model, image=png(seed=seed)), headers=HEADERS
                ),
                range(4),
            )
        )
    assert [r.status_code for r in replies] == [200] * 4 and settings.image_decodes == 1
    assert most[0] == 1


def test_images_waiting_for_a_decode_slot_count_and_give_up_at_their_deadline(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one slot held by a slow check: a key's images waiting for it count against its in-flight
    cap (nothing is queued yet), and one whose deadline passes while it waits gets 504, unqueued."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.api import pipeline

    client, _, _ = serve(image_decodes=1, max_in_flight_per_key=2)
    model = client.get("/v1/models", headers=AUTH).json()["data"][0]["name"]
    check = pipeline.check_request

    def slow(*args, **kwargs) -> None:
        time.sleep(0.6)
        check(*args, **kwargs)

    monkeypatch.setattr(pipeline, "check_request", slow)

    def post(seed: int, **fields):
        return client.post("/v1/vqa", content=body(model, image=png(seed=seed), **fields), headers=HEADERS)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(post, range(3)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 429], [r.text for r in replies]  # two waiting or decoding: the cap
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(post, 10)
        time.sleep(0.1)
        late = pool.submit(post, 11, timeout_ms=200).result()
        assert held.result().status_code == 200
    assert late.status_code == 504 and "waited for a decode slot" in late.json()["error"]["message"]
