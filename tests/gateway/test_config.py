"""Settings are validated at start-up: impossible combinations and placeholder secrets are refused."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from gateway.config import GatewaySettings, WorkerSettings

KEY = "k3y-0123456789abcdef"


def gateway(**fields) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **fields)


def test_empty_key_list_is_refused_unless_anonymous_is_explicit() -> None:
    with pytest.raises(ValidationError, match="VQA_API_KEYS is empty"):
        gateway()
    assert gateway(allow_anonymous=True).api_keys == []


@pytest.mark.parametrize("key", ["changeme", "secret", "short-key", "sha256:abc"])
def test_placeholder_and_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        gateway(api_keys=key)


def test_keys_are_kept_only_as_sha256_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hashlib.sha256(b"another-key-0123456789").hexdigest()
    monkeypatch.setenv("VQA_API_KEYS", f"{KEY}, sha256:{digest.upper()}")
    settings = GatewaySettings(_env_file=None)
    assert settings.api_keys == [f"sha256:{hashlib.sha256(KEY.encode()).hexdigest()}", f"sha256:{digest}"]
    assert KEY not in repr(settings)


def test_env_file_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text(f"VQA_API_KEYS={KEY}\nVQA_MAX_BACKLOG=7\nVQA_KEY_PREFIX=demo\n")
    settings = GatewaySettings(_env_file=env)
    assert settings.max_backlog == 7 and settings.key_prefix == "demo"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_timeout_ms": 5000, "max_timeout_ms": 1000}, "exceeds VQA_MAX_TIMEOUT_MS"),
        ({"redis_url": "http://localhost:6379"}, "redis://"),
        ({"key_prefix": "has space"}, "key_prefix"),
        ({"max_body_bytes": 10**9}, "max_body_bytes"),
        ({"device": "tpu"}, "cuda"),
        ({"queue": "kafka"}, "queue"),
    ],
)
def test_impossible_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        gateway(api_keys=KEY, **fields)


def test_worker_settings_refuse_the_memory_queue() -> None:
    with pytest.raises(ValidationError, match="memory"):
        WorkerSettings(_env_file=None, queue="memory")
    settings = WorkerSettings(_env_file=None, heartbeat_ttl_s=9)
    assert settings.heartbeat_interval_s == 3


def test_env_example_documents_every_setting() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".env.example").read_text()
    for name in set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields):
        assert f"VQA_{name.upper()}=" in text, f"VQA_{name.upper()} is not documented in .env.example"
