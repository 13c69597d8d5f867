"""The HTTP client of the edge: fetch the edge bundle, encode an image, ask the gateway.

    from edge_client import EdgeClient
    with EdgeClient("http://127.0.0.1:8000", api_key="...") as client:
        print(client.ask("photo.jpg", "what shape is this?").answer)

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
"""

from __future__ import annotations

import os
import time
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
from .errors import BundleError, GatewayError
from .protocol import CONTENT_TYPE, VQAResponse, encode_request, new_request_id, parse_request
from .transport import Flow, RetryPolicy, exchange, run_async, run_sync

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_MODEL", "Answer", "EdgeClient"]

DEFAULT_MODEL = "llava-mini-shapes"
DEFAULT_CACHE_DIR = Path("~/.cache/alignedvq")
CODEBOOK_MISMATCH = "codebook_mismatch"  # gateway error code (409): the bundle is out of date
USER_AGENT = "alignedvq-edge-client/1"
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """One answer and what it cost.

    ``request_bytes`` is the length of the HTTP body sent; ``bits_per_token`` is the payload (the
    feature stream without its fixed header, or the JPEG in cloud-only mode) in bits per vision
    token; ``edge_ms`` is preprocessing plus encoding; ``latency_ms`` runs from the first send of
    the request to its answer (retries included); ``queue_ms``/``compute_ms`` come from the gateway.
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


class EdgeClient:
    """Edge-cloud VQA client for one gateway and one model.

    ``bundle`` is an :class:`EdgeBundle` or the path of a bundle file; without it the bundle is
    downloaded from the gateway on first use and cached under ``cache_dir``. ``model`` defaults to
    the bundle's model, else ``llava-mini-shapes``. ``timeout`` (seconds) bounds each HTTP attempt.
    ``threads`` caps the BLAS threads of each encode (1 keeps it fast on a busy device).
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
        self.api_key = api_key
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
        max_new_tokens: int = 8,
        timeout_ms: int | None = None,
        request_id: str | None = None,
    ) -> Answer:
        """Ask one question about one image (a path, encoded bytes, PIL image or uint8 array)."""
        return self._run(self._ask(image, question, cloud_only, max_new_tokens, timeout_ms, request_id))

    async def aask(
        self,
        image: ImageInput,
        question: str,
        *,
        cloud_only: bool = False,
        max_new_tokens: int = 8,
        timeout_ms: int | None = None,
        request_id: str | None = None,
    ) -> Answer:
        """Async :meth:`ask`. Encoding (milliseconds of numpy) runs on the event loop's thread."""
        flow = self._ask(image, question, cloud_only, max_new_tokens, timeout_ms, request_id)
        return await self._arun(flow)

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

    def _encode(
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
        image: ImageInput,
        question: str,
        cloud_only: bool,
        max_new_tokens: int,
        timeout_ms: int | None,
        request_id: str | None,
    ) -> Flow[Answer]:
        source = read_image(image)  # a missing file fails before any network traffic
        fields: dict[str, Any] = {
            "request_id": request_id or new_request_id(),
            "model": self.model,
            "question": question,
            "max_new_tokens": max_new_tokens,
        }
        if timeout_ms is not None:
            fields["timeout_ms"] = timeout_ms
        for refreshed in (False, True):
            encoder = yield from self._encoder_flow()
            payload, payload_bits, edge_ms = self._encode(source, encoder, cloud_only)
            fields["image" if cloud_only else "features"] = payload
            body = encode_request(parse_request(fields))  # RequestError names a bad field before sending
            request = self._request(
                "POST", "/v1/vqa", body, **{"Content-Type": CONTENT_TYPE, "Accept": "application/json"}
            )
            start = time.perf_counter()
            try:
                response = yield from exchange(request, self.policy)
                break
            except GatewayError as error:
                # The gateway serves a newer codebook than our bundle: fetch it, re-encode, send once
                # more. The refused request never reached the queue, so its id can be reused.
                if error.code != CODEBOOK_MISMATCH or cloud_only or refreshed or not self._downloaded:
                    raise
                self._encoder = None
        latency_ms = (time.perf_counter() - start) * 1e3
        reply = _parse_reply(response)
        if reply.request_id != fields["request_id"]:
            raise GatewayError(
                "bad_response",
                response.status_code,
                f"expected the reply to request {fields['request_id']}, got one for {reply.request_id}",
            )
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
            cloud_only=cloud_only,
        )
