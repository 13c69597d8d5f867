"""``benchmarks.serving_load``'s load generator against a stub HTTP server: latency from the
schedule (open loop) and from the socket write are both recorded, and summarized side by side."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from benchmarks.harness.payloads import Item
from benchmarks.serving_load import Loader, RawClient, summarize

REPLY = msgpack.packb({"answer": "red", "queue_ms": 1.0, "compute_ms": 2.0, "batch_size": 1})
SERVER_DELAY_S = 0.01


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            fields = dict(line.split(b": ", 1) for line in head.strip().split(b"\r\n")[1:])
            await reader.readexactly(int(fields[b"Content-Length"]))
            await asyncio.sleep(SERVER_DELAY_S)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(REPLY) + REPLY)
    except asyncio.IncompleteReadError:  # the client closed its connection
        pass
    finally:
        writer.close()
        await writer.wait_closed()


async def _records(late_by_s: float) -> list:
    handlers: list[asyncio.Task] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        await _serve(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    items = [Item({"v": 1, "model": "m", "question": "q", "features": b"x"}, "red", 10)]
    async with RawClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        loader = Loader(client, items, seed=0)
        closed = await loader.one()
        scheduled = time.perf_counter() - late_by_s  # an arrival the generator is late for
        opened = await loader.one(started=scheduled)
    server.close()
    await server.wait_closed()
    await asyncio.gather(*handlers)
    return [closed, opened]


def test_open_loop_records_latency_from_schedule_and_from_send() -> None:
    closed, opened = asyncio.run(_records(late_by_s=0.2))
    assert closed.ok and opened.ok and opened.correct
    for record in (closed, opened):
        assert SERVER_DELAY_S * 1e3 <= record.latency_from_send_ms <= record.latency_ms
    assert closed.latency_ms - closed.latency_from_send_ms < 50  # both count from the send
    assert opened.latency_ms >= 200 + opened.latency_from_send_ms  # the lag stays in latency_ms only

    summary = summarize([closed, opened], elapsed_s=1.0)
    assert summary["overhead_ms"]["p50"] > summary["overhead_from_send_ms"]["p50"] > 0
    from_send = sorted(r.latency_from_send_ms - 3.0 for r in (closed, opened))
    assert summary["overhead_from_send_ms"]["p50"] == pytest.approx(sum(from_send) / 2, abs=0.01)
    assert summary["latency_from_send_ms"]["mean"] > SERVER_DELAY_S * 1e3
