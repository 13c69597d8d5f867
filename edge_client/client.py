"""The HTTP client of the edge: fetch the edge bundle, encode an image, ask the gateway.

    from edge_client import EdgeClient
    with EdgeClient("http://127.0.0.1:8000", api_key="...") as client:
        print(client.ask("photo.jpg", "what shape is this?").answer)
        chat = client.conversation("photo.jpg")
        chat.ask("what shape is this?", on_token=print)   # streamed: text as it is generated
        chat.ask("and its color?")                        # ~90 bytes: image_ref, no features

Routes (see ``gateway``): ``GET /v1/models/{model}/edge-bundle`` returns the bundle bytes with
``ETag: "<sha256>"`` and ``X-Codebook-Hash``; ``POST /v1/vqa`` takes a msgpack
:class:`~edge_client.protocol.VQARequest` and answers JSON (a :class:`VQAResponse`), or
``{"error": {"code", "message"}}`` with a 4xx/5xx status.

HTTP runs through :mod:`edge_client.transport` (retries, sync and async drivers); bundles are
cached by :class:`~edge_client.bundle_cache.BundleCache`; the cloud-only payload comes from
:mod:`edge_client.cloud_only`.

A cached bundle is revalidated once per client with ``If-None-Match`` (a 304 costs no download).
When the gateway refuses a stream with ``codebook_mismatch`` (a worker published a new codebook),
a downloaded bundle is fetched again and the image re-encoded and sent once more; a bundle the
caller passed in is never swapped.

A :class:`Conversation` sends an image's features once; later questions name them by
``image_ref`` (docs/conversations.md) and carry the earlier turns as ``history``. When the gateway
no longer holds them (410 ``image_expired``) the features are sent again, once, by themselves.
With ``on_token`` the answer is streamed (``Accept: text/event-stream``): each piece of text is
passed to it as it is generated, and a dropped connection resumes from the last event received.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgpack
import numpy as np
from PIL import Image
from pydantic import ValidationError

from .bitstream import read_header
from .blas import limit_blas
from .bundle import MAX_BUNDLE_BYTES, EdgeBundle
from .bundle_cache import BundleCache
from .cloud_only import ImageInput, jpeg_payload, read_image
from .encoder import EdgeEncoder
from .errors import BundleError, GatewayError, GatewayTimeoutError, GatewayUnreachableError
from .protocol import (
    CONTENT_TYPE,
    DEFAULT_MAX_NEW_TOKENS,
    MAX_HISTORY_TURNS,
    VQAResponse,
    encode_request,
    new_request_id,
    parse_request,
)
from .sse import MEDIA_TYPE as EVENT_STREAM
from .sse import EventParser, ServerEvent
from .transport import Flow, ReadLine, RetryPolicy, Sleep, exchange, run_async, run_sync

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_MODEL", "Answer", "Conversation", "EdgeClient"]

DEFAULT_MODEL = "llava-mini-shapes"
DEFAULT_CACHE_DIR = Path("~/.cache/alignedvq")
CODEBOOK_MISMATCH = "codebook_mismatch"  # gateway error code (409): the bundle is out of date
IMAGE_EXPIRED = "image_expired"  # gateway error code (410): the image_ref names nothing it holds
USER_AGENT = "alignedvq-edge-client/1"
T = TypeVar("T")
OnToken = Callable[[str], object]


@dataclass(frozen=True)
class Answer:
    """One answer and what it cost.

    ``request_bytes`` is the length of the HTTP body sent; ``bits_per_token`` is the payload (the
    feature stream without its fixed header, or the JPEG in cloud-only mode; 0 for a follow-up
    that named its features by ``image_ref``) in bits per vision token; ``edge_ms`` is the
    preprocessing and encoding this call did; ``latency_ms`` runs from the first send of the request
    to its answer (retries included), ``first_token_ms`` to its first streamed text (None unless
    streamed); ``queue_ms``/``compute_ms`` come from the gateway. ``image_ref`` (hex) names the
    features the gateway now holds for a follow-up (None: it keeps none); ``unknown_words`` are
    question words the model's vocabulary cannot spell: it answered without them, so the answer
    may not be about what was asked.
    """

    answer: str
    request_id: str
    model: str
    request_bytes: int
    bits_per_token: float
    edge_ms: float
    latency_ms: float
    queue_ms: float
    compute_ms: float
    cloud_only: bool
    image_ref: str | None = None
    unknown_words: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: float | None = None


def _parse_reply(response: httpx.Response) -> VQAResponse:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        data = msgpack.unpackb(response.content, raw=False) if kind == CONTENT_TYPE else response.json()
        return VQAResponse.model_validate(data)
    except (ValueError, ValidationError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise GatewayError(
            "bad_response",
            response.status_code,
            f"expected a VQA response from the gateway, got {kind or 'no content type'}: "
            f"{type(exc).__name__}",
        ) from None


def _event_data(event: ServerEvent) -> dict[str, Any]:
    try:
        data = json.loads(event.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise GatewayError("bad_response", 200, f"expected a JSON object in the {event.event!r} event")
    return data


def _event_error(data: dict[str, Any]) -> GatewayError:
    """The error an ``error`` event reports, with the HTTP status it has on a plain request."""
    error, status = data.get("error"), data.get("status")
    if not isinstance(error, dict) or not isinstance(status, int):
        return GatewayError("bad_response", 200, f"expected an error event, got {str(data)[:200]}")
    return GatewayError(str(error.get("code")), status, str(error.get("message")))


class Conversation:
    """Questions about one picture (:meth:`EdgeClient.conversation`).

    The first question sends the features (or, ``cloud_only``, the JPEG); later ones name them by
    ``image_ref`` and carry the earlier turns in ``history`` (the last 16 turns: the protocol's
    limit). A follow-up is ~90 bytes plus its history's text.
    """

    def __init__(self, client: EdgeClient, image: ImageInput, cloud_only: bool = False) -> None:
        self.client = client
        self.cloud_only = cloud_only
        self.source = read_image(image)  # a missing file fails before any network traffic
        self.history: list[str] = []
        self.image_ref: bytes | None = None  # the features the gateway holds, once it said so
        self._encoded: tuple[EdgeEncoder, bytes, int] | None = None  # encoder, payload, payload bits

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        on_token: OnToken | None = None,
    ) -> Answer:
        """The answer to ``question``; ``on_token`` streams it (each new piece of text, as it comes)."""
        flow = self.client._ask(self, question, max_new_tokens, timeout_ms, request_id, on_token)
        return self._remember(question, self.client._run(flow))

    async def aask(
        self,
        question: str,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        on_token: OnToken | None = None,
    ) -> Answer:
        flow = self.client._ask(self, question, max_new_tokens, timeout_ms, request_id, on_token)
        return self._remember(question, await self.client._arun(flow))

    def _remember(self, question: str, answer: Answer) -> Answer:
        self.history = [*self.history, question, answer.answer][-2 * MAX_HISTORY_TURNS :]
        return answer

    def payload(self, encoder: EdgeEncoder) -> tuple[bytes, int, float]:
        """(payload, payload bits, edge ms): encoded once per bundle, then 0 ms."""
        if self._encoded is not None and self._encoded[0] is encoder:
            return self._encoded[1], self._encoded[2], 0.0
        payload, bits, edge_ms = self.client.encode(self.source, encoder, self.cloud_only)
        self._encoded = (encoder, payload, bits)
        return payload, bits, edge_ms


class EdgeClient:
    """Edge-cloud VQA client for one gateway and one model.

    ``bundle`` is an :class:`EdgeBundle` or the path of a bundle file; without it the bundle is
    downloaded from the gateway on first use and cached under ``cache_dir``. ``model`` defaults to
    the bundle's model, else ``llava-mini-shapes``. ``timeout`` (seconds) bounds each HTTP attempt.
    ``threads`` caps the BLAS threads of each encode (1 keeps it fast on a busy device).
    ``api_key`` defaults to ``$VQA_API_KEY``, as the CLI's does (and the ``openai`` package's to
    ``$OPENAI_API_KEY``): the key stays out of code.
    """

    def __init__(
        self,
        gateway_url: str,
        api_key: str | None = None,
        model: str | None = None,
        bundle: EdgeBundle | str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
        timeout: float = 30.0,
        retries: int = 3,
        *,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        threads: int = 1,
    ) -> None:
        if "://" not in gateway_url:
            raise ValueError(
                f"gateway URL {gateway_url!r} has no scheme; did you mean 'http://{gateway_url}'?"
            )
        if gateway_url.rstrip("/").endswith("/v1"):
            raise ValueError(
                f"gateway URL {gateway_url!r} ends in /v1; give the base URL "
                f"({gateway_url.rstrip('/').removesuffix('/v1')!r}), the client adds /v1/... itself"
            )
        try:
            url = httpx.URL(gateway_url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"expected an http(s) gateway URL, got {gateway_url!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"expected an http(s) gateway URL, got {gateway_url!r}")
        if retries < 0 or timeout <= 0 or backoff_s < 0 or max_backoff_s < 0 or threads < 1:
            raise ValueError(
                f"expected retries >= 0, timeout > 0, backoffs >= 0 and threads >= 1, "
                f"got {retries}, {timeout}, {backoff_s}, {max_backoff_s}, {threads}"
            )
        self.gateway_url = gateway_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("VQA_API_KEY") or None
        self.timeout = httpx.Timeout(timeout)
        self.policy = RetryPolicy(self.gateway_url, retries, backoff_s, max_backoff_s, timeout)
        self.cache = BundleCache(cache_dir)
        self.threads = threads
        if bundle is not None and not isinstance(bundle, EdgeBundle):
            bundle = EdgeBundle.load(bundle)
        self.model = model or (bundle.model if bundle is not None else DEFAULT_MODEL)
        self._downloaded = bundle is None  # a bundle the caller chose is never replaced
        self._encoder: EdgeEncoder | None = None
        if bundle is not None:
            self._use(bundle)
        self._http: httpx.Client | None = None
        self._ahttp: httpx.AsyncClient | None = None

    @property
    def bundle(self) -> EdgeBundle | None:
        """The bundle in use, once loaded."""
        return self._encoder.bundle if self._encoder is not None else None

    # ---- public API -----------------------------------------------------------------------------

    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        cloud_only: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        history: Sequence[str] = (),
        on_token: OnToken | None = None,
    ) -> Answer:
        """Ask one question about one image (a path, encoded bytes, PIL image or uint8 array).

        ``history``: earlier questions and answers, alternating, oldest first; ``on_token``
        streams the answer (called with each new piece of text as it is generated).
        """
        conversation = self.conversation(image, cloud_only=cloud_only)
        conversation.history = list(history)
        flow = self._ask(conversation, question, max_new_tokens, timeout_ms, request_id, on_token)
        return self._run(flow)

    async def aask(
        self,
        image: ImageInput,
        question: str,
        *,
        cloud_only: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        timeout_ms: int | None = None,
        request_id: str | None = None,
        history: Sequence[str] = (),
        on_token: OnToken | None = None,
    ) -> Answer:
        """Async :meth:`ask`. Encoding (milliseconds of numpy) runs on the event loop's thread."""
        conversation = self.conversation(image, cloud_only=cloud_only)
        conversation.history = list(history)
        flow = self._ask(conversation, question, max_new_tokens, timeout_ms, request_id, on_token)
        return await self._arun(flow)

    def conversation(self, image: ImageInput, *, cloud_only: bool = False) -> Conversation:
        """Several questions about ``image``, its features sent once (see :class:`Conversation`)."""
        return Conversation(self, image, cloud_only)

    def load_bundle(self) -> EdgeBundle:
        """The bundle, fetched (or revalidated from the cache) if not loaded yet."""
        return self._run(self._bundle_flow())

    async def aload_bundle(self) -> EdgeBundle:
        return await self._arun(self._bundle_flow())

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def aclose(self) -> None:
        if self._ahttp is not None:
            await self._ahttp.aclose()
            self._ahttp = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _run(self, flow: Flow[T]) -> T:
        if self._http is None:
            self._http = httpx.Client(follow_redirects=False)
        return run_sync(self._http, flow)

    async def _arun(self, flow: Flow[T]) -> T:
        if self._ahttp is None:
            self._ahttp = httpx.AsyncClient(follow_redirects=False)
        return await run_async(self._ahttp, flow)

    # ---- flows (shared) -------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> httpx.Request:
        headers = {"User-Agent": USER_AGENT, **headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return httpx.Request(
            method,
            self.gateway_url + path,
            content=body,
            headers=headers,
            extensions={"timeout": self.timeout.as_dict()},
        )

    def _use(self, bundle: EdgeBundle) -> EdgeEncoder:
        if bundle.model != self.model:
            raise BundleError(
                f"expected an edge bundle for model {self.model!r}, got one for {bundle.model!r}"
            )
        self._encoder = EdgeEncoder(bundle)
        return self._encoder

    def _bundle_flow(self) -> Flow[EdgeBundle]:
        encoder = yield from self._encoder_flow()
        return encoder.bundle

    def _encoder_flow(self) -> Flow[EdgeEncoder]:
        """The encoder of the bundle in use; fetches (or revalidates the cached) bundle if none."""
        if self._encoder is not None:
            return self._encoder
        cached = self.cache.lookup(self.gateway_url, self.model)
        headers = {"Accept": "application/octet-stream"}
        if cached is not None:
            headers["If-None-Match"] = f'"{cached.sha256}"'
        request = self._request(
            "GET", f"/v1/models/{quote(self.model, safe='')}/edge-bundle", None, **headers
        )
        response = yield from exchange(request, self.policy, accept=frozenset({304}))
        if response.status_code == 304 and cached is not None:
            return self._use(cached)
        data = response.content
        if len(data) > MAX_BUNDLE_BYTES:
            raise BundleError(f"expected a bundle of at most {MAX_BUNDLE_BYTES} bytes, got {len(data)}")
        try:
            bundle = EdgeBundle.from_bytes(data)
        except BundleError as exc:
            raise BundleError(f"bundle downloaded from {request.url} is invalid: {exc.message}") from None
        announced = response.headers.get("X-Codebook-Hash")
        if announced is not None and announced.lower() != bundle.codebook_hash:
            raise BundleError(
                f"expected the downloaded bundle to have codebook hash {announced} (X-Codebook-Hash), "
                f"got {bundle.codebook_hash}"
            )
        encoder = self._use(bundle)
        self.cache.store(self.gateway_url, self.model, data, bundle.sha256)
        return encoder

    def encode(
        self, source: bytes | Image.Image | np.ndarray, encoder: EdgeEncoder, cloud_only: bool
    ) -> tuple[bytes, int, float]:
        """(payload, payload bits, edge ms): the feature stream, or the JPEG in cloud-only mode."""
        start = time.perf_counter()
        if cloud_only:
            payload = jpeg_payload(source, encoder.bundle.image_spec.size)
            bits = 8 * len(payload)
        else:
            with limit_blas(self.threads):  # see edge_client.blas for why one thread
                payload = encoder.encode_image(source)
            bits = 8 * (len(payload) - read_header(payload).nbytes)
        return payload, bits, (time.perf_counter() - start) * 1e3

    def _ask(
        self,
        conversation: Conversation,
        question: str,
        max_new_tokens: int,
        timeout_ms: int | None,
        request_id: str | None,
        on_token: OnToken | None,
    ) -> Flow[Answer]:
        fields: dict[str, Any] = {
            "request_id": request_id or new_request_id(),
            "question": question,
            "max_new_tokens": max_new_tokens,
            "history": conversation.history,
        }
        if timeout_ms is not None:
            fields["timeout_ms"] = timeout_ms
        refreshed = False
        while True:
            encoder = yield from self._encoder_flow()
            for name in ("model", "features", "image", "image_ref"):
                fields.pop(name, None)
            by_ref = conversation.image_ref is not None
            if by_ref:  # the gateway holds the features: name them (their header names the model)
                fields["image_ref"] = conversation.image_ref
                payload_bits, edge_ms = 0, 0.0
            else:
                payload, payload_bits, edge_ms = conversation.payload(encoder)
                fields["model"] = self.model
                fields["image" if conversation.cloud_only else "features"] = payload
            body = encode_request(parse_request(fields))  # RequestError names a bad field before sending
            start = time.perf_counter()
            try:
                reply, first_token_ms = yield from self._post(body, fields["request_id"], on_token, start)
                break
            except GatewayError as error:
                # Refused requests never reached the queue, so their id can be reused.
                if error.code == IMAGE_EXPIRED and by_ref:  # send the features instead, once
                    conversation.image_ref = None
                    continue
                # The gateway serves a newer codebook than our bundle: fetch it, re-encode, send once
                # more (features it held were encoded with the old one).
                if (
                    error.code != CODEBOOK_MISMATCH
                    or conversation.cloud_only
                    or refreshed
                    or not self._downloaded
                ):
                    raise
                refreshed, self._encoder, conversation.image_ref = True, None, None
        latency_ms = (time.perf_counter() - start) * 1e3
        conversation.image_ref = reply.image_ref
        return Answer(
            answer=reply.answer,
            request_id=reply.request_id,
            model=reply.model,
            request_bytes=len(body),
            bits_per_token=payload_bits / encoder.bundle.tokens,
            edge_ms=edge_ms,
            latency_ms=latency_ms,
            queue_ms=reply.queue_ms,
            compute_ms=reply.compute_ms,
            cloud_only=conversation.cloud_only,
            image_ref=reply.image_ref.hex() if reply.image_ref is not None else None,
            unknown_words=tuple(reply.unknown_words),
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            first_token_ms=first_token_ms,
        )

    def _post(
        self, body: bytes, request_id: str, on_token: OnToken | None, start: float
    ) -> Flow[tuple[VQAResponse, float | None]]:
        """POST /v1/vqa: the reply, and the ms from ``start`` to its first streamed text."""

        def request(accept: str, last_event_id: str | None = None) -> httpx.Request:
            headers = {"Content-Type": CONTENT_TYPE, "Accept": accept}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            return self._request("POST", "/v1/vqa", body, **headers)

        first_token_ms = None
        if on_token is None:
            response = yield from exchange(request("application/json"), self.policy)
            reply = _parse_reply(response)
        else:
            reply, first_token_ms = yield from self._stream(request, on_token, start)
        if reply.request_id != request_id:
            raise GatewayError(
                "bad_response",
                200,
                f"expected the reply to request {request_id}, got one for {reply.request_id}",
            )
        return reply, first_token_ms

    def _stream(
        self, request: Callable[[str, str | None], httpx.Request], on_token: OnToken, start: float
    ) -> Flow[tuple[VQAResponse, float | None]]:
        """Read the answer's events; a connection lost mid-answer resumes after the last event
        received (``Last-Event-ID``: the gateway replays from its partial stream)."""
        last_id, first_token_ms = None, None
        for attempt in range(self.policy.retries + 1):
            response = yield from exchange(request(EVENT_STREAM, last_id), self.policy, stream=True)
            parser = EventParser()
            try:
                while True:
                    line = yield ReadLine(response)
                    if line is None:
                        break
                    assert isinstance(line, str)  # a driver answers ReadLine with a line or None
                    event = parser.feed(line)
                    if event is None:
                        continue
                    last_id = event.id
                    data = _event_data(event)
                    if event.event == "token":
                        if first_token_ms is None:
                            first_token_ms = (time.perf_counter() - start) * 1e3
                        on_token(str(data.get("text", "")))
                    elif event.event == "done":
                        try:
                            return VQAResponse.model_validate(data), first_token_ms
                        except ValidationError:
                            raise GatewayError(
                                "bad_response", 200, "expected a VQA reply in 'done'"
                            ) from None
                    elif event.event == "error":
                        raise _event_error(data)
            except httpx.TransportError as exc:
                if attempt == self.policy.retries:
                    kind = (
                        GatewayTimeoutError
                        if isinstance(exc, httpx.TimeoutException)
                        else GatewayUnreachableError
                    )
                    raise kind(
                        f"the answer's event stream from {self.policy.gateway_url} broke off "
                        f"({type(exc).__name__}) after {attempt + 1} attempt(s)"
                    ) from exc
            if attempt < self.policy.retries:
                yield Sleep(self.policy.backoff(attempt, None))
        raise GatewayUnreachableError(
            f"the answer's event stream from {self.policy.gateway_url} ended without an answer "
            f"after {self.policy.retries + 1} attempt(s)"
        )
