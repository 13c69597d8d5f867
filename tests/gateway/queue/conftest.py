"""Scenarios run against both queues, Redis and in-process: one fixture, ``run``, gives each a
gateway side and a worker side of the same queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from edge_client.protocol import VQARequest
from gateway.queue import GatewayQueue, MemoryQueue, RedisGatewayQueue, RedisWorkerQueue, WorkerQueue, now_ms

from ..conftest import gateway_settings, worker_settings

MODEL = "tiny"
Scenario = Callable[[GatewayQueue, WorkerQueue], Awaitable[None]]


@pytest.fixture(params=["redis", "memory"])
def run(request, redis_url, prefix) -> Callable[[Scenario], None]:
    def run_(scenario: Scenario) -> None:
        async def main() -> None:
            if request.param == "redis":
                gateway: GatewayQueue = RedisGatewayQueue(gateway_settings(redis_url, prefix), "gw-1")
                worker: WorkerQueue = RedisWorkerQueue(worker_settings(redis_url, prefix), MODEL, "w-1")
            else:
                memory = MemoryQueue(gateway_settings(redis_url, prefix, queue="memory"))
                gateway, worker = memory, memory.for_worker(MODEL, "w-1")
            await gateway.start()
            worker.ensure_group()
            try:
                await scenario(gateway, worker)
            finally:
                await gateway.close()
                worker.close()

        asyncio.run(main())

    return run_


def request(request_id: str) -> VQARequest:
    return VQARequest(request_id=request_id, model=MODEL, question="what shape?", image=b"\x89PNG")


def deadline() -> int:
    return now_ms() + 10_000
