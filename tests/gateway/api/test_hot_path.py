"""What the lean ``POST /v1/vqa`` path must keep: its OpenAPI entry, overridable cold-route
dependencies, and metrics counted per label set even though the children are cached."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from edge_client.protocol import CONTENT_TYPE, VQAResponse
from gateway.api import deps
from gateway.api.main import create_app
from gateway.metrics import Metrics

from ..conftest import gateway_settings
from ..helpers import AUTH


def test_vqa_route_still_documents_auth_accept_and_body(redis_url, prefix) -> None:
    schema = create_app(gateway_settings(redis_url, prefix)).openapi()
    post = schema["paths"]["/v1/vqa"]["post"]
    assert post["security"] == [{"HTTPBearer": []}]
    assert [(p["in"], p["name"]) for p in post["parameters"]] == [
        ("header", "accept"),
        ("header", "last-event-id"),
    ]
    assert CONTENT_TYPE in post["requestBody"]["content"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/VQAResponse"
    }
    assert {"401", "413", "415", "422", "429", "504"} <= set(post["responses"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


class _NoModels:
    async def all(self) -> list:
        return []


def test_cold_routes_still_take_dependency_overrides(redis_url, prefix) -> None:
    app = create_app(gateway_settings(redis_url, prefix))
    app.dependency_overrides[deps.get_registry] = _NoModels
    with TestClient(app) as client:
        reply = client.get("/v1/models", headers=AUTH)
    assert reply.status_code == 200 and reply.json() == {"object": "list", "data": []}


def test_cached_metric_children_count_every_observation() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.observe_request("/v1/vqa", 200, "ok", 0.002)
    metrics.observe_request("/v1/vqa", 422, "bad_request", 0.001)
    answer = VQAResponse(request_id="r", model="m", answer="red", queue_ms=4.0, compute_ms=20.0, batch_size=3)
    metrics.observe_answer(answer)
    metrics.observe_answer(answer)
    text = generate_latest(metrics.registry).decode()
    assert 'vqa_requests_total{code="ok",route="/v1/vqa",status="200"} 3.0' in text
    assert 'vqa_requests_total{code="bad_request",route="/v1/vqa",status="422"} 1.0' in text
    assert 'vqa_request_seconds_count{route="/v1/vqa"} 4.0' in text
    assert 'vqa_batch_size_count{model="m"} 2.0' in text
    assert 'vqa_compute_seconds_sum{model="m"} 0.04' in text
    assert 'vqa_queue_wait_seconds_bucket{le="0.005",model="m"} 2.0' in text
