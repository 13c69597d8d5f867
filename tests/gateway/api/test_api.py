"""The happy paths of every route, through the real app, Redis and a worker thread."""

from __future__ import annotations

import hashlib

import msgpack

from edge_client.bundle import EdgeBundle
from edge_client.protocol import CONTENT_TYPE

from ..conftest import gateway_settings
from ..helpers import AUTH, HEADERS, body, png, rid


def test_features_request_is_answered(served, model_name, encoder) -> None:
    client, worker, _ = served
    request_id = rid()
    features = encoder.encode_image(png(seed=1))
    reply = client.post(
        "/v1/vqa", content=body(model_name, features=features, request_id=request_id), headers=HEADERS
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert set(data) == {
        "request_id",
        "model",
        "answer",
        "queue_ms",
        "compute_ms",
        "batch_size",
        "image_ref",
        "prompt_tokens",
        "completion_tokens",
        "unknown_words",
    }
    assert data["request_id"] == request_id and data["model"] == model_name
    assert data["image_ref"] == hashlib.sha256(features).hexdigest()[:32]  # what a follow-up names
    assert isinstance(data["answer"], str) and data["batch_size"] >= 1 and data["compute_ms"] > 0
    assert worker.worker.stats.answered == 1


def test_cloud_only_request_and_msgpack_reply(served, model_name) -> None:
    client, _, _ = served
    reply = client.post(
        "/v1/vqa",
        content=body(model_name, image=png(seed=2), max_new_tokens=3),
        headers={**HEADERS, "Accept": CONTENT_TYPE},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == CONTENT_TYPE
    data = msgpack.unpackb(reply.content)
    assert data["model"] == model_name and len(data["answer"].split()) <= 3


def test_models_listing(served, model_name, runner) -> None:
    client, _, _ = served
    reply = client.get("/v1/models", headers=AUTH)
    assert reply.status_code == 200 and reply.json()["object"] == "list"  # OpenAI's shape
    (entry,) = reply.json()["data"]
    info = runner.info
    assert entry["name"] == entry["id"] == model_name and entry["object"] == "model"
    assert entry["split_site"] == "preln" and entry["tokens"] == 17
    assert (entry["groups"], entry["stages"], entry["codebook_size"]) == (1, 1, 16)
    assert entry["codebook_hash"] == info.codebook_hash
    assert entry["bundle_sha256"] == hashlib.sha256(runner.bundle).hexdigest()
    assert entry["live_workers"] == 1
    one = client.get(f"/v1/models/{model_name}", headers=AUTH).json()
    assert {k: v for k, v in one.items() if k != "created"} == {
        k: v for k, v in entry.items() if k != "created"
    }
    assert client.get("/v1/models/no-such-model", headers=AUTH).json()["error"]["code"] == "unknown_model"


def test_edge_bundle_download_and_revalidation(served, model_name, runner) -> None:
    client, _, _ = served
    reply = client.get(f"/v1/models/{model_name}/edge-bundle", headers=AUTH)
    assert reply.status_code == 200
    bundle = EdgeBundle.from_bytes(reply.content)
    assert reply.headers["etag"] == f'"{bundle.sha256}"'
    assert reply.headers["x-codebook-hash"] == bundle.codebook_hash == runner.info.codebook_hash
    again = client.get(
        f"/v1/models/{model_name}/edge-bundle", headers={**AUTH, "If-None-Match": reply.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    missing = client.get("/v1/models/nope/edge-bundle", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"


def test_health_readiness_metrics_and_docs(served, model_name, encoder) -> None:
    client, _, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["live_workers"] == {model_name: 1}
    client.post("/v1/vqa", content=body(model_name, features=encoder.encode_image(png())), headers=HEADERS)
    client.post("/v1/vqa", content=b"\xc1", headers=HEADERS)
    text = client.get("/metrics").text
    assert 'vqa_requests_total{code="ok",route="/v1/vqa",status="200"} 1.0' in text
    assert 'vqa_requests_total{code="bad_request",route="/v1/vqa",status="422"} 1.0' in text
    assert f'vqa_batch_size_count{{model="{model_name}"}} 1.0' in text
    assert "vqa_queue_wait_seconds_bucket" in text and "vqa_compute_seconds_bucket" in text
    assert f'vqa_live_workers{{model="{model_name}"}} 1.0' in text  # per model, read at scrape
    schema = client.get("/openapi.json").json()
    assert {"/v1/vqa", "/v1/models", "/v1/models/{name}/edge-bundle", "/readyz"} <= set(schema["paths"])
    # No CDN-loaded Swagger UI on the web page's origin
    assert client.get("/docs").status_code == client.get("/redoc").status_code == 404


def test_keys_configured_as_sha256_digests_authenticate(served, redis_url, prefix, open_client) -> None:
    key = "digest-only-key-0123456789"
    digest = hashlib.sha256(key.encode()).hexdigest()
    client = open_client(gateway_settings(redis_url, prefix, api_keys=f"sha256:{digest}"))
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    refused = client.get("/v1/models", headers=AUTH)  # a valid key elsewhere, not configured here
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"


def test_gateway_readiness_does_not_wait_for_workers(redis_url, prefix, open_client) -> None:
    """The pod probe (/readyz/gateway) needs only Redis; /readyz also needs a live worker per model."""
    client = open_client(gateway_settings(redis_url, prefix))
    assert client.get("/readyz/gateway").json() == {"status": "ready"}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
