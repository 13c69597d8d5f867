"""Queue semantics through the real API and Redis: back-pressure, deadlines, idempotent retries,
claiming from dead workers and dead letters."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import redis

from gateway.queue import GROUP, Keys, RedisWorkerQueue
from gateway.worker import worker_id

from ..conftest import gateway_settings, worker_settings
from ..helpers import API_KEY, HEADERS, body, png, queue_id, wait_for


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def features(encoder) -> bytes:
    return encoder.encode_image(png(seed=11))


def post_in_background(client, content: bytes, api_key: str = API_KEY):
    pool = ThreadPoolExecutor(1)
    headers = {**HEADERS, "Authorization": f"Bearer {api_key}"}
    future = pool.submit(client.post, "/v1/vqa", content=content, headers=headers)
    pool.shutdown(wait=False)
    return future


def test_backlog_429_then_deadline_504_then_worker_drops_expired(
    redis_url, prefix, published, open_client, start_worker, model_name, features, r
) -> None:
    stream = Keys(prefix).stream(model_name)
    client = open_client(gateway_settings(redis_url, prefix, max_backlog=1, retry_after_s=3))
    waiting = post_in_background(client, body(model_name, features=features, timeout_ms=1200))
    wait_for(lambda: r.xlen(stream) == 1, what="first request queued")

    overloaded = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "3"
    assert overloaded.json()["error"]["code"] == "overloaded"
    assert r.xlen(stream) == 1  # the refused request was not queued

    late = waiting.result(timeout=10)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert "no answer before the deadline" in late.json()["error"]["message"]
    assert client.app.state.queue._waiting == {}  # the expired future was unregistered

    worker = start_worker(worker_settings(redis_url, prefix))
    wait_for(lambda: r.xlen(stream) == 0, what="expired entry dropped")
    wait_for(lambda: worker.worker.stats.expired == 1, what="expired count")
    assert worker.worker.stats.answered == 0 and worker.worker.stats.batches == 1


def test_a_key_at_its_in_flight_cap_gets_429_and_another_key_does_not(
    redis_url, prefix, published, open_client, model_name, r
) -> None:
    other_key = "second-tenant-key-0123456789"
    settings = gateway_settings(redis_url, prefix, max_in_flight_per_key=1, api_keys=f"{API_KEY},{other_key}")
    client = open_client(settings)
    image = body(model_name, image=png(seed=4), timeout_ms=1500)
    waiting = post_in_background(client, image)
    wait_for(lambda: r.xlen(Keys(prefix).stream(model_name)) == 1, what="first request queued")
    refused = client.post("/v1/vqa", content=body(model_name, image=png(seed=5)), headers=HEADERS)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert "VQA_MAX_IN_FLIGHT_PER_KEY" in refused.json()["error"]["message"]
    # Refused before it takes a decode slot: this one would have been a 422.
    undecoded = client.post("/v1/vqa", content=body(model_name, image=b"not an image"), headers=HEADERS)
    assert undecoded.status_code == 429 and undecoded.json()["error"]["code"] == "rate_limited"
    retry = post_in_background(client, image)  # the queued request itself: joined, not refused
    theirs = post_in_background(
        client, body(model_name, image=png(seed=6), timeout_ms=300), api_key=other_key
    )
    assert theirs.result(timeout=10).status_code == 504  # queued (no worker answers), not refused
    assert waiting.result(timeout=10).status_code == retry.result(timeout=10).status_code == 504
    assert r.xlen(Keys(prefix).stream(model_name)) == 2  # the retry added no entry


def test_no_live_worker_is_refused_at_once_with_503(
    redis_url, prefix, runner, open_client, model_name, features, r
) -> None:
    """A model whose workers are all gone (past VQA_NO_WORKER_GRACE_MS) is refused, not queued."""
    queue = RedisWorkerQueue(worker_settings(redis_url, prefix), runner.info.name, "departed")
    queue.ensure_group()
    queue.beat(b"{}", 600, runner.info.to_json(), runner.bundle, runner.info.bundle_sha256)
    queue.leave()  # left just now: within the grace a request still queues
    client = open_client(gateway_settings(redis_url, prefix, no_worker_grace_ms=300, retry_after_s=2))
    waiting = post_in_background(client, body(model_name, features=features, timeout_ms=200))
    assert waiting.result(timeout=10).status_code == 504  # queued (grace), then no answer
    time.sleep(0.4)
    start = time.monotonic()
    refused = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "no_worker" and time.monotonic() - start < 2
    assert r.xlen(Keys(prefix).stream(model_name)) == 1  # only the request made within the grace
    queue.close()


def test_an_unanswered_request_ends_at_its_timeout(
    redis_url, prefix, published, open_client, model_name, features
) -> None:
    # Above VQA_MAX_TIMEOUT_MS a timeout is refused (test_openapi); at it, it is what the client waits.
    client = open_client(gateway_settings(redis_url, prefix, request_timeout_ms=300, max_timeout_ms=400))
    start = time.monotonic()
    reply = client.post(
        "/v1/vqa", content=body(model_name, features=features, timeout_ms=400), headers=HEADERS
    )
    assert reply.status_code == 504 and time.monotonic() - start < 3


def test_a_request_whose_deadline_passes_while_it_is_checked_is_not_queued(
    redis_url, prefix, published, open_client, model_name, r
) -> None:
    """Decoding a cloud-only image takes longer than a 1 ms budget: queueing it would only have a
    worker compute an answer nobody waits for."""
    client = open_client(gateway_settings(redis_url, prefix))
    reply = client.post(
        "/v1/vqa", content=body(model_name, image=png(size=512), timeout_ms=1), headers=HEADERS
    )
    assert reply.status_code == 504 and "it was not queued" in reply.json()["error"]["message"]
    assert not r.exists(Keys(prefix).stream(model_name)) or r.xlen(Keys(prefix).stream(model_name)) == 0


def test_retry_of_finished_request_returns_stored_answer(served, model_name, features, prefix, r) -> None:
    client, worker, settings = served
    content = body(model_name, features=features, request_id="retry-me")
    first = client.post("/v1/vqa", content=content, headers=HEADERS)
    second = client.post("/v1/vqa", content=content, headers=HEADERS)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert worker.worker.stats.answered == 1
    result = Keys(prefix).result(model_name, queue_id(content))
    assert 0 < r.pttl(result) <= settings.result_ttl_s * 1000
    assert r.xinfo_stream(Keys(prefix).stream(model_name))["entries-added"] == 1


def test_retry_of_in_flight_request_waits_for_the_same_answer(
    redis_url, prefix, published, open_client, start_worker, model_name, features, r
) -> None:
    """Two gateways (two reply lists) get the same request id; it is queued once, answered once."""
    keys = Keys(prefix)
    gateways = [open_client(gateway_settings(redis_url, prefix)) for _ in range(2)]
    content = body(model_name, features=features, request_id="in-flight", timeout_ms=20_000)
    replies = [post_in_background(client, content) for client in gateways]
    wait_for(lambda: r.scard(keys.waiters(model_name, queue_id(content))) == 2, what="both gateways waiting")
    assert r.xlen(keys.stream(model_name)) == 1
    worker = start_worker(worker_settings(redis_url, prefix))
    answers = [future.result(timeout=10) for future in replies]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert worker.worker.stats.answered == 1
    assert r.xinfo_stream(keys.stream(model_name))["entries-added"] == 1
    in_flight = queue_id(content)
    assert not r.exists(keys.inflight(model_name, in_flight), keys.waiters(model_name, in_flight))


def test_request_ids_are_scoped_to_the_caller_and_bound_to_the_request(
    redis_url, prefix, served, model_name, features, open_client
) -> None:
    """Two keys, one request id: each gets its own answer; a reused id with a new question is 409."""
    client, worker, _ = served
    other_key = "second-tenant-key-0123456789"
    other = open_client(gateway_settings(redis_url, prefix, api_keys=f"{API_KEY},{other_key}"))
    first = client.post(
        "/v1/vqa", content=body(model_name, features=features, request_id="shared"), headers=HEADERS
    )
    assert first.status_code == 200 and first.json()["request_id"] == "shared"
    question = "how many shapes are there?"
    theirs = other.post(
        "/v1/vqa",
        content=body(model_name, features=features, request_id="shared", question=question),
        headers={**HEADERS, "Authorization": f"Bearer {other_key}"},
    )
    assert theirs.status_code == 200 and theirs.json()["request_id"] == "shared"
    assert worker.worker.stats.answered == 2  # the second tenant's request ran; nothing was shared
    reused = client.post(
        "/v1/vqa",
        content=body(model_name, features=features, request_id="shared", question=question),
        headers=HEADERS,
    )
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "request_id_reused"
    retry = client.post(
        "/v1/vqa",
        content=body(model_name, features=features, request_id="shared", timeout_ms=9000),
        headers=HEADERS,
    )
    assert retry.status_code == 200 and retry.json() == first.json()  # same request, new timeout: idempotent
    assert worker.worker.stats.answered == 2
    with_history = body(model_name, features=features, request_id="shared", history=["what color?", "red"])
    assert client.post("/v1/vqa", content=with_history, headers=HEADERS).status_code == 409  # history counts


def test_an_id_whose_binding_expired_never_returns_an_earlier_answer(
    served, model_name, features, prefix, r
) -> None:
    """The stored answer belongs to the request, not to the id: once the id's binding is gone (its
    lifetime ended while a retry's answer lived on), a new request under it gets its own answer."""
    client, worker, _ = served
    first = client.post(
        "/v1/vqa", content=body(model_name, features=features, request_id="reborn"), headers=HEADERS
    )
    assert first.status_code == 200
    (binding,) = r.keys(Keys(prefix).request(model_name, "*"))
    r.delete(binding)  # as if it had expired
    question = "how many shapes are there?"
    other = body(model_name, features=features, request_id="reborn", question=question)
    second = client.post("/v1/vqa", content=other, headers=HEADERS)
    assert second.status_code == 200 and worker.worker.stats.answered == 2
    assert second.json()["prompt_tokens"] != first.json()["prompt_tokens"]  # its own question's reply


def test_error_replies_are_not_stored(served, model_name, prefix, r) -> None:
    """A retry after an error runs again (only answers are kept for idempotent retries)."""
    client, _, _ = served
    content = body(model_name, features=b"AVQ garbage", request_id="failed-once")
    assert client.post("/v1/vqa", content=content, headers=HEADERS).status_code == 422
    assert not r.exists(Keys(prefix).result(model_name, queue_id(content)))


def test_entry_of_a_dead_worker_is_claimed_and_answered(
    redis_url, prefix, published, open_client, start_worker, model_name, features, r
) -> None:
    settings = worker_settings(redis_url, prefix, claim_idle_ms=300)
    client = open_client(gateway_settings(redis_url, prefix))
    waiting = post_in_background(client, body(model_name, features=features, timeout_ms=20_000))
    dead = RedisWorkerQueue(settings, model_name, "dead-worker")
    wait_for(lambda: dead.read(4, 50), what="the doomed worker to take the entry")
    dead.close()  # ...and never finishes it
    worker = start_worker(settings)
    reply = waiting.result(timeout=15)
    assert reply.status_code == 200, reply.text
    assert worker.worker.stats.answered == 1
    assert r.xpending(Keys(prefix).stream(model_name), GROUP)["pending"] == 0


@pytest.mark.parametrize("payload", ["features", "image"])
def test_dead_letter_after_max_deliveries(
    redis_url, prefix, published, open_client, model_name, features, r, payload
) -> None:
    """A dead letter keeps a feature stream's request whole, and a cloud-only image (up to 16 MB,
    10,000 letters) by size and digest only."""
    keys = Keys(prefix)
    settings = worker_settings(redis_url, prefix, claim_idle_ms=1, max_deliveries=2)
    client = open_client(gateway_settings(redis_url, prefix))
    sent = {"features": features} if payload == "features" else {"image": png(size=256)}
    content = body(model_name, request_id="poison", **sent)
    waiting = post_in_background(client, content)
    queues = [RedisWorkerQueue(settings, model_name, worker_id()) for _ in range(3)]
    try:
        wait_for(lambda: queues[0].read(4, 50), what="first delivery")  # worker 1 dies holding it
        time.sleep(0.01)
        second = queues[1].claim(4)  # delivery 2: worker 2 dies too
        assert [job.deliveries for job in second.jobs] == [2] and not second.dead
        time.sleep(0.01)
        third = queues[2].claim(4)  # delivery 3 > max_deliveries: dead letter
        assert not third.jobs and [job.request_id for job in third.dead] == [queue_id(content)]
    finally:
        for queue in queues:
            queue.close()
    reply = waiting.result(timeout=10)
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "dead_letter"
    assert "VQA_MAX_DELIVERIES=2" in reply.json()["error"]["message"]
    ((entry_id, fields),) = r.xrange(keys.dead(model_name))
    assert fields[b"request_id"] == queue_id(content).encode() and b"died" in fields[b"reason"]
    assert r.xlen(keys.stream(model_name)) == 0
    queued = third.dead[0].body
    if payload == "features":
        assert fields[b"request"] == queued and b"request_bytes" not in fields
    else:
        assert fields[b"request"] == b"" and int(fields[b"request_bytes"]) == len(queued) > 64 * 1024
        assert fields[b"request_sha256"].decode() == hashlib.sha256(queued).hexdigest()


def test_stream_holds_only_unanswered_entries(served, model_name, features, prefix, r) -> None:
    """Answered entries are acknowledged and deleted, never trimmed by length."""
    client, _, _ = served
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(
                lambda i: client.post(
                    "/v1/vqa", content=body(model_name, features=features), headers=HEADERS
                ),
                range(6),
            )
        )
    assert all(reply.status_code == 200 for reply in replies)
    stream = Keys(prefix).stream(model_name)
    assert r.xlen(stream) == 0 and r.xinfo_stream(stream)["entries-added"] == 6
    assert r.xpending(stream, GROUP)["pending"] == 0
    assert max(reply.json()["batch_size"] for reply in replies) >= 1


def test_waiting_requests_hold_no_redis_connection(
    redis_url, prefix, published, open_client, start_worker, model_name, features, r
) -> None:
    """24 requests wait on in-process futures; only the reply reader holds a connection."""
    client = open_client(gateway_settings(redis_url, prefix))
    pool = ThreadPoolExecutor(24)
    replies = [
        pool.submit(client.post, "/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
        for _ in range(24)
    ]
    wait_for(lambda: r.xlen(Keys(prefix).stream(model_name)) == 24, what="24 queued requests")
    connections = client.app.state.queue.client.connection_pool
    # The last ENQUEUE's reply may still be on its way back when XLEN reads 24: wait for it, then
    # hold that state while all 24 keep waiting.
    wait_for(lambda: len(connections._in_use_connections) <= 1, what="enqueue connections released")
    time.sleep(0.2)
    assert len(connections._in_use_connections) <= 1  # the reader's BLMPOP
    start_worker(worker_settings(redis_url, prefix, max_batch=8, max_wait_ms=50))
    assert [future.result(timeout=20).status_code for future in replies] == [200] * 24
    pool.shutdown()


def test_cloud_only_and_features_share_a_batch(
    redis_url, prefix, published, open_client, start_worker, model_name, features, r
) -> None:
    client = open_client(gateway_settings(redis_url, prefix))
    image = png(seed=9)
    contents = [
        body(model_name, features=features) if i % 2 else body(model_name, image=image) for i in range(6)
    ]
    pool = ThreadPoolExecutor(6)
    replies = [pool.submit(client.post, "/v1/vqa", content=c, headers=HEADERS) for c in contents]
    wait_for(lambda: r.xlen(Keys(prefix).stream(model_name)) == 6, what="6 queued requests")
    worker = start_worker(worker_settings(redis_url, prefix, max_batch=6, max_wait_ms=200))
    answers = [future.result(timeout=20) for future in replies]
    pool.shutdown()
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["batch_size"] for a in answers] == [6] * 6
    assert worker.worker.stats.batches == 1


def test_one_finish_call_answers_a_whole_batch(published, model_name, prefix, r) -> None:
    """Every waiter of every entry gets its reply; only answers are stored; nothing is left behind."""
    from gateway.errors import WorkerError
    from gateway.queue import Reply
    from gateway.queue.scripts import ENQUEUE

    keys, enqueue = Keys(prefix), r.register_script(ENQUEUE)
    gateway_a, gateway_b = keys.replies("gateway-a"), keys.replies("gateway-b")

    def submit(request_id: str, reply_to: str) -> bytes:
        tracked = [keys.result(model_name, request_id), keys.inflight(model_name, request_id)]
        tracked += [keys.waiters(model_name, request_id), keys.stream(model_name)]
        tracked += [keys.partial(model_name, request_id), keys.busy("key:0")]
        args = [reply_to, int(time.time() * 1000) + 60_000, 65_000, 100, request_id, 0, b"body", model_name]
        args += ["0", "key:0", 0]  # not streamed; the tenant; no in-flight cap
        return enqueue(keys=tracked, args=args)[0]

    assert [submit(rid, gateway_a) for rid in ("r1", "r2", "r3")] == [b"queued"] * 3
    assert submit("r2", gateway_b) == b"joined"  # a retry that reached another gateway
    jobs = published.read(3, 0)
    replies = [
        Reply(request_id="r1", model=model_name, answer="red", batch_size=3),
        Reply.failure(jobs[1], WorkerError("boom")),
        Reply(request_id="r3", model=model_name, answer="blue", batch_size=3),
    ]
    published.finish(list(zip(jobs, replies, strict=True)))

    assert [Reply.unpack(x) for x in r.lrange(gateway_a, 0, -1)] == replies
    assert [Reply.unpack(x) for x in r.lrange(gateway_b, 0, -1)] == [replies[1]]
    assert [r.exists(keys.result(model_name, rid)) for rid in ("r1", "r2", "r3")] == [1, 0, 1]
    leftovers = [keys.inflight(model_name, rid) for rid in ("r1", "r2", "r3")]
    leftovers += [keys.waiters(model_name, rid) for rid in ("r1", "r2", "r3")]
    assert r.exists(*leftovers) == 0
    assert r.xlen(keys.stream(model_name)) == 0 and r.xpending(keys.stream(model_name), GROUP)["pending"] == 0


def test_reply_unpack_rejects_garbage() -> None:
    from gateway.queue import Reply

    with pytest.raises(ValueError, match="malformed reply"):
        Reply.unpack(msgpack.packb({"nope": 1}))
    reply = Reply(request_id="a", model="m", answer="red", queue_ms=1.5, compute_ms=2.0, batch_size=3)
    assert Reply.unpack(reply.pack()) == reply
