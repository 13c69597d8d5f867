"""Redis goes away: the gateway answers 503 + Retry-After; when Redis is back (empty: no
persistence), gateway and worker recover by themselves — no restart."""

from __future__ import annotations

import pytest

from ..conftest import gateway_settings, worker_settings
from ..helpers import HEADERS, RedisServer, body, png, wait_for


@pytest.fixture
def throwaway_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_down_503_then_recovery(
    throwaway_redis, start_worker, open_client, model_name, encoder
) -> None:
    url = throwaway_redis.url
    start_worker(worker_settings(url, "outage", heartbeat_ttl_s=0.9))
    client = open_client(gateway_settings(url, "outage", registry_ttl_ms=100, retry_after_s=2))
    wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")
    features = encoder.encode_image(png(seed=21))
    assert (
        client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS).status_code
        == 200
    )

    throwaway_redis.stop()
    down = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    assert down.status_code == 503, down.text
    assert down.headers["retry-after"] == "2"
    assert down.json()["error"]["code"] == "queue_unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
    assert client.get("/healthz").status_code == 200  # alive, just not ready

    throwaway_redis.start()  # same port, no data: the worker re-creates its group and republishes

    def answered() -> bool:
        reply = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
        assert reply.status_code in (200, 404, 503), reply.text  # 404 until the worker republished
        return reply.status_code == 200

    wait_for(answered, timeout=15, interval=0.2, what="recovery after the Redis restart")
    assert client.get("/readyz").status_code == 200
