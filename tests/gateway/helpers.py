"""Request builders and small servers shared by the gateway and e2e tests."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from edge_client.protocol import VQARequest, decode_request, encode_request

API_KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSGPACK = {"Content-Type": "application/msgpack"}
HEADERS = {**AUTH, **MSGPACK}


def queue_id(content: bytes, api_key: str = API_KEY) -> str:
    """The id the queue keys the msgpack request ``content`` by: scoped to the caller's key and to
    what it asks (gateway.api.idempotency)."""
    from gateway.api.idempotency import request_digest, scoped_request

    request = decode_request(content)
    client_id = f"key:{hashlib.sha256(api_key.encode()).hexdigest()[:16]}"
    return scoped_request(request, client_id, request_digest(request))[0].request_id


def png(size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def rid() -> str:
    return uuid.uuid4().hex


def body(model: str, *, features: bytes | None = None, image: bytes | None = None, **fields) -> bytes:
    """A msgpack request; ``fields`` override question, request_id, max_new_tokens, timeout_ms."""
    args = {"request_id": rid(), "model": model, "question": "what shape is it ?", **fields}
    return encode_request(VQARequest(features=features, image=image, **args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) that tests may kill and restart on one port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
