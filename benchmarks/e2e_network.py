"""End to end over emulated networks: edge-cloud (AlignedVQ) vs cloud-only (JPEG-90) latency.

    .venv/bin/python -m benchmarks.e2e_network          # as root, from the repository root; ~4 min
    .venv/bin/python -m benchmarks.e2e_network --quick  # 0.1 and 100 Mbit/s, fewer repetitions
    .venv/bin/python -m benchmarks.e2e_network --gpu-results /path/to/gpu_worker.json

The network: two network namespaces (client, server), each with a TUN device (10.77.0.1 and
10.77.0.2, point to point), and between them a delay line, a process of this script that carries
every IP packet across 10 ms late in each direction (20 ms round trip) and serializes the client's
packets (the uplink) at each bandwidth in turn: FIFO, bytes x 8 / rate, no loss; the downlink gets
the delay only. That is ``tc netem delay 10ms rate R`` done in user space, because this machine's
kernel has no netem (``CONFIG_NET_SCH_NETEM`` is not set) and its ``tbf``/``htb`` let a bucket of
at least one MTU through at line rate: at 0.1 Mbit/s a 120 ms error on bodies of a few hundred
bytes, more than the differences measured. Rates count IP bytes (no link-layer framing). Every
``ip`` command and rate change is recorded in the JSON. It needs root (CAP_NET_ADMIN), iproute2
and /dev/net/tun; without them the script says why and exits non-zero.

Bundled model, all real and measured here: in the server namespace our own ``redis-server`` (no
persistence), ``vqa-gateway`` and one ``vqa-worker --device cpu`` serving ``llava-mini-shapes``
with batching off; from the client namespace the same images (``samples/*.png`` and generated
easy-VQA-style shapes) and questions in both modes, two ways:

- ``cli``: one ``edge-client ask --json`` process per request, wall time from spawn to exit. It
  pays the interpreter start, imports and bundle revalidation (a fresh TCP connection, one 304
  round trip), so ``cli_startup`` is measured too (``edge-client bundle-info`` on the cached
  bundle: the same start, imports and bundle check, no network) and subtracted in
  ``cli_minus_startup``.
- ``in_process``: ``EdgeClient.ask`` on a kept-alive connection with the bundle loaded (encode +
  POST + answer): what a long-running edge application pays.

LLaVA-1.5-7B, composed because the 7B model cannot run on this CPU: for each photo (scikit-image's
samples, as ``wire_bytes.py``) the real request bodies of both modes (AlignedVQ 577 tokens,
entropy-coded as the client sends them; JPEG-90 at 336 px) are POSTed over the shaped link to a
small HTTP sink in the server namespace that reads the body and answers ~150 bytes; upload = send
to complete reply, each on a new TCP connection (so from TCP's initial window; the handshake is
reported apart, as ``connect_ms``, and not counted). Totals add measured parts:

    edge-cloud = edge AlignedVQ encode (edge_cost.json) + upload(AlignedVQ body) + GPU cloud half
    cloud-only = edge JPEG-90 encode   (edge_cost.json) + upload(JPEG-90 body)   + GPU full model

with the GPU figures (batch 1; the full model's includes JPEG decode and preprocessing) read from
``gpu_worker.json``; without them totals and speedups are null. Speedup = cloud-only / edge-cloud
latency, on medians. Raw JSON: ``benchmarks/results/e2e_network.json``; two tables printed.

One script, longer than most modules here: the link emulation and the sink exist only for it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import itertools
import json
import multiprocessing
import os
import select
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from threadpoolctl import threadpool_limits

from benchmarks.harness.bodies import QUESTION, request_body
from benchmarks.harness.bundles import llava15_bundle
from benchmarks.harness.images import load_photos
from benchmarks.harness.payloads import normalize
from benchmarks.harness.pointers import resolve
from benchmarks.harness.record import (
    ONE_THREAD,
    RESULTS,
    ROOT,
    describe,
    header,
    loadavg,
    relative,
    write_result,
)
from benchmarks.harness.stack import RedisServer, Stack, entry_point, redis_version
from benchmarks.harness.stats import percentile
from edge_client import EdgeClient
from edge_client.bundle import EdgeBundle
from edge_client.cloud_only import jpeg_payload
from edge_client.encoder import EdgeEncoder
from edge_client.preprocess import resize_and_crop
from edge_client.protocol import CONTENT_TYPE
from models.data import generate_shapes

# ---- settings -----------------------------------------------------------------------------------
SETTINGS: dict[str, Any] = {
    "model": "llava-mini-shapes",
    "bandwidths_mbit": [0.1, 1.0, 5.0, 20.0, 100.0],
    "delay_ms_each_way": 10.0,  # added by the delay line in each direction: 20 ms round trip
    "sample_questions": ["what color is the shape?", "what shape is in the image?"],  # samples/*.png
    "shapes": {"generator": "models.data.generate_shapes", "images": 4, "seed": 11},
    "max_new_tokens": 8,
    "cli_repeats": 1,  # per item, mode and bandwidth
    "in_process_repeats": 3,
    "startup_repeats": 8,
    "upload_repeats": 2,  # 7B bodies: per photo, mode and bandwidth
    # 1 torch thread: on 2 shared cores 2 OpenMP threads stall whenever one is descheduled.
    "torch_threads": 1,
    "startup_timeout_s": 90.0,
    "request_timeout_s": 60.0,
}
QUICK: dict[str, Any] = {
    "bandwidths_mbit": [0.1, 100.0],
    "in_process_repeats": 2,
    "startup_repeats": 3,
    "upload_repeats": 1,
}
GOALS = {0.1: 10.0, 1.0: 2.5, 100.0: 0.95}  # the 7B speedup bars, by uplink Mbit/s
SAMPLES = ROOT / "samples"
EDGE_COST = RESULTS / "edge_cost.json"
EDGE_POINTERS = {  # llava-1.5-7b geometry, 336 px input array, this CPU
    "aligned_encode_ms": "/geometries/0/timing/input_array_to_entropy_coded/median_ms",
    "jpeg90_encode_ms": "/geometries/0/timing/baseline_jpeg90_of_input_array/median_ms",
}
GPU_RESULTS = RESULTS / "gpu_worker.json"
GPU_POINTERS = {
    "card": "/e2e_inputs/card",
    "split_batch1_ms": "/e2e_inputs/split_batch1_ms",
    "cloud_only_batch1_ms": "/e2e_inputs/cloud_only_batch1_ms",
}
CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
MODES = ("edge_cloud", "cloud_only")
# --------------------------------------------------------------------------------------------------


# ---- the emulated link --------------------------------------------------------------------------
class NetworkUnavailable(RuntimeError):
    """Namespaces or TUN devices cannot be used here: the benchmark refuses rather than fake the link."""


CLONE_NEWNET = 0x40000000  # <sched.h>
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000  # <linux/if_tun.h>
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Move the calling thread into network namespace ``namespace`` until the block ends.

    ``setns`` switches this thread only: sockets it opens and processes it spawns live in that
    namespace, so ``Stack``'s health checks and the clients need no ``ip netns exec`` wrapper.
    """
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{namespace}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def open_tun(namespace: str, device: str) -> int:
    """A non-blocking file descriptor on TUN ``device`` of ``namespace`` (raw IP packets, no header)."""
    with inside(namespace):  # the device is looked up in the namespace the fd is opened in
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", device.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
    return fd


def delay_line(
    client_fd: int, server_fd: int, delay_s: float, control: Connection, other: Connection
) -> None:
    """Carry IP packets between the two TUN devices as a link would (a separate process).

    Each direction is a FIFO link: a packet read at ``t`` finishes serializing at
    ``max(t, previous finish) + bytes * 8 / rate`` (no rate: at once) and is delivered ``delay_s``
    later. No loss, no queue limit. It asks for real-time scheduling, so busy CPUs do not delay
    packets. ``control`` receives the uplink rate (bit/s or None) and answers with the packet and
    byte counts so far (and ``realtime``); its end-of-file (the parent gone) ends the process.
    """
    other.close()  # the parent's end: only then does the parent's exit read as end-of-file here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent cleans up and closes ``control``
    with contextlib.suppress(PermissionError):  # in-kernel netem is not delayed by busy CPUs either
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    peer = {client_fd: server_fd, server_fd: client_fd}
    rate: dict[int, float | None] = {client_fd: None, server_fd: None}
    free_at = {client_fd: 0.0, server_fd: 0.0}
    counts = {"uplink_packets": 0, "uplink_bytes": 0, "downlink_packets": 0, "downlink_bytes": 0}
    counts["realtime"] = os.sched_getscheduler(0) == os.SCHED_FIFO
    due: list[tuple[float, int, int, bytes]] = []  # (delivery time, sequence, to fd, packet)
    sequence = itertools.count()
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        ready, _, _ = select.select([client_fd, server_fd, control.fileno()], [], [], timeout)
        for fd in ready:
            if fd == control.fileno():
                try:
                    rate[client_fd] = control.recv()
                except EOFError:
                    return
                control.send(counts)
                continue
            direction = "uplink" if fd == client_fd else "downlink"
            while (packet := _read(fd)) is not None:
                now = time.monotonic()
                bps = rate[fd]
                free_at[fd] = now if bps is None else max(now, free_at[fd]) + len(packet) * 8 / bps
                heapq.heappush(due, (free_at[fd] + delay_s, next(sequence), peer[fd], packet))
                counts[f"{direction}_packets"] += 1
                counts[f"{direction}_bytes"] += len(packet)
        while due and due[0][0] <= time.monotonic():
            _, _, to, packet = heapq.heappop(due)
            os.write(to, packet)


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


@dataclass
class Link:
    """Client and server namespaces joined through TUN devices by :func:`delay_line`."""

    delay_ms: float
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    commands: list[str] = field(default_factory=list)
    process: multiprocessing.process.BaseProcess | None = None
    control: Connection | None = None

    @property
    def client(self) -> str:
        return f"avq-c-{self.suffix}"

    @property
    def server(self) -> str:
        return f"avq-s-{self.suffix}"

    @property
    def device(self) -> str:
        return f"avq{self.suffix}"  # one name in both namespaces

    def run(self, *argv: str) -> None:
        self.commands.append(shlex.join(argv))
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NetworkUnavailable(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")

    def create(self) -> None:
        """Both namespaces, a TUN device in each with its address, and the delay line between them."""
        if os.geteuid() != 0:
            raise NetworkUnavailable("network namespaces and TUN devices need root (CAP_NET_ADMIN)")
        if shutil.which("ip") is None:
            raise NetworkUnavailable("the ip command was not found: install iproute2")
        if not Path("/dev/net/tun").exists():
            raise NetworkUnavailable("/dev/net/tun is missing: this kernel or container has no TUN")
        ends = ((self.client, CLIENT_IP, SERVER_IP), (self.server, SERVER_IP, CLIENT_IP))
        for ns, _, _ in ends:
            self.run("ip", "netns", "add", ns)
        for ns, ip, peer in ends:
            self.run("ip", "-n", ns, "tuntap", "add", "dev", self.device, "mode", "tun")
            self.run("ip", "-n", ns, "addr", "add", ip, "peer", peer, "dev", self.device)
            self.run("ip", "-n", ns, "link", "set", self.device, "up")
            self.run("ip", "-n", ns, "link", "set", "lo", "up")  # Redis and health checks use 127.0.0.1
        try:
            fds = (open_tun(self.client, self.device), open_tun(self.server, self.device))
        except OSError as error:
            raise NetworkUnavailable(f"cannot attach to the TUN devices: {error}") from error
        self.start_delay_line(*fds)

    def start_delay_line(self, client_fd: int, server_fd: int) -> None:
        # fork: the child needs only os/select, and this runs before the benchmark starts threads.
        context = multiprocessing.get_context("fork")
        self.control, child = context.Pipe()
        args = (client_fd, server_fd, self.delay_ms / 1e3, child, self.control)
        self.process = context.Process(target=delay_line, args=args, name="delay-line", daemon=True)
        self.process.start()
        for fd in (client_fd, server_fd):
            os.close(fd)
        child.close()
        self.shape(None)

    def shape(self, mbit: float | None) -> dict[str, int | bool]:
        """Set the uplink rate (None: unlimited); returns the delay line's packet counts so far."""
        self.commands.append(f"delay line: uplink {'unlimited' if mbit is None else f'{mbit:g} Mbit/s'}, "
                             f"{self.delay_ms:g} ms each way")  # fmt: skip
        assert self.control is not None and self.process is not None
        if not self.process.is_alive():
            raise RuntimeError(f"the delay line exited with {self.process.exitcode}")
        self.control.send(None if mbit is None else mbit * 1e6)
        return self.control.recv()

    def delete(self) -> None:
        """Stop the delay line and remove both namespaces (with their devices); absent ones are fine."""
        if self.control is not None:
            self.control.close()  # the delay line reads end-of-file and returns
        if self.process is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextlib.contextmanager
def emulated_link(delay_ms: float) -> Iterator[Link]:
    """A fresh :class:`Link`, deleted on exit, errors and Ctrl-C included."""
    link = Link(delay_ms)
    try:
        link.create()
        yield link
    finally:
        link.delete()


# ---- the upload sink (7B rows) --------------------------------------------------------------------
class Sink(BaseHTTPRequestHandler):
    """Reads a POSTed body whole and answers JSON shaped like the gateway's answer (~150 bytes)."""

    protocol_version = "HTTP/1.1"  # as the gateway (uvicorn) answers
    disable_nagle_algorithm = True  # as the gateway's asyncio sockets (TCP_NODELAY)

    def do_POST(self) -> None:
        received = len(self.rfile.read(int(self.headers["Content-Length"])))
        reply = json.dumps(
            {"request_id": uuid.uuid4().hex, "model": "llava-1.5-7b", "answer": "a sink reply",
             "queue_ms": 0.0, "compute_ms": 0.0, "batch_size": 1, "received_bytes": received}
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a line per request would interleave with the progress output."""


@contextlib.contextmanager
def sink(link: Link) -> Iterator[str]:
    """Serve :class:`Sink` from the server namespace; yields the URL the client namespace uses.

    A thread of this process, not a subprocess: its listening socket is created in the server
    namespace, and while an upload is timed the measuring thread only waits in the kernel.
    """
    with inside(link.server):
        server = ThreadingHTTPServer(("0.0.0.0", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, name="sink", daemon=True)
    thread.start()
    try:
        yield f"http://{SERVER_IP}:{server.server_address[1]}/upload"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def upload(client: httpx.Client, url: str, body: bytes) -> dict[str, float]:
    """POST ``body`` on a new connection: TCP handshake ms and send-to-complete-reply ms, apart.

    A new connection per upload starts TCP from its initial window every time, as for a device
    that asks now and then (the gateway's keep-alive is 5 s); httpcore's trace events split the
    handshake from the upload.
    """
    marks: dict[str, float] = {}

    def trace(event: str, info: dict[str, Any]) -> None:
        marks[event] = time.perf_counter()

    headers = {"Content-Type": CONTENT_TYPE, "Connection": "close"}
    response = client.post(url, content=body, headers=headers, extensions={"trace": trace})
    response.raise_for_status()
    if response.json()["received_bytes"] != len(body):
        raise RuntimeError(f"expected the sink to read {len(body)} bytes, got {response.json()}")
    connect = marks["connection.connect_tcp.complete"] - marks["connection.connect_tcp.started"]
    sent = marks["http11.receive_response_body.complete"] - marks["http11.send_request_headers.started"]
    return {"connect_ms": connect * 1e3, "upload_ms": sent * 1e3}


def measure_uploads(
    url: str, bodies: dict[str, list[bytes]], repeats: int, timeout_s: float = 60.0
) -> dict[str, dict[str, list[float]]]:
    """Per mode, connect and upload ms of every body; body ``i`` of each mode goes in turn."""
    samples = {mode: {"connect_ms": [], "upload_ms": []} for mode in bodies}
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        for _ in range(repeats):
            for i in range(len(next(iter(bodies.values())))):
                for mode, mode_bodies in bodies.items():
                    for key, value in upload(client, url, mode_bodies[i]).items():
                        samples[mode][key].append(value)
    return samples


def llava15_bodies() -> tuple[dict[str, list[bytes]], dict[str, Any]]:
    """Per photo, the ``POST /v1/vqa`` body of each mode for LLaVA-1.5 geometry (as wire_bytes.py)."""
    bundle = EdgeBundle.from_bytes(llava15_bundle())
    encoder = EdgeEncoder(bundle)
    size = bundle.image_spec.size
    photos = load_photos()
    bodies = {
        "edge_cloud": [
            request_body(
                bundle.model,
                QUESTION,
                features=encoder.encode_image(resize_and_crop(photo, size)),
            )
            for photo in photos.values()
        ],
        "cloud_only": [
            request_body(bundle.model, QUESTION, image=jpeg_payload(photo, size)) for photo in photos.values()
        ],
    }
    info = {
        "model": bundle.model,
        "tokens": bundle.tokens,
        "bits_per_token": bundle.bits_per_token,
        "image_size": size,
        "photos": list(photos),
        "question": QUESTION,
        "body_bytes": {mode: [len(b) for b in mode_bodies] for mode, mode_bodies in bodies.items()},
    }
    return bodies, info


# ---- the real stack (bundled rows) ----------------------------------------------------------------
def start_server(link: Link, workdir: Path, settings: dict, cleanup: contextlib.ExitStack) -> Stack:
    """Redis (no persistence), gateway and one CPU worker, all in the server namespace.

    The gateway listens on every address there (the client namespace cannot reach 127.0.0.1); its
    health checks still use 127.0.0.1, from inside the server namespace (see :func:`inside`).
    """
    with inside(link.server):
        redis_server = RedisServer(workdir, workdir, aof=False)
        stack = Stack(redis_server.url, settings["model"], workdir, bind="0.0.0.0")
        cleanup.callback(redis_server.stop)
        cleanup.callback(stop_stack, link, stack)  # runs first: the stack, then Redis
        redis_server.start()
        timeout = settings["startup_timeout_s"]
        stack.start_gateway(timeout)
        stack.start_workers(1, 1, 0, settings["torch_threads"], timeout)  # batch 1: no fill wait
    return stack


def stop_stack(link: Link, stack: Stack) -> None:
    with inside(link.server):  # Stack.stop also deletes its keys in this namespace's Redis
        stack.stop()


# ---- bundled-model requests -------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    image: Path
    question: str
    truth: str


def bundled_questions(workdir: Path, settings: dict) -> list[Question]:
    """Each sample PNG with each sample question (truth from its name), then generated shapes."""
    questions = []
    for path in sorted(SAMPLES.glob("*.png")):
        color, shape = path.stem.split("_")
        for question, truth in zip(settings["sample_questions"], (color, shape), strict=True):
            questions.append(Question(path, question, truth))
    spec = settings["shapes"]
    split = generate_shapes(spec["images"], seed=spec["seed"], questions_per_image=1)
    for question, answers, index in zip(split.questions, split.answers, split.image_index, strict=True):
        path = workdir / f"shapes-{index:02d}.png"
        Image.fromarray(split.images[index]).save(path)
        questions.append(Question(path, question, answers[0]))
    return questions


def client_env() -> dict[str, str]:
    """The CLI's environment: no VQA_* settings, and one BLAS thread, as ``edge_cost`` measures the
    edge. On a shared 2-core machine that matters: OpenBLAS threads spin for a while after each call,
    and a client's spinning thread took the worker's core (edge-cloud compute ran slower than
    cloud-only on the same model)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VQA_")} | ONE_THREAD


def timed_cli(argv: list[str], cwd: Path, timeout_s: float) -> tuple[float, str]:
    """(wall ms from spawn to exit, stdout) of one CLI process; a non-zero exit raises."""
    start = time.perf_counter()
    done = subprocess.run(
        argv, cwd=cwd, env=client_env(), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    wall = (time.perf_counter() - start) * 1e3
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return wall, done.stdout


def cli_ask(url: str, q: Question, cloud_only: bool, cache: Path, settings: dict) -> dict[str, Any]:
    argv = [entry_point("edge-client"), "ask", str(q.image), q.question, "--gateway", url,
            "--model", settings["model"], "--cache-dir", str(cache), "--json", "--retries", "0",
            "--max-new-tokens", str(settings["max_new_tokens"])]  # fmt: skip
    if cloud_only:
        argv.append("--cloud-only")
    wall, stdout = timed_cli(argv, cache.parent, settings["request_timeout_s"])
    return {"via": "cli", "wall_ms": wall, "truth": q.truth, **json.loads(stdout)}


def cli_startup_ms(cache: Path, settings: dict) -> list[float]:
    """``edge-client bundle-info`` on the cached bundle: the CLI's start without the network."""
    (bundle,) = (cache / "bundles").glob("*.bundle")
    argv = [entry_point("edge-client"), "bundle-info", str(bundle)]
    return [
        timed_cli(argv, cache.parent, settings["request_timeout_s"])[0]
        for _ in range(settings["startup_repeats"])
    ]


def in_process_ask(client: EdgeClient, q: Question, cloud_only: bool, settings: dict) -> dict[str, Any]:
    start = time.perf_counter()
    answer = client.ask(q.image, q.question, cloud_only=cloud_only, max_new_tokens=settings["max_new_tokens"])
    wall = (time.perf_counter() - start) * 1e3
    return {"via": "in_process", "wall_ms": wall, "truth": q.truth, **asdict(answer)}


def alternating(i: int) -> tuple[bool, bool]:
    """cloud_only flags in the order to ask question ``i``: which mode goes first alternates."""
    return (False, True) if i % 2 == 0 else (True, False)


def measure_bundled(url: str, questions: list[Question], cache: Path, settings: dict) -> dict[str, list]:
    """Every question in both modes, by CLI process and then in process; records per mode."""
    records: dict[str, list] = {mode: [] for mode in MODES}
    for _ in range(settings["cli_repeats"]):
        for i, q in enumerate(questions):
            for cloud_only in alternating(i):
                records[MODES[cloud_only]].append(cli_ask(url, q, cloud_only, cache, settings))
    timeout = settings["request_timeout_s"]
    with (
        threadpool_limits(limits=1),  # as the CLI's client_env
        EdgeClient(url, model=settings["model"], cache_dir=cache, timeout=timeout, retries=0) as client,
    ):
        for cloud_only in (False, True):  # warm-up: bundle revalidated, connection open
            client.ask(questions[0].image, questions[0].question, cloud_only=cloud_only)
        for _ in range(settings["in_process_repeats"]):
            for i, q in enumerate(questions):
                for cloud_only in alternating(i):
                    records[MODES[cloud_only]].append(in_process_ask(client, q, cloud_only, settings))
    return records


# ---- summaries and composition ----------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, Any]:
    """mean / median / p90 / min / max in ms, plus the samples (rounded)."""
    return {
        "n": len(values),
        "mean_ms": round(statistics.fmean(values), 2),
        "median_ms": round(statistics.median(values), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "min_ms": round(min(values), 2),
        "max_ms": round(max(values), 2),
        "samples_ms": [round(v, 2) for v in values],
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return round(numerator / denominator, 3)


def summarize_mode(records: list[dict], startup_ms: float) -> dict[str, Any]:
    cli = [r for r in records if r["via"] == "cli"]
    own = [r for r in records if r["via"] == "in_process"]
    return {
        "body_bytes": dict(Counter(r["request_bytes"] for r in records).most_common()),
        "body_bytes_mean": round(statistics.fmean(r["request_bytes"] for r in records), 1),
        "cli_wall_ms": stats([r["wall_ms"] for r in cli]),
        "cli_minus_startup_ms": stats([r["wall_ms"] - startup_ms for r in cli]),
        "in_process_ms": stats([r["wall_ms"] for r in own]),
        "edge_ms": stats([r["edge_ms"] for r in records]),
        "round_trip_ms": stats([r["latency_ms"] for r in records]),  # the client's POST to answer
        "queue_ms": stats([r["queue_ms"] for r in records]),
        "compute_ms": stats([r["compute_ms"] for r in records]),
        "accuracy": round(sum(normalize(r["answer"]) == r["truth"] for r in records) / len(records), 4),
    }


def bundled_row(mbit: float, records: dict[str, list], startup_ms: float) -> dict[str, Any]:
    row: dict[str, Any] = {"bandwidth_mbit": mbit}
    row |= {mode: summarize_mode(records[mode], startup_ms) for mode in MODES}
    row["speedup"] = {
        key: ratio(row["cloud_only"][key]["median_ms"], row["edge_cloud"][key]["median_ms"])
        for key in ("cli_wall_ms", "cli_minus_startup_ms", "in_process_ms")
    }
    return row


def compose(
    mbit: float,
    uploads: dict[str, dict[str, list[float]]],
    edge: dict[str, float],
    gpu: dict[str, Any] | None,
) -> dict[str, Any]:
    """One 7B row: each mode's parts (medians) and total; totals and speedup null without the GPU."""
    cloud = {"edge_cloud": None, "cloud_only": None}
    if gpu is not None:
        cloud = {"edge_cloud": gpu["split_batch1_ms"], "cloud_only": gpu["cloud_only_batch1_ms"]}
    edge_ms = {"edge_cloud": edge["aligned_encode_ms"], "cloud_only": edge["jpeg90_encode_ms"]}
    row: dict[str, Any] = {"bandwidth_mbit": mbit}
    for mode in MODES:
        upload = stats(uploads[mode]["upload_ms"])
        parts = (edge_ms[mode], upload["median_ms"], cloud[mode])
        row[mode] = {
            "edge_ms": edge_ms[mode],
            "upload_ms": upload,
            "cloud_ms": cloud[mode],
            "total_ms": None if None in parts else round(sum(parts), 2),
            "connect_ms": stats(uploads[mode]["connect_ms"]),  # not in total_ms
        }
    row["speedup"] = ratio(row["cloud_only"]["total_ms"], row["edge_cloud"]["total_ms"])
    return row


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's bars on the 7B rows; ``met`` is null where the speedup is (no GPU figure)."""
    by_mbit = {row["bandwidth_mbit"]: row["speedup"] for row in rows}
    out = {}
    for mbit, goal in GOALS.items():
        speedup = by_mbit.get(mbit)
        out[f"{mbit:g}_mbit"] = {
            "goal_speedup": goal,
            "speedup": speedup,
            "met": None if speedup is None else speedup >= goal,
        }
    return out


def read_figures(path: Path, pointers: dict[str, str]) -> dict[str, Any]:
    """The values at ``pointers`` (JSON Pointers) in ``path``, with where they came from."""
    document = json.loads(path.read_text())
    values = {name: resolve(document, pointer) for name, pointer in pointers.items()}
    return values | {"source": {"file": relative(path), "date": document.get("date"), "pointers": pointers}}


def gpu_figures(path: Path) -> dict[str, Any] | None:
    """The GPU timings, or None while that benchmark has not written them (a missing file or null)."""
    if not path.is_file():
        return None
    figures = read_figures(path, GPU_POINTERS)
    missing = [name for name in ("split_batch1_ms", "cloud_only_batch1_ms") if figures[name] is None]
    return None if missing else figures


# ---- output -------------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


VERDICT = {True: "met", False: "NOT met", None: "unknown"}


def print_tables(result: dict[str, Any]) -> None:
    bundled = result["bundled"]
    print(f"\n{bundled['model']}, real stack (medians in ms; x = cloud-only / edge-cloud); "
          f"CLI start {result['cli_startup_ms']['median_ms']:.0f} ms")  # fmt: skip
    print(f"{'Mbit/s':>6} {'AVQ B':>6} {'JPEG B':>6} | {'CLI AVQ':>7} {'CLI JPG':>7} {'x':>5} | "
          f"{'-start A':>8} {'-start J':>8} {'x':>5} | {'proc AVQ':>8} {'proc JPG':>8} {'x':>5}")  # fmt: skip
    for row in bundled["rows"]:
        e, c, x = row["edge_cloud"], row["cloud_only"], row["speedup"]
        line = f"{row['bandwidth_mbit']:>6g} {e['body_bytes_mean']:>6.0f} {c['body_bytes_mean']:>6.0f}"
        for key, w in (("cli_wall_ms", 7), ("cli_minus_startup_ms", 8), ("in_process_ms", 8)):
            line += f" | {e[key]['median_ms']:>{w}.0f} {c[key]['median_ms']:>{w}.0f} {fmt(x[key], 2):>5}"
        print(line)
    seven = result["llava15_7b"]
    gpu = seven["gpu"]
    card = gpu["card"] if gpu else "no GPU result: totals null"
    print(f"\nllava-1.5-7b, composed (medians in ms): edge encode + measured upload + GPU ({card})")
    print(f"{'Mbit/s':>6} {'AVQ B':>6} {'JPEG B':>6} | {'up AVQ':>7} {'up JPEG':>7} | "
          f"{'tot AVQ':>7} {'tot JPEG':>8} {'x':>6} {'goal':>5}")  # fmt: skip
    for row in seven["rows"]:
        e, c = row["edge_cloud"], row["cloud_only"]
        goal = seven["goals"].get(f"{row['bandwidth_mbit']:g}_mbit")
        verdict = "" if goal is None else f">={goal['goal_speedup']:g} " + VERDICT[goal["met"]]
        print(f"{row['bandwidth_mbit']:>6g} {seven['body_bytes_mean']['edge_cloud']:>6.0f} "
              f"{seven['body_bytes_mean']['cloud_only']:>6.0f} | {e['upload_ms']['median_ms']:>7.0f} "
              f"{c['upload_ms']['median_ms']:>7.0f} | {fmt(e['total_ms']):>7} {fmt(c['total_ms']):>8} "
              f"{fmt(row['speedup'], 2):>6} {verdict}")  # fmt: skip


NOTES = (
    "Network: a user-space delay line between TUN devices in two namespaces (this kernel has no "
    "sch_netem): 10 ms each way (20 ms RTT), uplink serialized FIFO at bandwidth_mbit (IP bytes, no "
    "loss), downlink delay only; no TLS. Bundled rows are fully real: own redis-server (no persistence), "
    "vqa-gateway and one vqa-worker (CPU, batch 1) in the server namespace, clients in the client "
    "namespace with one BLAS thread. cli_wall_ms: one edge-client process per request, "
    "spawn to exit, including interpreter start, imports, bundle revalidation (a new TCP connection + "
    "one 304 round trip) and the request; cli_minus_startup_ms subtracts the median of cli_startup_ms "
    "(edge-client bundle-info on the cached bundle: start, imports, bundle verification, no network). "
    "in_process_ms: EdgeClient.ask on a kept-alive connection with the bundle loaded (encode + POST + "
    "answer). The llava-1.5-7b rows are COMPOSED, not run end to end (the 7B model cannot run on this "
    "CPU): total_ms = edge_ms (median from edge_cost.json: this 2-core CPU, 336 px input array; "
    "AlignedVQ encode, or JPEG-90 encode for cloud-only) + upload_ms median (the real request bodies "
    "over the same emulated link to an HTTP sink in the server namespace, send to complete ~150-byte "
    "reply, each on a new TCP connection) + cloud_ms (GPU batch 1 from gpu_worker.json: the cloud half "
    "from AlignedVQ indices; the full model from the JPEG, decode and preprocessing included). Not in "
    "total_ms, in both modes alike: the TCP handshake (connect_ms, one RTT) and the gateway/Redis hop "
    "(a few ms; see serving_load). Speedup = cloud-only / edge-cloud on medians."
)


# ---- main -------------------------------------------------------------------------------------------
def measure(link: Link, workdir: Path, settings: dict, bodies: dict[str, list[bytes]]) -> dict[str, Any]:
    """Start the server side, then every bandwidth: bundled requests and 7B uploads."""
    out: dict[str, Any] = {"bundled_rows": [], "uploads": {}}
    with contextlib.ExitStack() as cleanup:
        stack = start_server(link, workdir, settings, cleanup)
        out["redis_server"] = redis_version_in(link, stack.redis_url)
        sink_url = cleanup.enter_context(sink(link))
        gateway_url = f"http://{SERVER_IP}:{stack.port}"
        questions = bundled_questions(workdir, settings)
        out["questions"] = [asdict(q) | {"image": q.image.name} for q in questions]
        cache = workdir / "cache"
        with inside(link.client):  # unshaped (delay only): the first CLI call downloads the bundle
            cli_ask(gateway_url, questions[0], False, cache, settings)
            out["cli_startup"] = cli_startup_ms(cache, settings)
        startup = statistics.median(out["cli_startup"])
        for mbit in settings["bandwidths_mbit"]:
            counts = link.shape(mbit)
            load = loadavg()[0]
            with inside(link.client):
                records = measure_bundled(gateway_url, questions, cache, settings)
                uploads = measure_uploads(sink_url, bodies, settings["upload_repeats"])
            row = bundled_row(mbit, records, startup)
            row |= {"loadavg_1m_before": load, "delay_line_counts_before": counts}
            out["bundled_rows"].append(row)
            out["uploads"][mbit] = uploads
            print(f"  {mbit:g} Mbit/s: in-process {row['edge_cloud']['in_process_ms']['median_ms']:.0f} vs "
                  f"{row['cloud_only']['in_process_ms']['median_ms']:.0f} ms; 7B upload "
                  f"{statistics.median(uploads['edge_cloud']['upload_ms']):.0f} vs "
                  f"{statistics.median(uploads['cloud_only']['upload_ms']):.0f} ms", flush=True)  # fmt: skip
    return out


def redis_version_in(link: Link, url: str) -> str | None:
    with inside(link.server):
        return redis_version(url)


def run(settings: dict, out: Path, gpu_path: Path) -> dict[str, Any]:
    started = time.monotonic()
    edge = read_figures(EDGE_COST, EDGE_POINTERS)
    gpu = gpu_figures(gpu_path)
    print(f"GPU figures: {gpu if gpu else f'none in {gpu_path}: 7B totals will be null'}", flush=True)
    result = header("e2e_network") | {
        "settings": settings | {"gpu_results": relative(gpu_path)},
        "notes": NOTES,
    }
    # The link first: its delay line is forked before torch (the 7B bodies) starts any thread.
    with (
        tempfile.TemporaryDirectory(prefix="e2e-network-") as tmp,
        emulated_link(settings["delay_ms_each_way"]) as link,
    ):
        bodies, info = llava15_bodies()  # torch work, done before the stack starts
        measured = measure(link, Path(tmp), settings, bodies)
        result["network"] = {
            "client_namespace": link.client,
            "server_namespace": link.server,
            "addresses": {"client": CLIENT_IP, "server": SERVER_IP},
            "rtt_ms": 2 * settings["delay_ms_each_way"],
            "emulator": "user-space delay line between TUN devices (this kernel has no sch_netem)",
            "uplink": "FIFO serialization at bandwidth_mbit (IP bytes), then the one-way delay; no loss",
            "downlink": "the one-way delay only",
            "commands": link.commands,
        }
    result["versions"]["redis_server"] = measured["redis_server"]
    result["cli_startup_ms"] = stats(measured["cli_startup"])
    result["bundled"] = {
        "model": settings["model"],
        "questions": measured["questions"],
        "rows": measured["bundled_rows"],
    }
    rows = [compose(mbit, uploads, edge, gpu) for mbit, uploads in measured["uploads"].items()]
    result["llava15_7b"] = info | {
        "composed": True,
        "body_bytes_mean": {mode: statistics.fmean(b) for mode, b in info["body_bytes"].items()},
        "edge": edge,
        "gpu": gpu,
        "gpu_missing": None if gpu else f"no e2e_inputs timings in {gpu_path}: totals and speedups null",
        "rows": rows,
        "goals": goals(rows),
    }
    return write_result(result, out, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.1 and 100 Mbit/s, fewer repetitions")
    parser.add_argument("--gpu-results", type=Path, default=GPU_RESULTS, help="GPU timings to compose")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_network.json")
    args = parser.parse_args()
    settings = SETTINGS | (QUICK if args.quick else {})
    # SIGTERM ends the script like Ctrl-C does, so every finally block runs (namespaces deleted).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(settings, args.out, args.gpu_results)
    except NetworkUnavailable as error:
        sys.exit(f"e2e_network: cannot emulate the network, so nothing was measured: {error}")
    print(f"\n{describe(result)}")
    print_tables(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
