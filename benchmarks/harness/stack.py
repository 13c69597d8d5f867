"""The serving stack as subprocesses: ``redis-server``, ``vqa-gateway`` and ``vqa-worker --device cpu``.

Shared by the benchmarks that load a real stack (``serving_load``, ``fault_injection``, ``soak``,
``e2e_network``). Every child gets an empty working directory (no stray ``.env`` is read), its own
log file there, and no ``VQA_*`` variable from this environment except those set here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from gateway.queue.keys import Keys

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def entry_point(name: str) -> str:
    """The console script ``name`` of this virtual environment, else the one on PATH."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"cannot find the {name} entry point next to {sys.executable} or on PATH")
    return found


def reap(process: subprocess.Popen) -> None:
    """Wait for a signalled child; kill it if it has not exited after 20 s."""
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def redis_version(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return client.info("server").get("redis_version")
    except redis.RedisError:
        return None
    finally:
        client.close()


class RedisServer:
    """A ``redis-server`` on 127.0.0.1, a free port, data in ``directory``; restartable on that port.

    ``aof``: append-only file with ``appendfsync always`` (what a restart must recover from);
    without it, no persistence at all.
    """

    def __init__(self, directory: Path, log_dir: Path, aof: bool = True) -> None:
        self.directory, self.log_dir, self.aof = directory, log_dir, aof
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.starts += 1
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        )
        argv = [
            entry_point("redis-server"), "--bind", HOST, "--port", str(self.port), "--protected-mode", "yes",
            *persistence, "--dir", str(self.directory), "--save", "", "--daemonize", "no",
        ]  # fmt: skip
        with (self.log_dir / f"redis-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(argv, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            client = redis.Redis.from_url(self.url, socket_timeout=1)
            try:
                if client.ping() and client.info("persistence").get("loading", 0) == 0:
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.1)
        raise RuntimeError(f"redis-server not ready after {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # SIGTERM: Redis fsyncs the AOF and exits
        if self.process is not None:
            reap(self.process)


@dataclass
class Stack:
    """One gateway and the current set of workers, all subprocesses; :meth:`stop` ends them all.

    The gateway is anonymous (no API keys, no rate limit) and listens on ``bind``; health checks
    always go to 127.0.0.1 (``e2e_network`` binds 0.0.0.0 inside a network namespace).
    """

    redis_url: str
    model: str
    workdir: Path
    prefix: str = field(default_factory=lambda: f"bench-load-{uuid.uuid4().hex[:10]}")
    port: int = field(default_factory=free_port)
    bind: str = HOST
    extra_env: dict[str, str] = field(default_factory=dict)  # VQA_* settings for every child
    model_dir: Path | None = None  # serve this directory (named ``model``) instead of a registry name
    quantizer: str | None = None  # the worker's --quantizer (default: the worker's own default)
    gateway: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    spawned: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VQA_")}
        env.update(
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            VQA_QUEUE="redis",
            VQA_REDIS_URL=self.redis_url,
            VQA_KEY_PREFIX=self.prefix,
            VQA_LOG_LEVEL="warning",
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.spawned += 1
        with (self.workdir / f"{self.spawned:02d}-{name}.log").open("wb") as log:
            # cwd: an empty directory, so no stray .env is read; the child keeps its own log handle.
            return subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_gateway(self, timeout: float) -> None:
        env = self.env(
            VQA_ALLOW_ANONYMOUS="true", VQA_API_KEYS="", VQA_HOST=self.bind, VQA_PORT=str(self.port)
        )
        argv = [entry_point("vqa-gateway"), "--host", self.bind, "--port", str(self.port)]
        self.gateway = self.spawn("gateway", argv, env)
        self.wait(lambda: self.status("/healthz") == 200, timeout, "gateway /healthz")

    def spawn_worker(self, max_batch: int, max_wait_ms: int, threads: int) -> subprocess.Popen:
        """One more worker (added to :attr:`workers`); returns without waiting for it."""
        env = self.env(
            VQA_MAX_BATCH=str(max_batch), VQA_MAX_WAIT_MS=str(max_wait_ms), VQA_TORCH_THREADS=str(threads)
        )
        argv = [entry_point("vqa-worker"), "--model", str(self.model_dir or self.model), "--device", "cpu"]
        argv += ["--log-level", "WARNING", *(["--quantizer", self.quantizer] if self.quantizer else [])]
        worker = self.spawn("worker", argv, env)
        self.workers.append(worker)
        return worker

    def start_workers(
        self, count: int, max_batch: int, max_wait_ms: int, threads: int, timeout: float
    ) -> None:
        """``count`` workers; returns once they are live and the gateway is ready."""
        for _ in range(count):
            self.spawn_worker(max_batch, max_wait_ms, threads)
        self.wait(lambda: self.live_workers() == count, timeout, f"{count} live workers")
        self.wait(lambda: self.status("/readyz") == 200, timeout, "gateway /readyz")

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            reap(process)
        self.workers = []

    def stop(self) -> None:
        """Every child, then the run's keys (a shared Redis keeps nothing of the run)."""
        for process in self.workers:  # a worker left stopped (SIGSTOP) would ignore SIGTERM
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        self.stop_workers()
        if self.gateway is not None:
            if self.gateway.poll() is None:
                self.gateway.send_signal(signal.SIGTERM)
            reap(self.gateway)
            self.gateway = None
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.RedisError as exc:
            print(f"warning: could not delete the {self.prefix}:* keys: {exc}", file=sys.stderr)
        finally:
            client.close()

    def exit_codes(self) -> dict[str, int | None | list[int | None]]:
        """Each child's exit status (None: still running), for a run's record."""
        return {
            "gateway": self.gateway.poll() if self.gateway else None,
            "workers": [w.poll() for w in self.workers],
        }

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role (gateway, worker, redis)."""
        pids = {"gateway": [self.gateway.pid] if self.gateway else []}
        pids["worker"] = [w.pid for w in self.workers]
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            pids["redis"] = [int(client.info("server")["process_id"])]
        except (redis.RedisError, KeyError, ValueError):
            pids["redis"] = []  # a remote or restricted Redis: its share is simply not reported
        finally:
            client.close()
        return pids

    def backlog(self) -> int:
        """Entries in the model's stream (queued + in progress); finished ones are deleted."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            return int(client.xlen(Keys(self.prefix).stream(self.model)))
        finally:
            client.close()

    def live_workers(self) -> int:
        try:
            response = httpx.get(f"{self.url}/v1/models", timeout=2)
        except httpx.TransportError:
            return -1
        if response.status_code != 200:
            return -1
        models = {m["name"]: m for m in response.json().get("data", [])}
        return int(models.get(self.model, {}).get("live_workers", 0))

    def status(self, path: str) -> int:
        """HTTP status of ``GET path`` on the gateway; 0 when it does not answer."""
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code
        except httpx.TransportError:
            return 0

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; a child exiting meanwhile, or ``timeout``, raises with the logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [
                p.args[0] for p in [self.gateway, *self.workers] if p is not None and p.poll() is not None
            ]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"no {what} after {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )


@contextlib.contextmanager
def own_stack(
    settings: dict, workdir: Path, name: str, extra_env: dict[str, str]
) -> Iterator[tuple[RedisServer, Stack]]:
    """A ``redis-server`` with AOF in ``workdir``, a gateway and ``settings["workers"]`` workers,
    started and ready, keys under ``bench-{name}-<random>``; on exit every process is stopped, and
    on an error their logs are printed. Every child gets ``extra_env`` and, as its request timeout,
    ``settings["request_timeout_ms"]`` (the timeout :func:`~benchmarks.harness.payloads.build_items`
    puts in each request)."""
    (workdir / "aof").mkdir()
    redis_server = RedisServer(workdir / "aof", workdir)
    stack: Stack | None = None
    try:
        redis_server.start()
        prefix = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        env = {"VQA_REQUEST_TIMEOUT_MS": str(settings["request_timeout_ms"]), **extra_env}
        stack = Stack(redis_server.url, settings["model"], workdir, prefix=prefix, extra_env=env)
        stack.start_gateway(settings["startup_timeout_s"])
        stack.start_workers(
            settings["workers"],
            settings["max_batch"],
            settings["max_wait_ms"],
            settings["torch_threads"],
            settings["startup_timeout_s"],
        )
        yield redis_server, stack
    except BaseException:
        if stack is not None:
            print(stack.log_tail(), file=sys.stderr)
        raise
    finally:
        if stack is not None:
            stack.stop()
        redis_server.stop()
