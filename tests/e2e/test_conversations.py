"""Conversations over the network: the official ``openai`` package and the edge client against a
uvicorn gateway and a ``vqa-worker`` process on the tiny model (CPU), over the real Redis.

Covers: chat completions plain and streamed, cloud-only (a ``data:`` URL) and with AlignedVQ
features, a follow-up by ``image_ref`` with history, errors as OpenAI errors, a ref of another key
refused like an unknown one; Server-Sent Events of ``POST /v1/vqa`` arriving token by token before
``done``; a follow-up body of at most 100 bytes; ``edge-client chat``; and a ref expired on a
gateway with a one-second TTL, re-sent by the Python client by itself.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from edge_client import EdgeClient, chat_part, chat_ref_part
from edge_client.sse import EventParser
from tests.gateway.helpers import API_KEY, body, png, wait_for

from .conftest import OTHER_API_KEY, REPO

QUESTION = "what shape is it ?"


def ready(stack) -> None:
    stack.worker()
    stack.wait_live(1)
    wait_for(lambda: httpx.get(f"{stack.url}/readyz").status_code == 200, what="readiness")


def ask(
    client: openai.OpenAI, model: str, *content: dict, stream: bool = False, **extra
) -> tuple[str, object]:
    """(answer text, usage) of one chat completion, plain or streamed."""
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *content]}]
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, **extra)
        return reply.choices[0].message.content or "", reply.usage
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage


def test_the_openai_package_plain_and_streamed(stack, encoder) -> None:
    ready(stack)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=API_KEY, max_retries=0)
    image = png(seed=71)
    features = encoder.encode_image(image)
    data_url = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
    }

    for part in (data_url, chat_part(features)):  # cloud-only, then AlignedVQ features
        plain, usage = ask(client, stack.model, part)
        streamed, streamed_usage = ask(client, stack.model, part, stream=True)
        assert streamed == plain  # greedy decoding: the same answer either way
        assert usage == streamed_usage and usage.completion_tokens >= 1 and usage.prompt_tokens > 0

    follow_up = client.chat.completions.create(
        model=stack.model,
        messages=[
            {"role": "user", "content": [chat_ref_part(features), {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": plain},
            {"role": "user", "content": "what color is it ?"},
        ],
        max_tokens=4,
    )
    assert follow_up.choices[0].message.role == "assistant"

    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "no image"}])
    assert bad.value.code == "bad_request" and bad.value.param == "messages"
    other = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=OTHER_API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        ask(other, stack.model, chat_ref_part(features))  # sent by API_KEY, not by this key
    assert refused.value.status_code == 410 and refused.value.code == "image_expired"
    (listed,) = client.models.list().data  # what OpenAI-compatible tools call first
    assert listed.id == stack.model and client.models.retrieve(stack.model).id == stack.model
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()


def test_streamed_answers_and_follow_ups_over_the_network(stack, encoder, tmp_path) -> None:
    ready(stack)
    features = encoder.encode_image(png(seed=72))
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/msgpack"}
    arrivals = []
    parser = EventParser()
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/vqa",
        content=body(stack.model, features=features, max_new_tokens=12),
        headers={**headers, "Accept": "text/event-stream"},
        timeout=60,
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            event = parser.feed(line)
            if event is not None:
                arrivals.append((time.perf_counter(), event))
    kinds = [event.event for _, event in arrivals]
    assert kinds[-1] == "done" and kinds[0] == "token" and set(kinds[:-1]) == {"token"}, kinds
    assert arrivals[0][0] <= arrivals[-1][0]  # the first token came before the answer was done
    done = json.loads(arrivals[-1][1].data)
    assert "".join(json.loads(event.data)["text"] for _, event in arrivals[:-1]) == done["answer"]

    cache = str(tmp_path / "cache")
    with EdgeClient(stack.url, api_key=API_KEY, model=stack.model, cache_dir=cache) as client:
        chat = client.conversation(png(seed=73))
        tokens: list[str] = []
        first = chat.ask(QUESTION, on_token=tokens.append)
        assert "".join(tokens) == first.answer and first.first_token_ms is not None
        chat.history = []  # the shortest follow-up: no earlier turns
        second = chat.ask("what color is it ?")
    assert first.request_bytes > 100 and second.request_bytes <= 100, (first, second)
    assert second.bits_per_token == 0 and second.image_ref == first.image_ref

    cli = subprocess.run(
        [sys.executable, "-m", "edge_client.cli", "chat", str(_photo(tmp_path)), "--gateway", stack.url,
         "--model", stack.model, "--cache-dir", cache],
        input=f"{QUESTION}\nwhat color is it ?\n", cwd=REPO, env={**stack.env, "VQA_API_KEY": API_KEY},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr + stack.log_text()
    assert len(cli.stdout.splitlines()) == 2 and "(features)" in cli.stderr and "(image_ref)" in cli.stderr


def test_an_expired_ref_is_resent_by_the_client_itself(stack, tmp_path) -> None:
    ready(stack)
    short = stack.gateway(VQA_IMAGE_TTL_S="1")  # a second replica, same queue, a one-second cache
    with EdgeClient(short, api_key=API_KEY, model=stack.model, cache_dir=str(tmp_path / "cache")) as client:
        chat = client.conversation(png(seed=74))
        first = chat.ask(QUESTION)
        time.sleep(1.5)
        second = chat.ask("what color is it ?")
    assert second.image_ref == first.image_ref and second.bits_per_token > 0  # the features went again
    metrics = httpx.get(f"{short}/metrics").text
    assert 'vqa_requests_total{code="image_expired",route="/v1/vqa",status="410"} 1.0' in metrics
    assert 'vqa_requests_total{code="ok",route="/v1/vqa",status="200"} 2.0' in metrics


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png(seed=75))
    return path
