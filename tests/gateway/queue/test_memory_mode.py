"""``VQA_QUEUE=memory``: gateway and worker loop in one process, same API, no Redis."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from gateway.api.main import create_app
from gateway.config import GatewaySettings
from gateway.rate_limit import MemoryRateLimiter, RateLimit
from tests.conftest import TINY_QUANTIZER

from ..helpers import MSGPACK, body, png, wait_for


@pytest.fixture(scope="module")
def memory_client(tiny_model_dir):
    settings = GatewaySettings(
        _env_file=None,
        queue="memory",
        allow_anonymous=True,
        model=str(tiny_model_dir),
        quantizer=TINY_QUANTIZER,
        device="cpu",
        max_batch=4,
        max_wait_ms=20,
        poll_ms=50,
        max_backlog=4,
        rate_limit_per_s=1000,  # generous: the tests below are not slowed, the wiring is exercised
        rate_limit_burst=1000,
    )
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=60, what="in-process model")
        yield client


def test_memory_mode_answers_and_serves_the_bundle(memory_client) -> None:
    (entry,) = memory_client.get("/v1/models").json()["data"]
    assert entry["live_workers"] == 1
    bundle = memory_client.get(f"/v1/models/{entry['name']}/edge-bundle")
    encoder = EdgeEncoder(EdgeBundle.from_bytes(bundle.content))
    content = body(entry["name"], features=encoder.encode_image(png(seed=31)), request_id="mem-1")
    first = memory_client.post("/v1/vqa", content=content, headers=MSGPACK)  # anonymous: no key
    assert first.status_code == 200, first.text
    again = memory_client.post("/v1/vqa", content=content, headers=MSGPACK)
    assert again.json() == first.json()  # idempotent retry: the stored answer
    cloud = memory_client.post("/v1/vqa", content=body(entry["name"], image=png(seed=32)), headers=MSGPACK)
    assert cloud.status_code == 200


def test_memory_mode_validation_and_backlog(memory_client) -> None:
    name = memory_client.get("/v1/models").json()["data"][0]["name"]
    bad = memory_client.post("/v1/vqa", content=body(name, features=b"AVQ\x01"), headers=MSGPACK)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "truncated_stream"
    contents = [body(name, image=png(seed=40 + i)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(
                lambda c: memory_client.post("/v1/vqa", content=c, headers=MSGPACK).status_code, contents
            )
        )
    assert set(statuses) <= {200, 429} and 200 in statuses


def test_memory_mode_deadline(memory_client) -> None:
    name = memory_client.get("/v1/models").json()["data"][0]["name"]
    reply = memory_client.post(
        "/v1/vqa", content=body(name, image=png(seed=50), timeout_ms=1), headers=MSGPACK
    )
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "deadline_exceeded"


def test_memory_mode_rate_limits_in_process(memory_client) -> None:
    app = memory_client.app
    assert isinstance(app.state.limiter, MemoryRateLimiter)
    generous = app.state.limiter
    app.state.limiter = MemoryRateLimiter(RateLimit(per_s=0.5, burst=2))
    try:
        assert [memory_client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
        refused = memory_client.get("/v1/models")
        assert refused.json()["error"]["code"] == "rate_limited" and refused.headers["retry-after"] == "2"
    finally:
        app.state.limiter = generous


def test_memory_mode_streams_and_keeps_features_for_follow_ups(memory_client) -> None:
    """The in-process queue and image cache behave as Redis's do: tokens then done, a follow-up
    by image_ref, a resume after an event id."""
    from edge_client.protocol import VQARequest, encode_request
    from edge_client.sse import EventParser
    from gateway.api.image_cache import MemoryImageCache

    assert isinstance(memory_client.app.state.images, MemoryImageCache)
    (entry,) = memory_client.get("/v1/models").json()["data"]
    encoder = EdgeEncoder(
        EdgeBundle.from_bytes(memory_client.get(f"/v1/models/{entry['name']}/edge-bundle").content)
    )
    content = body(entry["name"], features=encoder.encode_image(png(seed=33)), max_new_tokens=5)
    stream = {**MSGPACK, "Accept": "text/event-stream"}
    parser = EventParser()
    reply = memory_client.post("/v1/vqa", content=content, headers=stream)
    events = [e for e in map(parser.feed, reply.text.split("\n")) if e is not None]
    assert [e.event for e in events][-1] == "done" and events[0].event == "token", reply.text
    done = json.loads(events[-1].data)
    resumed = memory_client.post(
        "/v1/vqa", content=content, headers={**stream, "Last-Event-ID": events[0].id}
    )
    assert resumed.text.count("event: token") == len(events) - 2

    follow_up = VQARequest(
        request_id="mem-follow-up", question="and its color ?", image_ref=bytes.fromhex(done["image_ref"])
    )
    again = memory_client.post("/v1/vqa", content=encode_request(follow_up), headers=MSGPACK)
    assert again.status_code == 200 and again.json()["model"] == entry["name"], again.text
