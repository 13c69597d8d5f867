"""EdgeClient against a real local HTTP server (uvicorn in a thread) that mimics the gateway's routes:
single questions, conversations (features once, then image_ref; a 410 re-sends them) and streamed
answers (token events, a cut stream resumed with Last-Event-ID, error events)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge_client.bitstream import decode_stream
from edge_client.bundle import EdgeBundle
from edge_client.client import EdgeClient
from edge_client.encoder import EdgeEncoder
from edge_client.errors import (
    BundleError,
    GatewayError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ImageError,
)
from edge_client.preprocess import load_image
from edge_client.protocol import RequestError, VQARequest, decode_request, image_ref
from edge_client.sse import format_event
from tests.conftest import TINY_QUANTIZER


def export_tiny_bundle(model_dir: Path) -> bytes:
    from models.export import export_edge_bundle
    from models.quantizer import AlignedVQ
    from models.store import load_model

    loaded = load_model(str(model_dir))
    return export_edge_bundle(loaded, AlignedVQ.load(loaded.quantizer_path(TINY_QUANTIZER)))


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class StubGateway:
    """The gateway's two client-facing routes, answering from the decoded request.

    ``script`` holds canned replies (status, JSON body or text, headers) that ``/v1/vqa`` returns,
    one per call, before it starts answering for real; ``delay_s`` stalls every answer. Feature
    streams are kept under their ``image_ref`` in ``refs`` (410 for one it does not hold). A
    streamed answer comes a word per event; ``cut_after`` ends a fresh stream after that many
    words (no ``done``), ``stream_error`` sends that error event instead of ``done``. Replies
    report ``unknown_words``.
    """

    def __init__(self, bundle_bytes: bytes, api_key: str | None = None) -> None:
        self.bundle_bytes = bundle_bytes
        self.bundle = EdgeBundle.from_bytes(bundle_bytes)
        self.api_key = api_key
        self.codebook_hash_header = self.bundle.codebook_hash
        self.script: list[tuple[int, Any, dict[str, str]]] = []
        self.delay_s = 0.0
        self.refs: dict[bytes, bytes] = {}
        self.cut_after: int | None = None
        self.stream_error: dict[str, Any] | None = None
        self.unknown_words: list[str] = []
        self.vqa_calls: list[tuple[dict[str, str], bytes]] = []
        self.bundle_calls: list[dict[str, str]] = []
        self.app = self._build_app()
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", ws="none", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models/{model}/edge-bundle")
        def edge_bundle(model: str, request: Request) -> Response:
            self.bundle_calls.append(dict(request.headers))
            if model != self.bundle.model:
                return _error(404, "unknown_model", f"unknown model {model!r}")
            etag = f'"{hashlib.sha256(self.bundle_bytes).hexdigest()}"'
            headers = {"ETag": etag, "X-Codebook-Hash": self.codebook_hash_header}
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers=headers)
            return Response(self.bundle_bytes, media_type="application/octet-stream", headers=headers)

        @app.post("/v1/vqa")
        async def vqa(request: Request) -> Response:
            body = await request.body()
            self.vqa_calls.append((dict(request.headers), body))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.script:
                status, content, headers = self.script.pop(0)
                if isinstance(content, str):
                    return Response(content, status_code=status, headers=headers, media_type="text/plain")
                return JSONResponse(content, status_code=status, headers=headers)
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "unauthorized", "missing or invalid API key")
            try:
                vqa_request = decode_request(body)
            except RequestError as exc:
                return _error(400, exc.code, exc.message)
            if vqa_request.image_ref is not None:
                if vqa_request.image_ref not in self.refs:
                    return _error(410, "image_expired", "no stream under that image_ref")
                features = self.refs[vqa_request.image_ref]
                vqa_request = vqa_request.model_copy(
                    update={"features": features, "model": self.bundle.model}
                )
            ref = None
            if vqa_request.features is not None:
                ref = image_ref(vqa_request.features)
                self.refs[ref] = vqa_request.features
            reply = {
                "request_id": vqa_request.request_id,
                "model": vqa_request.model,
                "answer": self.answer(vqa_request),
                "queue_ms": 1.5,
                "compute_ms": 2.5,
                "batch_size": 1,
                "image_ref": ref.hex() if ref is not None else None,
                "unknown_words": self.unknown_words,
            }
            if "text/event-stream" in request.headers.get("accept", ""):
                events = self._events(reply, request.headers.get("last-event-id"))
                return StreamingResponse(events, media_type="text/event-stream")
            return JSONResponse(reply)

        return app

    async def _events(self, reply: dict[str, Any], last_event_id: str | None):
        words = re.findall(r"\S+\s*", reply["answer"])
        after = int(last_event_id.split("-")[0]) if last_event_id else -1
        for i, word in enumerate(words):
            if self.cut_after is not None and last_event_id is None and i == self.cut_after:
                return  # the connection ends mid-answer
            if i > after:
                yield format_event(json.dumps({"text": word}), "token", f"{i}-0")
        if self.stream_error is not None:
            yield format_event(json.dumps(self.stream_error), "error")
            return
        yield format_event(json.dumps(reply), "done", f"{len(words)}-0")

    def answer(self, request: VQARequest) -> str:
        """What the fake model says: what arrived, so tests can check it."""
        if request.image is not None:
            image = load_image(request.image)
            return f"image {image.width}x{image.height}"
        stream = decode_stream(request.features, self.bundle.freqs)
        assert stream.header.matches_codebook(self.bundle.codebook_hash)
        return f"features {stream.indices.shape[0]} tokens, first {int(stream.indices[0, 0, 0])}"

    @property
    def request_ids(self) -> list[str]:
        return [decode_request(body).request_id for _, body in self.vqa_calls]

    def __enter__(self) -> StubGateway:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub gateway did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


@pytest.fixture(scope="module")
def bundle_bytes(tiny_model_dir: Path) -> bytes:
    return export_tiny_bundle(tiny_model_dir)


@pytest.fixture
def gateway(bundle_bytes: bytes):
    with StubGateway(bundle_bytes) as stub:
        yield stub


@pytest.fixture
def image() -> bytes:
    rng = np.random.default_rng(0)
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def make_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """EdgeClient factory (tiny model, cache in tmp_path, no backoff, no key from the environment);
    closes every client it made."""
    monkeypatch.delenv("VQA_API_KEY", raising=False)
    clients: list[EdgeClient] = []

    def make(gateway: StubGateway | str, **kwargs: Any) -> EdgeClient:
        kwargs.setdefault("model", "llava-tiny")
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("backoff_s", 0.0)
        client = EdgeClient(gateway if isinstance(gateway, str) else gateway.url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_ask_downloads_the_bundle_and_answers(
    gateway: StubGateway, make_client: Any, tmp_path: Path, image: bytes
) -> None:
    with make_client(gateway) as client:
        answer = client.ask(image, "what shape?", max_new_tokens=3, request_id="req-1")
    expected_first = gateway.answer(decode_request(gateway.vqa_calls[0][1]))
    assert answer.answer == expected_first and answer.answer.startswith("features 17 tokens")
    assert (answer.request_id, answer.model, answer.cloud_only) == ("req-1", "llava-tiny", False)
    headers, body = gateway.vqa_calls[0]
    assert answer.request_bytes == len(body)
    assert headers["content-type"] == "application/msgpack" and headers["accept"] == "application/json"
    assert "authorization" not in headers
    sent = decode_request(body)
    assert sent.question == "what shape?" and sent.max_new_tokens == 3 and sent.image is None
    header_bytes = 3 + 1 + 1 + len("llava-tiny") + 26
    assert answer.bits_per_token == (len(sent.features) - header_bytes) * 8 / 17
    assert (
        answer.queue_ms == 1.5 and answer.compute_ms == 2.5 and answer.edge_ms > 0 and answer.latency_ms > 0
    )
    digest = hashlib.sha256(gateway.bundle_bytes).hexdigest()
    assert (tmp_path / "cache" / "bundles" / f"{digest}.bundle").read_bytes() == gateway.bundle_bytes
    assert len(gateway.bundle_calls) == 1 and "if-none-match" not in gateway.bundle_calls[0]


def test_cached_bundle_is_revalidated_not_downloaded(
    gateway: StubGateway, make_client: Any, tmp_path: Path, image: bytes
) -> None:
    with make_client(gateway) as client:
        first = client.ask(image, "what color?")
        client.ask(image, "what color?")  # the bundle is fetched once per client
    assert len(gateway.bundle_calls) == 1
    with make_client(gateway) as client:
        second = client.ask(image, "what color?")
    assert len(gateway.bundle_calls) == 2
    digest = hashlib.sha256(gateway.bundle_bytes).hexdigest()
    assert gateway.bundle_calls[1]["if-none-match"] == f'"{digest}"'
    assert second.answer == first.answer and first.request_id != second.request_id

    # A damaged cache entry fails verification and is replaced by a fresh download.
    cached = tmp_path / "cache" / "bundles" / f"{digest}.bundle"
    cached.write_bytes(gateway.bundle_bytes[:-3] + b"xyz")
    with make_client(gateway) as client:
        assert client.load_bundle().sha256 == digest
    assert "if-none-match" not in gateway.bundle_calls[2]
    assert cached.read_bytes() == gateway.bundle_bytes


def test_downloaded_bundle_is_verified(gateway: StubGateway, make_client: Any, tmp_path: Path) -> None:
    gateway.codebook_hash_header = "0" * 64
    with pytest.raises(BundleError, match="codebook hash 0{64} \\(X-Codebook-Hash\\), got [0-9a-f]{64}"):
        make_client(gateway).load_bundle()
    gateway.codebook_hash_header = gateway.bundle.codebook_hash
    gateway.bundle_bytes = gateway.bundle_bytes[:-4] + b"\x00\x01\x02\x03"
    with pytest.raises(BundleError, match="bundle downloaded from .*edge-bundle is invalid: "):
        make_client(gateway).load_bundle()
    assert not (tmp_path / "cache" / "bundles").exists()
    with pytest.raises(GatewayError, match="unknown model 'other'") as info:
        make_client(gateway, model="other").load_bundle()
    assert (info.value.code, info.value.status) == ("unknown_model", 404)


def test_bundle_from_a_path_needs_no_download(
    gateway: StubGateway, make_client: Any, tmp_path: Path, image: bytes
) -> None:
    path = tmp_path / "edge.bundle"
    path.write_bytes(gateway.bundle_bytes)
    client = make_client(gateway, model=None, bundle=path)
    assert client.model == "llava-tiny" and client.bundle is not None
    assert client.ask(image, "what shape?").answer.startswith("features 17 tokens")
    assert gateway.bundle_calls == []
    with pytest.raises(
        BundleError, match="expected an edge bundle for model 'llava-mini-shapes', got one for"
    ):
        make_client(gateway, model="llava-mini-shapes", bundle=path)


def test_retries_reuse_the_request_id(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    busy = {"error": {"code": "overloaded", "message": "queue is full"}}
    gateway.script = [
        (503, busy, {"Retry-After": "0"}),
        (429, busy, {"Retry-After": "0"}),
        (502, "bad gw", {}),
    ]
    answer = make_client(gateway).ask(image, "what shape?")
    assert len(gateway.vqa_calls) == 4
    assert set(gateway.request_ids) == {answer.request_id} and len(answer.request_id) == 22
    assert len({body for _, body in gateway.vqa_calls}) == 1  # the very same bytes each time


def test_retries_give_up_with_the_gateway_error(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    busy = {"error": {"code": "overloaded", "message": "queue is full"}}
    gateway.script = [(503, busy, {"Retry-After": "0"})] * 3
    with pytest.raises(GatewayError, match="queue is full") as info:
        make_client(gateway, retries=2).ask(image, "what shape?")
    assert (info.value.code, info.value.status) == ("overloaded", 503)
    assert len(gateway.vqa_calls) == 3


def test_client_errors_are_not_retried(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    gateway.script = [(400, {"error": {"code": "bad_request", "message": "field 'question': too long"}}, {})]
    with pytest.raises(GatewayError) as info:
        make_client(gateway).ask(image, "what shape?")
    assert (info.value.code, info.value.status, info.value.message) == (
        "bad_request",
        400,
        "field 'question': too long",
    )
    assert "HTTP 400, bad_request" in str(info.value)
    assert len(gateway.vqa_calls) == 1


def test_error_bodies_without_json_are_mapped_by_status(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    gateway.script = [(500, "worker exploded", {})]
    with pytest.raises(
        GatewayError, match="gateway answered 500 Internal Server Error: worker exploded"
    ) as info:
        make_client(gateway).ask(image, "what shape?")
    assert (info.value.code, info.value.status) == ("http_500", 500)
    gateway.script = [(200, {"request_id": "someone-else", "model": "llava-tiny", "answer": "x"}, {})]
    with pytest.raises(GatewayError, match="expected the reply to request r1, got one for someone-else"):
        make_client(gateway).ask(image, "what shape?", request_id="r1")
    gateway.script = [(200, {"unexpected": True}, {})]
    with pytest.raises(GatewayError, match="expected a VQA response") as info:
        make_client(gateway).ask(image, "what shape?")
    assert info.value.code == "bad_response"


def test_api_key_is_sent_as_bearer_token(bundle_bytes: bytes, make_client: Any, image: bytes) -> None:
    with StubGateway(bundle_bytes, api_key="s3cret") as gateway:
        with pytest.raises(GatewayError, match="missing or invalid API key") as info:
            make_client(gateway).ask(image, "what shape?")
        assert (info.value.code, info.value.status) == ("unauthorized", 401)
        answer = make_client(gateway, api_key="s3cret").ask(image, "what shape?")
        assert answer.answer.startswith("features")
        assert gateway.vqa_calls[-1][0]["authorization"] == "Bearer s3cret"
        assert gateway.bundle_calls[-1]["authorization"] == "Bearer s3cret"


def test_api_key_defaults_to_the_environment(
    bundle_bytes: bytes, make_client: Any, image: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQA_API_KEY", "s3cret")
    with StubGateway(bundle_bytes, api_key="s3cret") as gateway:
        assert make_client(gateway).ask(image, "what shape?").answer.startswith("features")
        assert gateway.vqa_calls[-1][0]["authorization"] == "Bearer s3cret"
        with pytest.raises(GatewayError, match="missing or invalid API key"):
            make_client(gateway, api_key="other-key").ask(image, "what shape?")  # an explicit key wins


def test_cloud_only_sends_a_jpeg_at_the_model_size(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    answer = make_client(gateway).ask(image, "what shape?", cloud_only=True, timeout_ms=5000)
    assert answer.answer == "image 32x32" and answer.cloud_only
    sent = decode_request(gateway.vqa_calls[0][1])
    assert sent.features is None and sent.image[:2] == b"\xff\xd8" and sent.timeout_ms == 5000
    assert answer.bits_per_token == len(sent.image) * 8 / 17


def test_local_problems_raise_before_sending(
    gateway: StubGateway, make_client: Any, tmp_path: Path, image: bytes
) -> None:
    client = make_client(gateway)
    with pytest.raises(ImageError, match="cannot read image .*missing.jpg"):
        client.ask(tmp_path / "missing.jpg", "what shape?")
    assert gateway.bundle_calls == []
    with pytest.raises(ImageError, match="could not be decoded"):
        client.ask(b"not an image", "what shape?")
    with pytest.raises(RequestError, match="field 'question'"):
        client.ask(image, "")
    assert gateway.vqa_calls == []
    with pytest.raises(ValueError, match="expected an http\\(s\\) gateway URL, got 'ftp://x'"):
        EdgeClient("ftp://x")


def test_unreachable_gateway(make_client: Any, image: bytes) -> None:
    closed = socket.socket()  # bound but not listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    try:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        client = make_client(url, retries=1)
        with pytest.raises(
            GatewayUnreachableError, match=f"cannot reach the gateway at {url}.*2 attempt"
        ) as info:
            client.ask(image, "what shape?")
        assert info.value.status is None and info.value.code == "gateway_unreachable"
    finally:
        closed.close()


def test_timeout_is_retried_then_reported(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    client = make_client(gateway, timeout=0.3, retries=1)
    client.load_bundle()
    gateway.delay_s = 1.0
    with pytest.raises(GatewayTimeoutError, match="no reply to POST .*/v1/vqa within 0.3 s") as info:
        client.ask(image, "what shape?")
    assert info.value.code == "gateway_timeout"
    assert len(gateway.vqa_calls) == 2 and len(set(gateway.request_ids)) == 1


def test_async_path(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    busy = {"error": {"code": "overloaded", "message": "queue is full"}}
    gateway.script = [(503, busy, {"Retry-After": "0"})]

    async def run() -> list:
        async with make_client(gateway) as client:
            answers = await asyncio.gather(
                client.aask(image, "what shape?", request_id="a1"),
                client.aask(image, "what color?", cloud_only=True, request_id="a2"),
            )
            with pytest.raises(GatewayError, match="field 'question'") as info:
                gateway.script = [
                    (400, {"error": {"code": "bad_request", "message": "field 'question'"}}, {})
                ]
                await client.aask(image, "x")
            assert info.value.status == 400
            return answers

    first, second = asyncio.run(run())
    assert first.answer.startswith("features 17 tokens") and first.request_id == "a1"
    assert second.answer == "image 32x32" and second.cloud_only
    # One of the two concurrent requests met the 503 and was retried under its own id.
    assert len(gateway.vqa_calls) == 4 and set(gateway.request_ids[:3]) == {"a1", "a2"}


def test_retry_after_dates_are_honoured_and_capped(gateway: StubGateway, make_client: Any) -> None:
    client = make_client(gateway, max_backoff_s=2.0)
    future = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert client.policy.backoff(0, future) == 2.0
    assert client.policy.backoff(0, httpx.Response(503, headers={"Retry-After": "0.5"})) == 0.5
    soon = httpx.Response(503, headers={"Retry-After": "soon"})
    assert client.policy.backoff(0, soon) == 0.0  # backoff_s = 0


def test_codebook_mismatch_refreshes_a_downloaded_bundle_once(
    gateway: StubGateway, make_client: Any, tmp_path: Path, image: bytes
) -> None:
    stale = (409, {"error": {"code": "codebook_mismatch", "message": "codebook changed"}}, {})
    gateway.script = [stale]
    answer = make_client(gateway).ask(image, "what shape?")
    assert answer.answer.startswith("features 17 tokens")
    assert len(gateway.bundle_calls) == 2 and "if-none-match" in gateway.bundle_calls[1]
    assert len(gateway.vqa_calls) == 2 and set(gateway.request_ids) == {answer.request_id}

    gateway.script = [stale, stale]
    with pytest.raises(GatewayError, match="codebook changed") as info:
        make_client(gateway).ask(image, "what shape?")
    assert (info.value.code, info.value.status) == ("codebook_mismatch", 409)
    assert len(gateway.vqa_calls) == 4

    path = tmp_path / "edge.bundle"
    path.write_bytes(gateway.bundle_bytes)
    gateway.script = [stale]
    with pytest.raises(GatewayError, match="codebook changed"):
        make_client(gateway, bundle=path).ask(image, "what shape?")
    assert len(gateway.vqa_calls) == 5


def test_encode_runs_with_blas_capped_to_the_threads_asked(
    gateway: StubGateway, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from threadpoolctl import threadpool_info

    seen: list[set[int]] = []
    encode = EdgeEncoder.encode_image

    def recording(self: EdgeEncoder, image: Any) -> bytes:
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return encode(self, image)

    monkeypatch.setattr(EdgeEncoder, "encode_image", recording)
    make_client(gateway, threads=1).ask(np.zeros((32, 32, 3), np.uint8), "what shape is it?")
    assert seen == [{1}]
    with pytest.raises(ValueError, match="threads >= 1"):
        make_client(gateway, threads=0)


def test_a_conversation_sends_the_features_once_then_names_them(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    with make_client(gateway) as client:
        chat = client.conversation(image)
        first = chat.ask("what shape?")
        second = chat.ask("and its color?")
    sent = [decode_request(body) for _, body in gateway.vqa_calls]
    assert sent[0].features is not None and first.image_ref == image_ref(sent[0].features).hex()
    assert (sent[1].features, sent[1].model, sent[1].image_ref) == (None, "", image_ref(sent[0].features))
    assert sent[1].history == ["what shape?", first.answer]
    assert second.answer == first.answer  # the same features, resolved by the gateway
    # 90 B for the follow-up itself (test_protocol pins it), 11 B of history keys and tags, its text.
    assert second.request_bytes == len(gateway.vqa_calls[1][1]) == 90 + 11 + len("what shape?" + first.answer)
    assert (second.bits_per_token, second.edge_ms) == (0.0, 0.0)
    assert chat.history == ["what shape?", first.answer, "and its color?", second.answer]


def test_an_expired_ref_is_answered_by_sending_the_features_again_once(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    with make_client(gateway) as client:
        chat = client.conversation(image)
        first = chat.ask("what shape?")
        gateway.refs.clear()  # the gateway's TTL ran out
        second = chat.ask("and its color?", request_id="follow-up")
    sent = [decode_request(body) for _, body in gateway.vqa_calls]
    assert [r.image_ref is not None for r in sent] == [False, True, False]
    assert sent[2].features == sent[0].features and sent[2].request_id == "follow-up"
    assert second.answer == first.answer and second.image_ref == first.image_ref


def test_a_streamed_answer_comes_as_it_is_generated(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    tokens: list[str] = []
    with make_client(gateway) as client:
        answer = client.ask(image, "what shape?", on_token=tokens.append)
    assert len(tokens) > 2 and "".join(tokens) == answer.answer
    assert answer.first_token_ms is not None and 0 < answer.first_token_ms <= answer.latency_ms
    assert gateway.vqa_calls[0][0]["accept"] == "text/event-stream"


def test_a_cut_stream_resumes_after_the_last_event(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    gateway.cut_after = 2
    tokens: list[str] = []
    with make_client(gateway) as client:
        answer = client.ask(image, "what shape?", on_token=tokens.append)
    assert "".join(tokens) == answer.answer  # every word once, none repeated
    (first, _), (second, body) = gateway.vqa_calls
    assert "last-event-id" not in first and second["last-event-id"] == "1-0"
    assert body == gateway.vqa_calls[0][1]  # the same request, so the gateway joins it


def test_an_error_event_is_raised_with_its_status(
    gateway: StubGateway, make_client: Any, image: bytes
) -> None:
    gateway.stream_error = {"error": {"code": "deadline_exceeded", "message": "too slow"}, "status": 504}
    with pytest.raises(GatewayError, match="too slow") as info:
        make_client(gateway).ask(image, "what shape?", on_token=lambda _: None)
    assert (info.value.code, info.value.status) == ("deadline_exceeded", 504)


def test_async_conversation_streams_too(gateway: StubGateway, make_client: Any, image: bytes) -> None:
    async def run() -> tuple[list[str], Any, Any]:
        tokens: list[str] = []
        async with make_client(gateway) as client:
            chat = client.conversation(image)
            first = await chat.aask("what shape?", on_token=tokens.append)
            second = await chat.aask("and its color?", on_token=tokens.append)
        return tokens, first, second

    tokens, first, second = asyncio.run(run())
    assert "".join(tokens) == first.answer + second.answer and second.bits_per_token == 0.0
