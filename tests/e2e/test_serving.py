"""The whole network path: edge-client CLI -> uvicorn gateway -> Redis -> vqa-worker processes.

Covers: answers over the network (features and cloud-only), ``--check``; two workers sharing one
stream; a worker SIGKILLed holding a batch loses no request (another claims it); SIGTERM drains the
batch in hand and exits 0; ``--burst`` drains the stream and exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway.helpers import API_KEY, body, png, wait_for

from .conftest import REDIS_URL, REPO


def edge_client(stack, image, *args: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_client.cli",
            "ask",
            str(image),
            "what shape is it ?",
            "--gateway",
            stack.url,
            "--api-key",
            API_KEY,
            "--model",
            stack.model,
            "--json",
            "--cache-dir",
            str(stack.logs.parent / "cache"),
            *args,
        ],
        cwd=REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr + stack.log_text()
    return json.loads(out.stdout)


def check(stack) -> int:
    args = ["-m", "gateway.worker", "--check", "--model", str(stack.model_dir), "--redis-url", REDIS_URL]
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=stack.env, capture_output=True, timeout=60
    ).returncode


def test_edge_client_through_gateway_and_worker(stack, tmp_path) -> None:
    assert check(stack) == 1  # no worker yet
    stack.worker()
    stack.wait_live(1)
    wait_for(lambda: httpx.get(f"{stack.url}/readyz").status_code == 200, what="readiness")
    image = tmp_path / "shape.png"
    image.write_bytes(png(seed=61))

    answer = edge_client(stack, image)
    assert answer["model"] == stack.model and isinstance(answer["answer"], str)
    assert not answer["cloud_only"] and answer["request_bytes"] < 200  # 17 tokens x 4 bits + header
    cloud = edge_client(stack, image, "--cloud-only")
    assert cloud["cloud_only"] and cloud["request_bytes"] > answer["request_bytes"]
    assert check(stack) == 0

    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'vqa_requests_total{code="ok",route="/v1/vqa",status="200"} 2.0' in metrics
    models = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert models["data"][0]["live_workers"] == 1


def test_two_workers_share_one_stream(stack, post, encoder) -> None:
    for _ in range(2):
        stack.worker("--max-batch", "2", "--max-wait-ms", "30")
    stack.wait_live(2)
    features = encoder.encode_image(png(seed=62))
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: post(body(stack.model, features=features)), range(32)))
    assert [reply.status_code for reply in replies] == [200] * 32, stack.log_text()

    def answered_by_each() -> list[int] | None:
        beats = [
            json.loads(stack.redis.get(key)) for key in stack.redis.scan_iter(f"{stack.prefix}:heartbeat:*")
        ]
        counts = sorted(beat["answered"] for beat in beats)
        return counts if sum(counts) == 32 else None

    counts = wait_for(answered_by_each, timeout=10, what="heartbeats to report 32 answers")
    assert len(counts) == 2 and min(counts) > 0, counts


def test_sigkilled_worker_loses_no_request(stack, post, encoder) -> None:
    # The doomed worker waits up to 5 s to fill a batch of 8, so it dies holding the entries.
    doomed = stack.worker("--max-batch", "8", "--max-wait-ms", "5000", VQA_CLAIM_IDLE_MS="1000")
    stack.wait_live(1)
    features = encoder.encode_image(png(seed=63))
    pool = ThreadPoolExecutor(3)
    replies = [pool.submit(post, body(stack.model, features=features, timeout_ms=60_000)) for _ in range(3)]
    wait_for(
        lambda: sum(stack.pending_by_consumer().values()) == 3, what="the batch in the doomed worker's hands"
    )
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)

    rescuer = stack.worker(VQA_CLAIM_IDLE_MS="1000")
    answers = [future.result(timeout=60) for future in replies]
    pool.shutdown()
    assert [a.status_code for a in answers] == [200] * 3, stack.log_text()
    assert stack.redis.xlen(stack.stream()) == 0
    assert sum(stack.pending_by_consumer().values()) == 0
    assert rescuer.poll() is None


def test_sigterm_drains_the_batch_in_hand(stack, post, encoder) -> None:
    worker = stack.worker("--max-batch", "8", "--max-wait-ms", "10000")
    stack.wait_live(1)
    features = encoder.encode_image(png(seed=64))
    pool = ThreadPoolExecutor(2)
    replies = [pool.submit(post, body(stack.model, features=features)) for _ in range(2)]
    wait_for(lambda: sum(stack.pending_by_consumer().values()) == 2, what="a batch in hand")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, stack.log_text()
    assert [future.result(timeout=10).status_code for future in replies] == [200, 200]
    pool.shutdown()
    assert stack.redis.xlen(stack.stream()) == 0 and stack.live_workers() == 0  # heartbeat removed
    assert httpx.get(f"{stack.url}/readyz").status_code == 503


def test_burst_drains_then_exits(stack, post, encoder) -> None:
    first = stack.worker("--burst")  # nothing queued: publishes the model, drains nothing, exits
    assert first.wait(60) == 0, stack.log_text()
    features = encoder.encode_image(png(seed=65))
    pool = ThreadPoolExecutor(3)
    replies = [pool.submit(post, body(stack.model, features=features)) for _ in range(3)]
    wait_for(lambda: stack.redis.xlen(stack.stream()) == 3, what="3 queued requests (no worker)")
    drainer = stack.worker("--burst", "--max-batch", "2")
    assert drainer.wait(60) == 0, stack.log_text()
    assert [future.result(timeout=10).status_code for future in replies] == [200] * 3
    pool.shutdown()
    assert stack.redis.xlen(stack.stream()) == 0
