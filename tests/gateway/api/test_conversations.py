"""Conversations through the real app, Redis and a worker thread: features sent once and named by
``image_ref`` (scoped to the key, 410 when gone), streamed answers over Server-Sent Events
(tokens before ``done``, resumed with Last-Event-ID, a finished request replayed, errors as
events), and ``/v1/chat/completions`` in OpenAI's shapes."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import msgpack
import pytest
import redis

from edge_client import chat_part, chat_ref_part
from edge_client.protocol import VQARequest, encode_request, image_ref
from edge_client.sse import EventParser, ServerEvent
from gateway.queue import Keys

from ..conftest import gateway_settings
from ..helpers import API_KEY, AUTH, HEADERS, body, png, queue_id, rid

STREAM = {**HEADERS, "Accept": "text/event-stream"}
OTHER_KEY = "other-key-0123456789abcdef"


def events(text: str) -> list[ServerEvent]:
    parser = EventParser()
    return [e for e in (parser.feed(line) for line in text.split("\n")) if e is not None]


def follow_up(question: str, ref: bytes, **fields) -> bytes:
    return encode_request(VQARequest(request_id=rid(), question=question, image_ref=ref, **fields))


@pytest.fixture
def features(encoder) -> bytes:
    return encoder.encode_image(png(seed=21))


# ---- image_ref --------------------------------------------------------------------------------


def test_a_follow_up_names_the_features_and_carries_history(served, model_name, features) -> None:
    client, worker, _ = served
    first = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    assert first.status_code == 200, first.text
    ref = bytes.fromhex(first.json()["image_ref"])
    assert ref == image_ref(features)
    history = ["what shape is it ?", first.json()["answer"]]
    second = client.post("/v1/vqa", content=follow_up("what color ?", ref, history=history), headers=HEADERS)
    assert second.status_code == 200, second.text
    assert second.json()["model"] == model_name and second.json()["image_ref"] == ref.hex()
    assert worker.worker.stats.answered == 2  # the queue entry carried the whole stream


def test_a_ref_of_another_key_is_refused_like_an_unknown_one(serve, model_name, features) -> None:
    client, _, _ = serve(api_keys=f"{API_KEY},{OTHER_KEY}")
    sent = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    ref = bytes.fromhex(sent.json()["image_ref"])
    other = {**HEADERS, "Authorization": f"Bearer {OTHER_KEY}"}
    stolen = client.post("/v1/vqa", content=follow_up("what color ?", ref), headers=other)
    unknown = client.post("/v1/vqa", content=follow_up("what color ?", bytes(16)), headers=other)
    assert stolen.status_code == unknown.status_code == 410
    assert stolen.json()["error"]["code"] == unknown.json()["error"]["code"] == "image_expired"
    assert stolen.json()["error"]["message"].replace(ref.hex(), "") == unknown.json()["error"][
        "message"
    ].replace(bytes(16).hex(), "")
    mine = client.post("/v1/vqa", content=follow_up("what color ?", ref), headers=HEADERS)
    assert mine.status_code == 200, mine.text


def test_a_ref_expires_after_its_ttl_unless_used(serve, model_name, features) -> None:
    client, _, _ = serve(image_ttl_s=1)
    ref = bytes.fromhex(
        client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS).json()[
            "image_ref"
        ]
    )
    for _ in range(3):  # each use restarts the TTL
        time.sleep(0.6)
        assert client.post("/v1/vqa", content=follow_up("what ?", ref), headers=HEADERS).status_code == 200
    time.sleep(1.2)
    gone = client.post("/v1/vqa", content=follow_up("what ?", ref), headers=HEADERS)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "image_expired"


def test_no_cache_means_no_ref_in_the_reply(serve, model_name, features) -> None:
    client, _, _ = serve(image_cache_bytes=0)
    reply = client.post("/v1/vqa", content=body(model_name, features=features), headers=HEADERS)
    assert reply.status_code == 200 and reply.json()["image_ref"] is None
    refused = client.post("/v1/vqa", content=follow_up("what ?", image_ref(features)), headers=HEADERS)
    assert refused.status_code == 410


def test_max_new_tokens_above_the_model_is_refused_before_the_queue(served, model_name, features) -> None:
    client, worker, _ = served
    reply = client.post(
        "/v1/vqa", content=body(model_name, features=features, max_new_tokens=512), headers=HEADERS
    )
    limit = client.get("/v1/models", headers=AUTH).json()["data"][0]["max_new_tokens"]
    if limit >= 512:
        pytest.skip(f"the tiny model generates up to {limit} tokens")
    assert reply.status_code == 422 and "max_new_tokens" in reply.json()["error"]["message"], reply.text
    assert worker.worker.stats.rejected == 0


# ---- streaming --------------------------------------------------------------------------------


def test_a_streamed_answer_sends_tokens_then_done(served, model_name, features) -> None:
    client, _, _ = served
    content = body(model_name, features=features, max_new_tokens=6)
    reply = client.post("/v1/vqa", content=content, headers=STREAM)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    got = events(reply.text)
    *tokens, done = got
    assert done.event == "done" and [e.event for e in tokens] == ["token"] * len(tokens)
    answer = json.loads(done.data)
    assert "".join(json.loads(e.data)["text"] for e in tokens) == answer["answer"]
    assert tokens and answer["completion_tokens"] >= 1, answer  # at least one token came before done
    ids = [tuple(map(int, e.id.split("-"))) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # A client cut off after the first token resumes after it: the rest, from any replica.
    resumed = events(
        client.post("/v1/vqa", content=content, headers={**STREAM, "Last-Event-ID": tokens[0].id}).text
    )
    assert [e.id for e in resumed] == [e.id for e in got[1:]]
    # An id past the newest entry would wait for an entry that never comes: refused at once.
    ahead = client.post("/v1/vqa", content=content, headers={**STREAM, "Last-Event-ID": "9999999999999-0"})
    assert ahead.status_code == 422 and "names no event of this request" in ahead.json()["error"]["message"]
    # A retry of the finished request replays it; once its partial stream is gone, as one token.
    assert [e.data for e in events(client.post("/v1/vqa", content=content, headers=STREAM).text)] == [
        e.data for e in got
    ]


def test_a_finished_request_replays_from_its_stored_answer(
    served, model_name, features, prefix, redis_url
) -> None:
    client, _, _ = served
    request_id = rid()
    content = body(model_name, features=features, request_id=request_id)
    plain = client.post("/v1/vqa", content=content, headers=HEADERS).json()
    r = redis.Redis.from_url(redis_url)
    assert not r.exists(Keys(prefix).partial(model_name, queue_id(content)))  # not streamed: none
    r.close()
    replay = events(client.post("/v1/vqa", content=content, headers=STREAM).text)
    assert [e.event for e in replay] == ["token", "done"]
    assert json.loads(replay[0].data)["text"] == plain["answer"] == json.loads(replay[1].data)["answer"]
    resumed = events(
        client.post("/v1/vqa", content=content, headers={**STREAM, "Last-Event-ID": replay[0].id}).text
    )
    assert [e.event for e in resumed] == ["done"]


def test_a_stream_that_ends_in_an_error_sends_an_error_event(
    redis_url, prefix, published, open_client, model_name, features
) -> None:
    client = open_client(gateway_settings(redis_url, prefix))
    reply = client.post(
        "/v1/vqa", content=body(model_name, features=features, timeout_ms=300), headers=STREAM
    )
    assert reply.status_code == 200
    (error,) = events(reply.text)
    data = json.loads(error.data)
    assert error.event == "error" and error.id is None
    assert data == {
        "error": {"code": "deadline_exceeded", "message": data["error"]["message"]},
        "status": 504,
    }


def test_refusals_come_before_the_stream_as_statuses(served, model_name) -> None:
    client, _, _ = served
    bad = client.post("/v1/vqa", content=body(model_name, features=b"AVQ\x01"), headers=STREAM)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "truncated_stream"
    content = body(model_name, image=png(seed=3))
    for wrong in ("yesterday", f"{2**64}-0"):  # the second is past Redis's 64-bit parts: not a 503
        bad_id = client.post("/v1/vqa", content=content, headers={**STREAM, "Last-Event-ID": wrong})
        assert bad_id.status_code == 422 and "Last-Event-ID" in bad_id.json()["error"]["message"]


# ---- /v1/chat/completions ---------------------------------------------------------------------


def chat(model: str, *content, stream: bool = False, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": list(content)}],
        "stream": stream,
        **extra,
    }


def test_chat_completion_with_features_then_a_ref(served, model_name, features) -> None:
    client, _, _ = served
    reply = client.post(
        "/v1/chat/completions",
        json=chat(
            model_name, {"type": "text", "text": "what shape is it ?"}, chat_part(features), max_tokens=4
        ),
        headers=AUTH,
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["object"] == "chat.completion" and data["model"] == model_name
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert (
        usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        and usage["prompt_tokens"] > 0
    )
    assert data["alignedvq"]["image_ref"] == hashlib.sha256(features).hexdigest()[:32]
    messages = [
        {"role": "system", "content": "You are terse."},  # accepted, left out
        {
            "role": "user",
            "content": [chat_ref_part(features), {"type": "text", "text": "what shape is it ?"}],
        },
        {"role": "assistant", "content": choice["message"]["content"]},
        {"role": "user", "content": "what color is it ?"},
    ]
    again = client.post(
        "/v1/chat/completions", json={"model": model_name, "messages": messages}, headers=AUTH
    )
    assert again.status_code == 200, again.text


def test_chat_streamed_cloud_only(served, model_name) -> None:
    client, _, _ = served
    url = "data:image/png;base64," + base64.b64encode(png(seed=5)).decode()
    request = chat(
        model_name,
        {"type": "text", "text": "what color ?"},
        {"type": "image_url", "image_url": {"url": url}},
        stream=True,
        stream_options={"include_usage": True},
    )
    reply = client.post("/v1/chat/completions", json=request, headers=AUTH)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    got = events(reply.text)
    assert got[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in got[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("request_", "status", "code", "param"),
    [
        ({"messages": []}, 422, "bad_request", "model"),
        ({"model": "m", "messages": []}, 422, "bad_request", "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "no image"}]},
            422,
            "bad_request",
            "messages",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
            422,
            "bad_request",
            "messages[0].role",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            422,
            "bad_request",
            "messages[0].content[0]",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
            422,
            "bad_request",
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
            },
            422,
            "bad_request",
            "messages[0].role",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "alignedvq", "alignedvq": {"features": 5}}]}
                ],
            },
            422,
            "bad_request",
            "messages[0].content[0].alignedvq.features",  # not alignedvq.alignedvq: the tag is no field
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2}, 422, "bad_request", "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 513},
            422,
            "bad_request",
            "max_tokens",
        ),
    ],
)
def test_chat_errors_are_openai_error_objects(served, request_, status, code, param) -> None:
    client, _, _ = served
    reply = client.post("/v1/chat/completions", json=request_, headers=AUTH)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param), error


def test_chat_auth_media_type_and_ref_errors_keep_their_status(served, model_name) -> None:
    client, _, _ = served
    request = chat(
        model_name,
        {"type": "text", "text": "q"},
        {"type": "alignedvq", "alignedvq": {"image_ref": "00" * 16}},
    )
    missing = client.post("/v1/chat/completions", json=request)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong_type = client.post("/v1/chat/completions", content=msgpack.packb(request), headers=HEADERS)
    assert wrong_type.status_code == 415 and wrong_type.json()["error"]["code"] == "unsupported_media_type"
    gone = client.post("/v1/chat/completions", json=request, headers=AUTH)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "image_expired"
    not_found = client.get("/v1/chat/completions", headers=AUTH)
    assert not_found.status_code == 405 and not_found.json()["error"]["type"] == "invalid_request_error"
