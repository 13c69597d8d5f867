"""Settings of the two deployables, read from ``VQA_*`` environment variables and ``.env``.

One class per process: :class:`GatewaySettings` for ``vqa-gateway`` (the HTTP API) and
:class:`WorkerSettings` for ``vqa-worker``. Both share the queue settings (:class:`QueueSettings`)
and the serving settings (:class:`ServingSettings`), joined in :class:`WorkerLoopSettings`: the
gateway reads the serving ones only with ``VQA_QUEUE=memory``, where it runs the worker loop
in-process. Everything is validated when the
object is built, i.e. at start-up: impossible combinations and placeholder secrets are refused
there, never discovered on the first request. ``.env.example`` documents every variable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from edge_client.preprocess import MAX_IMAGE_PIXELS
from edge_client.protocol import MAX_BODY_BYTES, MAX_QUESTION_CHARS

__all__ = [
    "GatewaySettings",
    "QueueSettings",
    "ServingSettings",
    "WorkerLoopSettings",
    "WorkerSettings",
    "key_digest",
]

_SHA256_ENTRY = re.compile(r"sha256:([0-9a-fA-F]{64})")
_PLACEHOLDERS = {"changeme", "change-me", "secret", "password", "your-api-key", "api-key", "example", "xxx"}
MIN_KEY_CHARS = 16
_REDIS_URL = re.compile(r"(redis|rediss|unix)://.+")
_ORIGIN = re.compile(r"\*|https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def key_digest(entry: str) -> str:
    """One ``VQA_API_KEYS`` entry -> ``sha256:<hex>`` (the form kept in memory and compared)."""
    entry = entry.strip()
    match = _SHA256_ENTRY.fullmatch(entry)
    if match:
        return f"sha256:{match.group(1).lower()}"
    if entry.startswith("sha256:"):
        raise ValueError(f"API key entry 'sha256:...' needs 64 hex digits, got {len(entry) - 7} chars")
    if entry.lower() in _PLACEHOLDERS or len(entry) < MIN_KEY_CHARS:
        raise ValueError(
            f"API key {entry[:4]}... looks like a placeholder: expected a random key of at least "
            f"{MIN_KEY_CHARS} chars, got {len(entry)} chars"
        )
    return "sha256:" + hashlib.sha256(entry.encode()).hexdigest()


class QueueSettings(BaseSettings):
    """How requests travel from the gateway to the workers; shared by both processes."""

    model_config = SettingsConfigDict(env_prefix="VQA_", env_file=".env", extra="ignore", frozen=True)

    queue: Literal["redis", "memory"] = "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")] = "vqa"
    redis_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    request_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 30_000
    max_timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 120_000
    result_ttl_s: Annotated[int, Field(ge=1)] = 600
    heartbeat_ttl_s: Annotated[float, Field(ge=0.3, le=3600)] = 10.0
    claim_idle_ms: Annotated[int, Field(ge=1)] = 10_000
    max_deliveries: Annotated[int, Field(ge=1, le=100)] = 3

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not _REDIS_URL.fullmatch(value):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> QueueSettings:
        if self.request_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"VQA_REQUEST_TIMEOUT_MS ({self.request_timeout_ms}) exceeds VQA_MAX_TIMEOUT_MS "
                f"({self.max_timeout_ms})"
            )
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        """Three beats per TTL: one lost write does not make a worker look dead."""
        return self.heartbeat_ttl_s / 3


class ServingSettings(BaseSettings):
    """What a worker loads and how it batches (the gateway reads these only with VQA_QUEUE=memory)."""

    model_config = SettingsConfigDict(env_prefix="VQA_", env_file=".env", extra="ignore", frozen=True)

    model: Annotated[str, Field(min_length=1)] = "llava-mini-shapes"
    quantizer: str = ""  # empty: the model's own default (its alignedvq.json), see .env.example
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 16
    max_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 10
    poll_ms: Annotated[int, Field(ge=1, le=10_000)] = 500
    torch_threads: Annotated[int, Field(ge=0, le=1024)] = 0
    fused: Literal["auto", "on", "off"] = "auto"  # models.fused decoding; auto = on for CUDA devices
    # Device memory for prompt prefixes of recent images (gateway.worker.prefix_cache); 0 = off.
    prefix_cache_mb: Annotated[int, Field(ge=0, le=1_048_576)] = 512

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class WorkerLoopSettings(QueueSettings, ServingSettings):
    """What the worker loop reads; both processes that may run it (worker, memory-mode gateway) are these."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"  # both processes


class GatewaySettings(WorkerLoopSettings):
    """``vqa-gateway``: the HTTP API."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    api_keys: Annotated[list[str], NoDecode] = []
    allow_anonymous: bool = False
    max_backlog: Annotated[int, Field(ge=1)] = 1000
    no_worker_grace_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 15_000
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_BODY_BYTES)] = MAX_BODY_BYTES
    max_question_chars: Annotated[int, Field(ge=1, le=MAX_QUESTION_CHARS)] = MAX_QUESTION_CHARS
    max_image_pixels: Annotated[int, Field(ge=1, le=MAX_IMAGE_PIXELS)] = MAX_IMAGE_PIXELS
    # Cloud-only images decoded at once per gateway process: each may hold up to 4 bytes a pixel
    # (160 MB at 40 MP), and a small PNG can declare that many; the rest wait their turn.
    image_decodes: Annotated[int, Field(ge=1, le=256)] = 2
    # Requests one API key may have queued or running, its images waiting for a decode included (0:
    # no cap), so that one key cannot take the whole VQA_MAX_BACKLOG, or hold a Redis connection per
    # waiting stream without end.
    max_in_flight_per_key: Annotated[int, Field(ge=0, le=1_000_000)] = 256
    registry_ttl_ms: Annotated[int, Field(ge=0, le=600_000)] = 2_000
    rate_limit_per_s: Annotated[float, Field(ge=0, le=1_000_000)] = 0.0
    rate_limit_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    auth_failures_per_minute: Annotated[float, Field(ge=0, le=1_000_000)] = 10.0
    auth_failure_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    cors_origins: Annotated[list[str], NoDecode] = []
    # Proxies whose X-Forwarded-For names the client (addresses or CIDRs); none by default, so no
    # peer, not even a local one, can choose the address that rate limits count against.
    forwarded_allow_ips: Annotated[list[str], NoDecode] = []
    # Feature streams kept per API key, so follow-ups name them by image_ref (docs/conversations.md):
    # how long one lives unused, and how many bytes one key may hold (0: nothing is kept).
    image_ttl_s: Annotated[int, Field(ge=1, le=7 * 86_400)] = 900
    image_cache_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = 16 * 1024 * 1024

    @field_validator("api_keys", "cors_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"expected '*' or origins like https://app.example.com[:port], got {origin!r}"
                )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        # uvicorn would quietly keep a typo as a literal host name that never matches: refuse it.
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"expected IP addresses or CIDR networks like 10.0.0.0/8, got {entry!r}"
                ) from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _hash_keys(cls, value: list[str]) -> list[str]:
        # Only digests are kept, so the raw keys never sit in the settings object or its repr.
        return [key_digest(entry) for entry in value]

    @model_validator(mode="after")
    def _need_keys(self) -> GatewaySettings:
        if not self.api_keys and not self.allow_anonymous:
            raise ValueError(
                "VQA_API_KEYS is empty: set comma-separated keys (or sha256:<hex> digests), or "
                "VQA_ALLOW_ANONYMOUS=true for a local demo"
            )
        return self


class WorkerSettings(WorkerLoopSettings):
    """``vqa-worker``: one model, one GPU (or CPU); command-line flags override these."""

    @model_validator(mode="after")
    def _redis_only(self) -> WorkerSettings:
        if self.queue != "redis":
            raise ValueError(
                "vqa-worker consumes the Redis queue; with VQA_QUEUE=memory the gateway runs the model itself"
            )
        return self
