"""The per-tenant in-flight cap (VQA_MAX_IN_FLIGHT_PER_KEY), in Redis and in-process alike: one
tenant at its cap is refused while another is not, a retry joining its own request is no new
request, and a slot comes back when its entry is finished (answered, failed or dropped as expired),
not when its deadline passes: tiny timeouts must not let a key queue without limit."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import RateLimited
from gateway.queue import GatewayQueue, Reply, Ticket, WorkerQueue, now_ms

from .conftest import MODEL, deadline, request


def test_a_tenant_at_its_cap_is_refused_and_others_are_not(run) -> None:
    async def scenario(gateway: GatewayQueue, worker: WorkerQueue) -> None:
        async def send(rid: str, scope: str, until: int | None = None) -> None:
            ticket = Ticket(scope, 100, max_in_flight=2)
            await gateway.enqueue_streamed(request(rid), b"body", until or deadline(), ticket)

        await send("a1", "key:A")
        await send("a2", "key:A")
        standing = await gateway.standing("key:A", MODEL, "a1")
        assert standing.in_flight == 2 and standing.known
        assert not (await gateway.standing("key:A", MODEL, "a3")).known
        with pytest.raises(RateLimited, match="2 requests in flight"):
            await send("a3", "key:A")
        await send("b1", "key:B")  # another tenant's slots are its own
        await send("a1", "key:A")  # a retry joins its request: not a new one
        first = worker.read(1, 0)[0]
        worker.finish([(first, Reply(request_id=first.request_id, model=MODEL, answer="red"))])
        await send("a3", "key:A")  # the finished one's slot is back

        await send("c1", "key:C", until=now_ms() + 50)  # a deadline that passes...
        await send("c2", "key:C")
        await asyncio.sleep(0.1)
        with pytest.raises(RateLimited):  # ...still holds its slot while its entry is queued
            await send("c3", "key:C")
        for job in worker.read(10, 0):  # what a worker does with it: drop it, and finish it
            worker.finish([(job, Reply(request_id=job.request_id, model=MODEL, answer="x"))])
        await send("c3", "key:C")

    run(scenario)
