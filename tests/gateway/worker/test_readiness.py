"""Worker readiness: a warm-up batch before announcing, and a per-host --check probe."""

from __future__ import annotations

import socket

from gateway.queue import RedisWorkerQueue

from ..conftest import worker_settings
from ..helpers import wait_for


def test_warmup_answers_a_full_synthetic_batch(runner) -> None:
    assert runner.warmup(3) > 0


def test_live_workers_can_be_counted_per_host(redis_url: str, prefix: str, runner, start_worker) -> None:
    settings = worker_settings(redis_url, prefix)
    start_worker(settings, consumer="pod-a-1-abc123")
    start_worker(settings, consumer=f"{socket.gethostname()}-2-def456")
    probe = RedisWorkerQueue(settings, runner.info.name, consumer="check")
    try:
        wait_for(lambda: probe.live_workers() == 2, what="two live workers")
        assert probe.live_workers("pod-a") == 1
        assert probe.live_workers(socket.gethostname()) == 1
        assert probe.live_workers("pod-b") == 0  # another pod's worker does not make this one ready
    finally:
        probe.close()
