"""Partial streams, the queue side of streamed answers, in Redis and in-process alike: a streamed
job's text in order then its reply, nothing for an unstreamed one, a reader woken by a write, a
stored answer returned at once, and a streamed request that joins an unstreamed one still ended."""

from __future__ import annotations

import asyncio

from gateway.queue import GatewayQueue, Reply, Ticket, WorkerQueue

from .conftest import MODEL, deadline, request


def test_a_streamed_job_writes_its_text_then_its_reply(run) -> None:
    async def scenario(gateway: GatewayQueue, worker: WorkerQueue) -> None:
        assert await gateway.enqueue_streamed(request("r1"), b"body", deadline(), Ticket("key:0", 10)) is None
        (job,) = worker.read(1, 0)
        assert job.stream and job.scope == "key:0"  # whose prefix cache entries the worker may use
        for text in ("a red ", "", "circle"):  # empty text writes nothing
            worker.publish_partial(job, text)
        entries = await gateway.read_partials(MODEL, "r1", "0-0", 0)
        assert [(e.text, e.reply) for e in entries] == [("a red ", None), ("circle", None)]
        assert await gateway.read_partials(MODEL, "r1", entries[0].entry_id, 0) == entries[1:]

        waiting = asyncio.create_task(gateway.read_partials(MODEL, "r1", entries[-1].entry_id, 5_000))
        await asyncio.sleep(0.1)
        reply = Reply(request_id="r1", model=MODEL, answer="a red circle", completion_tokens=3)
        worker.finish([(job, reply)])
        (end,) = await waiting  # woken by the write, not by its timeout
        assert end.reply == reply and end.text == ""
        stored = await gateway.enqueue_streamed(request("r1"), b"body", deadline(), Ticket("key:0", 10))
        assert stored == reply  # finished: nothing is queued again
        assert worker.read(1, 0) == []

    run(scenario)


def test_an_unstreamed_job_writes_nothing_until_a_stream_joins_it(run) -> None:
    async def scenario(gateway: GatewayQueue, worker: WorkerQueue) -> None:
        plain = asyncio.create_task(gateway.submit(request("r2"), b"body", deadline(), Ticket("key:1", 10)))
        await asyncio.sleep(0.1)
        (job,) = worker.read(1, 0)
        assert not job.stream and job.scope == "key:1"
        worker.publish_partial(job, "blue")  # a no-op: nobody streams it
        assert await gateway.read_partials(MODEL, "r2", "0-0", 0) == []
        assert (
            await gateway.enqueue_streamed(request("r2"), b"body", deadline(), Ticket("key:0", 10)) is None
        )  # joined
        assert await gateway.read_partials(MODEL, "r2", "0-0", 0) == []  # the join marker is no entry
        reply = Reply(request_id="r2", model=MODEL, answer="blue")
        worker.finish([(job, reply)])
        (end,) = await gateway.read_partials(MODEL, "r2", "0-0", 1_000)
        assert end.reply == reply and (await plain) == reply

    run(scenario)


def test_a_new_attempt_does_not_read_an_earlier_attempts_end(run) -> None:
    async def scenario(gateway: GatewayQueue, worker: WorkerQueue) -> None:
        await gateway.enqueue_streamed(request("r3"), b"body", deadline(), Ticket("key:0", 10))
        (job,) = worker.read(1, 0)
        worker.publish_partial(job, "half")
        worker.finish([(job, Reply(request_id="r3", model=MODEL, code="worker_error", message="boom"))])
        assert (await gateway.read_partials(MODEL, "r3", "0-0", 0))[-1].reply is not None
        assert (
            await gateway.enqueue_streamed(request("r3"), b"body", deadline(), Ticket("key:0", 10)) is None
        )  # errors are not stored
        assert await gateway.read_partials(MODEL, "r3", "0-0", 0) == []

    run(scenario)
