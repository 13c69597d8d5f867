"""Fixtures: real Redis under a unique key prefix per test, the tiny model loaded once, worker
threads, and gateway apps run with Starlette's TestClient (lifespan included)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from gateway.api.main import create_app
from gateway.config import GatewaySettings, WorkerSettings
from gateway.queue import RedisWorkerQueue
from tests.conftest import TINY_QUANTIZER

from .helpers import API_KEY, delete_prefix, wait_for

REDIS_URL = os.environ.get("VQA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the developer's shell or .env."""
    for name in list(os.environ):
        if name.startswith("VQA_") and name != "VQA_TEST_REDIS_URL":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_prefix(redis_url, name)


@pytest.fixture(scope="session")
def runner(tiny_model_dir: Path):
    from gateway.worker.runner import Runner

    return Runner.load(str(tiny_model_dir), TINY_QUANTIZER, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def model_name(runner) -> str:
    return runner.info.name


@pytest.fixture(scope="session")
def encoder(runner) -> EdgeEncoder:
    return EdgeEncoder(EdgeBundle.from_bytes(runner.bundle))


@pytest.fixture
def published(redis_url: str, prefix: str, runner) -> Iterator[RedisWorkerQueue]:
    """The tiny model's info and bundle in Redis and a live heartbeat, but nothing consuming its
    stream (a stalled worker): requests queue and wait."""
    queue = RedisWorkerQueue(worker_settings(redis_url, prefix), runner.info.name, "publisher")
    queue.ensure_group()
    queue.publish(runner.info.to_json(), runner.bundle, runner.info.bundle_sha256)
    queue.beat(b"{}", 600, runner.info.to_json(), runner.bundle, runner.info.bundle_sha256)
    yield queue
    queue.close()


def gateway_settings(url: str, prefix: str, **overrides) -> GatewaySettings:
    fields = dict(redis_url=url, key_prefix=prefix, api_keys=API_KEY, redis_timeout_s=0.5)
    return GatewaySettings(_env_file=None, **{**fields, **overrides})


def worker_settings(url: str, prefix: str, **overrides) -> WorkerSettings:
    fields = dict(
        redis_url=url,
        key_prefix=prefix,
        max_batch=4,
        max_wait_ms=5,
        poll_ms=50,
        heartbeat_ttl_s=1.5,
        redis_timeout_s=0.5,
    )
    return WorkerSettings(_env_file=None, **{**fields, **overrides})


class WorkerThread:
    """A real Worker (real Redis queue, tiny model) running in a thread of the test process."""

    def __init__(self, runner, settings: WorkerSettings, consumer: str | None = None) -> None:
        from gateway.worker import Worker, worker_id

        block_s = (settings.poll_ms + settings.max_wait_ms) / 1000
        self.queue = RedisWorkerQueue(settings, runner.info.name, consumer or worker_id(), block_s=block_s)
        self.worker = Worker(runner, self.queue, settings)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "worker thread did not stop"
        self.queue.close()


@pytest.fixture
def start_worker(runner) -> Iterator[Callable[..., WorkerThread]]:
    started: list[WorkerThread] = []

    def start(settings: WorkerSettings, consumer: str | None = None) -> WorkerThread:
        thread = WorkerThread(runner, settings, consumer).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def open_client() -> Iterator[Callable[[GatewaySettings], TestClient]]:
    clients: list[TestClient] = []

    def open_(settings: GatewaySettings) -> TestClient:
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield open_
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def serve(redis_url: str, prefix: str, start_worker, open_client):
    """``serve(**gateway_overrides)``: a gateway (default settings plus the overrides) and one live
    worker on the tiny model, ready: ``(client, worker, settings)``."""

    def start(**overrides):
        worker = start_worker(worker_settings(redis_url, prefix))
        settings = gateway_settings(redis_url, prefix, **overrides)
        client = open_client(settings)
        wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")
        return client, worker, settings

    return start


@pytest.fixture
def served(serve):
    """A gateway + one live worker on the tiny model: ``(client, worker, settings)``."""
    return serve()
