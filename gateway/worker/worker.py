"""The worker loop: claim, batch, drop expired, compute, reply + acknowledge; plus its heartbeat.

One :class:`Worker` serves one model from one queue (:class:`~gateway.queue.WorkerQueue`, Redis or
in-process). Each step:

1. every ``VQA_CLAIM_IDLE_MS / 4``, claim entries a dead worker left pending (the queue moves those
   delivered more than ``VQA_MAX_DELIVERIES`` times to the dead-letter stream and tells their
   clients);
2. collect a batch (:func:`~gateway.worker.batching.collect_batch`);
3. reply ``deadline_exceeded`` to entries whose deadline has passed, without computing them;
4. decode + check each entry (an error becomes that entry's error reply, never a crash);
5. compute the batch in one generation (if it fails, each entry is retried alone so one bad
   entry cannot fail the others), publishing the new text of entries that stream after each step;
6. finish every entry: reply, store the result, ``XACK`` + ``XDEL``.

Stopping (SIGTERM, or :meth:`Worker.stop`) lets the batch in hand finish and be acknowledged, then
the loop takes no more and removes its heartbeat. A Redis outage never ends the loop: it waits and
retries, and re-creates its consumer group and published info if Redis lost them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_client.errors import AlignedVQError
from edge_client.protocol import decode_request

from ..config import WorkerLoopSettings
from ..errors import DeadlineExceeded, QueueUnavailable, UnknownModel, WorkerError
from ..queue import Job, Reply, WorkerQueue, now_ms
from .batching import collect_batch, split_expired

if TYPE_CHECKING:
    from ..queue import MemoryQueue
    from .runner import Answer, Prepared, Runner

__all__ = ["Heartbeat", "InProcessWorker", "Partial", "Worker", "WorkerStats", "worker_id"]

log = logging.getLogger(__name__)


def worker_id() -> str:
    """Consumer name: host, pid and a random suffix (a restarted pid must not inherit entries)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerStats:
    batches: int = 0
    answered: int = 0
    rejected: int = 0  # error replies for bad entries
    expired: int = 0  # dropped unprocessed: deadline passed while queued
    failed: int = 0  # compute errors
    cached: int = 0  # answered from a cached prompt prefix (a follow-up about a known image)


class Heartbeat(threading.Thread):
    """Refreshes the worker's heartbeat key every ``VQA_HEARTBEAT_TTL_S / 3`` (its own thread, so a
    long batch does not make the worker look dead)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="vqa-heartbeat", daemon=True)
        self.worker = worker
        self.halt = threading.Event()

    def beat(self) -> None:
        w = self.worker
        status = json.dumps(
            {
                "worker": w.queue.consumer,
                "model": w.runner.info.name,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "device": w.runner.device,
                "started_ms": w.started_ms,
                **w.stats.__dict__,
            }
        ).encode()
        w.queue.beat(
            status, w.settings.heartbeat_ttl_s, w.info_json, w.runner.bundle, w.runner.info.bundle_sha256
        )

    def run(self) -> None:
        while not self.halt.wait(self.worker.settings.heartbeat_interval_s):
            try:
                self.beat()
            except QueueUnavailable as exc:
                log.warning("heartbeat failed: %s", exc.__cause__ or exc)


class Worker:
    """See the module docstring. ``burst``: return once the queue is drained."""

    def __init__(
        self, runner: Runner, queue: WorkerQueue, settings: WorkerLoopSettings, *, burst: bool = False
    ) -> None:
        self.runner = runner
        self.queue = queue
        self.settings = settings
        self.burst = burst
        self.stop_event = threading.Event()
        self.stats = WorkerStats()
        self.started_ms = now_ms()
        self.info_json = runner.info.to_json()
        self.heartbeat = Heartbeat(self)
        self._next_claim = 0.0

    def stop(self) -> None:
        """Finish the batch in hand, then return from :meth:`run` (safe from a signal handler)."""
        self.stop_event.set()

    def _announce(self) -> None:
        """Consumer group, model info + bundle, first heartbeat: what makes the worker visible."""
        self.queue.ensure_group()
        self.queue.publish(self.info_json, self.runner.bundle, self.runner.info.bundle_sha256)
        self.heartbeat.beat()

    def run(self) -> None:
        """Serve until stopped (or, with ``burst``, until drained); Redis outages are waited out."""
        delay, announced = 0.1, False
        try:
            while not self.stop_event.is_set():
                try:
                    if not announced:
                        self._announce()
                        announced = True
                        self.heartbeat.start()
                        log.info(
                            "worker %s serving %s (%s, codebook %s) on %s",
                            self.queue.consumer,
                            self.runner.info.name,
                            self.runner.info.quantizer,
                            self.runner.info.codebook_hash[:16],
                            self.runner.device,
                        )
                    handled = self.step()
                    delay = 0.1
                except QueueUnavailable as exc:
                    log.warning("queue unavailable: %s (retrying in %.1fs)", exc.__cause__ or exc, delay)
                    self.stop_event.wait(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if handled == 0 and self.burst:
                    log.info("burst: queue drained")
                    break
        finally:
            self.heartbeat.halt.set()
            if self.heartbeat.is_alive():  # a beat in flight must not resurrect the heartbeat below
                self.heartbeat.join(5)
            if announced:
                try:
                    self.queue.leave()
                except QueueUnavailable as exc:
                    log.warning("could not remove the heartbeat: %s", exc.__cause__ or exc)
            log.info("worker %s stopped: %s", self.queue.consumer, self.stats)

    def step(self) -> int:
        """One claim + batch + finish; returns the number of entries handled (0: nothing to do)."""
        claimed = []
        if self.burst or time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.settings.claim_idle_ms / 4000
            result = self.queue.claim(self.settings.max_batch)
            claimed = result.jobs
            if result.dead:
                log.error("dead-lettered %d entries", len(result.dead))
        batch = collect_batch(
            self.queue.read,
            self.settings.max_batch,
            self.settings.max_wait_ms,
            self.settings.poll_ms,
            first=claimed,
            stop=self.stop_event,
        )
        if not batch:
            return 0
        self.queue.finish(self.process(batch))
        self.stats.batches += 1
        return len(batch)

    def process(self, batch: list[Job]) -> list[tuple[Job, Reply]]:
        """Replies for every entry of ``batch`` (see steps 3-5 of the module docstring)."""
        start_ms = now_ms()
        live, expired = split_expired(batch, lambda job: job.deadline_ms, start_ms)
        done = [
            (
                job,
                Reply.failure(
                    job,
                    DeadlineExceeded(
                        f"the deadline passed {start_ms - job.deadline_ms} ms before a worker took the "
                        "request; dropped unprocessed"
                    ),
                ),
            )
            for job in expired
        ]
        self.stats.expired += len(expired)
        ready: list[tuple[Job, Prepared]] = []
        for job in live:
            try:
                request = decode_request(job.body)
                if request.request_id != job.request_id or request.model != job.model:
                    raise UnknownModel(
                        f"entry says {job.model}/{job.request_id}, "
                        f"body says {request.model}/{request.request_id}"
                    )
                ready.append((job, self.runner.prepare_request(request, job.scope)))
            except AlignedVQError as exc:
                self.stats.rejected += 1
                done.append((job, Reply.failure(job, exc)))
            except Exception as exc:  # a bad entry must never take the worker down
                log.exception("preparing %s failed", job.request_id)
                self.stats.failed += 1
                done.append((job, Reply.failure(job, WorkerError(f"{type(exc).__name__}: {exc}"))))
        if ready:
            started = time.perf_counter()
            partials = [Partial(self.queue, job) if job.stream else None for job, _ in ready]
            answers = self._compute([prepared for _, prepared in ready], partials)
            compute_ms = (time.perf_counter() - started) * 1000
            for (job, prepared), answer in zip(ready, answers, strict=True):
                if isinstance(answer, AlignedVQError):
                    done.append((job, Reply.failure(job, answer)))
                    continue
                self.stats.answered += 1
                self.stats.cached += prepared.prefix is not None
                done.append(
                    (
                        job,
                        Reply(
                            request_id=job.request_id,
                            model=job.model,
                            answer=answer.text,
                            queue_ms=float(max(0, start_ms - job.enqueued_ms)),
                            compute_ms=compute_ms,
                            batch_size=len(ready),
                            prompt_tokens=answer.prompt_tokens,
                            completion_tokens=answer.completion_tokens,
                            unknown_words=list(prepared.unknown_words),
                        ),
                    )
                )
        return done

    def _compute(
        self, items: list[Prepared], partials: list[Partial | None]
    ) -> list[Answer | AlignedVQError]:
        for partial in partials:
            if partial is not None:
                partial.restart()
        streams = {row: partial for row, partial in enumerate(partials) if partial is not None}
        try:
            answers: list[Answer | AlignedVQError] = [*self.runner.run(items, streams)]
            return answers
        except Exception as exc:
            if len(items) == 1:
                log.exception("compute failed")
                self.stats.failed += 1
                return [WorkerError(f"compute failed: {type(exc).__name__}: {exc}")]
            log.warning("batch of %d failed (%s): retrying each entry alone", len(items), exc)
            return [
                answer
                for item, partial in zip(items, partials, strict=True)
                for answer in self._compute([item], [partial])
            ]


class Partial:
    """Publishes a streaming job's new text (``WorkerQueue.publish_partial``).

    A job retried alone after its batch failed produces its text again from the start: what was
    already published is not sent twice. A queue outage loses partial text, never the answer (the
    reply carries all of it).
    """

    def __init__(self, queue: WorkerQueue, job: Job) -> None:
        self.queue, self.job = queue, job
        self.published = 0  # characters sent to the queue
        self.produced = 0  # characters produced by the current attempt

    def restart(self) -> None:
        self.produced = 0

    def __call__(self, text: str) -> None:
        new = text[max(0, self.published - self.produced) :]
        self.produced += len(text)
        if not new:
            return
        try:
            self.queue.publish_partial(self.job, new)
        except QueueUnavailable as exc:
            log.warning("partial text of %s not published: %s", self.job.request_id, exc.__cause__ or exc)
        self.published += len(new)


class InProcessWorker:
    """``VQA_QUEUE=memory``: load the model and run the worker loop in a thread of the gateway.

    ``failure`` holds the reason if loading failed (``/readyz`` reports it).
    """

    def __init__(self, queue: MemoryQueue, settings: WorkerLoopSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.failure: str | None = None
        self.worker: Worker | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vqa-in-process-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        from .runner import Runner  # torch is imported here, in memory mode only

        s = self.settings
        try:
            runner = Runner.load(
                s.model, s.quantizer, s.device, s.dtype, s.torch_threads, s.fused, s.prefix_cache_mb
            )
        except Exception as exc:
            log.exception("in-process worker could not load %s", s.model)
            self.failure = f"{type(exc).__name__}: {exc}"
            return
        self.worker = Worker(runner, self.queue.for_worker(runner.info.name, "in-process"), self.settings)
        if self._stopping.is_set():
            return
        self.worker.run()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self.worker is not None:
            self.worker.stop()
        self._thread.join(timeout)
