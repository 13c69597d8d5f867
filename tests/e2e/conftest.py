"""Full-stack fixtures: a real uvicorn gateway subprocess and real ``vqa-worker`` subprocesses on
the tiny model, over the real Redis, each test under its own key prefix. Two API keys are
configured (``API_KEY`` and ``OTHER_API_KEY``: tenants that must not see each other's data); a test
may start more gateways on the same prefix (:meth:`Stack.gateway`), with settings of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import TINY_QUANTIZER
from tests.gateway.helpers import API_KEY, delete_prefix, free_port, wait_for

REDIS_URL = os.environ.get("VQA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPO = Path(__file__).parents[2]
OTHER_API_KEY = "other-test-key-0123456789"


@dataclass
class Stack:
    prefix: str
    url: str  # gateway base URL
    env: dict[str, str]
    logs: Path
    redis: redis.Redis
    model_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.model_dir.name

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        with (self.logs / f"{name}-{len(self.processes)}.log").open("wb") as log:  # the child keeps its copy
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def worker(self, *args: str, model: str | None = None, quantizer: str = TINY_QUANTIZER, **env: str):
        """A ``vqa-worker`` subprocess (``python -m gateway.worker``), by default on the tiny model."""
        base = ["-m", "gateway.worker", "--redis-url", REDIS_URL, "--model", model or str(self.model_dir)]
        base += ["--quantizer", quantizer, "--device", "cpu"]
        return self.spawn("worker", *base, *args, **env)

    def gateway(self, **env: str) -> str:
        """A ``vqa-gateway`` subprocess on a free port, healthy; its base URL. ``env`` adds settings."""
        port = free_port()
        process = self.spawn(
            "gateway",
            "-c",
            "from gateway.api.main import run; run()",  # what the vqa-gateway entry point runs
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            REDIS_URL,
            **env,
        )
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert process.poll() is None, self.log_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=30, interval=0.1, what="gateway /healthz")
        return url

    def live_workers(self, model: str | None = None) -> int:
        key = f"{self.prefix}:workers:{model or self.model}"
        return self.redis.zcount(key, int(time.time() * 1000), "+inf")

    def wait_live(self, count: int, timeout: float = 60, model: str | None = None) -> None:
        def live() -> bool:
            exited = [p.args for p in self.processes if p.poll() not in (None, 0, -signal.SIGKILL)]
            assert not exited, f"{exited} exited\n{self.log_text()}"
            return self.live_workers(model) == count

        try:
            wait_for(live, timeout=timeout, what=f"{count} live workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_text()}") from None

    def stream(self) -> str:
        return f"{self.prefix}:stream:{self.model}"

    def pending_by_consumer(self) -> dict[str, int]:
        info = self.redis.xpending(self.stream(), "workers")
        return {c["name"].decode(): int(c["pending"]) for c in info.get("consumers", [])}

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.glob("*.log")
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def stack(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """Gateway subprocess up and healthy (no worker yet: tests start their own)."""
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VQA_KEY_PREFIX": prefix,
        "VQA_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
        "VQA_REDIS_TIMEOUT_S": "1",
        "VQA_REGISTRY_TTL_MS": "200",
        "VQA_HEARTBEAT_TTL_S": "1.5",
        "VQA_POLL_MS": "100",
        "VQA_TORCH_THREADS": "1",
        "VQA_LOG_LEVEL": "warning",
    }
    client = redis.Redis.from_url(REDIS_URL)
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(prefix, "", env, logs, client, tiny_model_dir)
    try:
        stack.url = stack.gateway()
        yield stack
    finally:
        for process in reversed(stack.processes):
            _stop(process)
        delete_prefix(REDIS_URL, prefix)
        client.close()


@pytest.fixture(scope="session")
def encoder(tiny_model_dir: Path):
    """The edge encoder of the tiny model (numpy), from the bundle its workers publish."""
    from edge_client.bundle import EdgeBundle
    from edge_client.encoder import EdgeEncoder
    from models.export import export_edge_bundle
    from models.quantizer import AlignedVQ
    from models.store import load_model

    loaded = load_model(str(tiny_model_dir))
    quantizer = AlignedVQ.load(loaded.quantizer_path(TINY_QUANTIZER))
    return EdgeEncoder(EdgeBundle.from_bytes(export_edge_bundle(loaded, quantizer)))


@pytest.fixture
def post(stack: Stack) -> Callable[..., httpx.Response]:
    def post_(content: bytes, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/msgpack"}
        return httpx.post(f"{stack.url}/v1/vqa", content=content, headers=headers, timeout=timeout)

    return post_
