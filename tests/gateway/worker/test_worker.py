"""The worker loop's replies: streamed text as it is generated, token counts, unknown words, the
requests it refuses, and follow-ups answered from the prefix cache (in-process queue, tiny model)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from edge_client.protocol import VQARequest, decode_request, encode_request
from gateway.config import WorkerLoopSettings
from gateway.queue import Job, MemoryQueue, Reply, now_ms
from gateway.queue.base import PartialEntry
from gateway.worker import Worker
from gateway.worker.runner import Runner
from models.data import generate_shapes
from tests.conftest import TINY_QUANTIZER


@pytest.fixture(scope="module")
def cached_runner(tiny_model_dir: Path) -> Runner:
    return Runner.load(str(tiny_model_dir), TINY_QUANTIZER, device="cpu", dtype="float32", prefix_cache_mb=8)


def _job(runner: Runner, features: bytes, question: str, *, stream: bool = False, **fields) -> Job:
    request = VQARequest(
        request_id=uuid.uuid4().hex,
        model=runner.info.name,
        question=question,
        features=features,
        **fields,
    )
    now = now_ms()
    return Job(
        "1-0",
        request.model,
        request.request_id,
        "memory",
        now + 60_000,
        now,
        encode_request(request),
        "key:0123456789abcdef",
        stream=stream,
    )


def _process(runner: Runner, jobs: list[Job]) -> tuple[Worker, list[Reply], dict[str, list[PartialEntry]]]:
    """``Worker.process`` over an in-process queue; the replies and each job's partial stream."""

    async def main() -> tuple[Worker, list[Reply], dict[str, list[PartialEntry]]]:
        queue = MemoryQueue(WorkerLoopSettings(_env_file=None, queue="memory"))
        await queue.start()
        worker = Worker(
            runner, queue.for_worker(runner.info.name, "test"), WorkerLoopSettings(_env_file=None)
        )
        done = await asyncio.to_thread(worker.process, jobs)
        partials = {
            job.request_id: await queue.read_partials(job.model, job.request_id, "0-0", 0) for job in jobs
        }
        return worker, [reply for _, reply in done], partials

    return asyncio.run(main())


def test_streamed_jobs_publish_their_text_and_every_reply_counts_its_tokens(cached_runner: Runner) -> None:
    runner = cached_runner
    image = generate_shapes(1, seed=2, size=runner.info.image_size).images[0]
    features = EdgeEncoder(EdgeBundle.from_bytes(runner.bundle)).encode_image(image)
    jobs = [
        _job(runner, features, "what color is the shape?", stream=True, max_new_tokens=6),
        _job(
            runner, features, "what Xyzzy shape is present?", max_new_tokens=3, history=["is it red?", "no"]
        ),
        _job(runner, features, "xyzzy plugh"),
        _job(runner, features, "is it blue?", max_new_tokens=runner.info.max_new_tokens + 1),
    ]
    worker, replies, partials = _process(runner, jobs)
    by_id = {reply.request_id: reply for reply in replies}
    streamed, plain, unreadable, too_long = (by_id[job.request_id] for job in jobs)
    assert streamed.answer and "".join(p.text for p in partials[streamed.request_id]) == streamed.answer
    assert not partials[plain.request_id]  # not asked to stream
    for reply, job in ((streamed, jobs[0]), (plain, jobs[1])):
        prompt = runner.prepare_request(decode_request(job.body), job.scope).prompt
        assert reply.ok and reply.prompt_tokens == len(prompt)
        assert 1 <= reply.completion_tokens <= (6 if reply is streamed else 3)
    assert plain.unknown_words == ["Xyzzy"] and streamed.unknown_words == []
    assert (unreadable.code, too_long.code) == ("unreadable_question", "bad_request")
    assert worker.stats.answered == 2 and worker.stats.cached == 0

    # The same image again: answered from the cached prefix, with the same answer.
    worker, again, _ = _process(runner, jobs[:1])
    assert again[0].answer == streamed.answer and worker.stats.cached == 1
