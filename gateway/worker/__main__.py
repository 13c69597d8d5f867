"""``vqa-worker``: serve one model from its Redis stream.

    vqa-worker --redis-url redis://127.0.0.1:6379/0 --model llava-mini-shapes --device cuda
    vqa-worker --model llava-mini-shapes --check        # probe: exit 0 iff this host's worker is live
    vqa-worker --model llava-mini-shapes --burst        # drain the stream, then exit

Flags override the ``VQA_*`` settings (see ``.env.example``). Exit codes: 0 stopped cleanly
(SIGTERM/SIGINT drain the batch in hand first; ``--burst`` drained); 1 ``--check`` found no live
worker; 2 bad settings or the model/quantizer could not be loaded.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import WorkerSettings
from ..errors import QueueUnavailable

__all__ = ["main"]

log = logging.getLogger("gateway.worker")


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="vqa-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="Redis URL (VQA_REDIS_URL)")
    parser.add_argument("--model", help="registry name or model directory (VQA_MODEL)")
    parser.add_argument("--quantizer", help="quantizer file stem, e.g. preln-4096 (VQA_QUANTIZER)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (VQA_DEVICE)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="(VQA_DTYPE)")
    parser.add_argument("--max-batch", type=int, help="entries per batch (VQA_MAX_BATCH)")
    parser.add_argument("--max-wait-ms", type=int, help="wait to fill a batch (VQA_MAX_WAIT_MS)")
    parser.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    parser.add_argument(
        "--check", action="store_true", help="exit 0 iff a live worker of the model runs on this host"
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,  # WARNING or warning
        choices=["critical", "error", "warning", "info", "debug"],
        help="(VQA_LOG_LEVEL)",
    )
    args = parser.parse_args(argv)
    names = ("redis_url", "model", "quantizer", "device", "dtype", "max_batch", "max_wait_ms", "log_level")
    return args, {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def served_name(model: str) -> str:
    """The name a model is served under: a registry name as is, a model directory by its last part."""
    return Path(model).name


def check(settings: WorkerSettings) -> int:
    """Probe without loading anything heavy: 0 iff a live worker of the model runs on this host.

    Per host, not per model: in Kubernetes the host name is the pod name, so a pod is ready only
    once its own worker has loaded, warmed up and announced itself — not because another pod has.
    """
    from ..queue import RedisWorkerQueue

    queue = RedisWorkerQueue(settings, served_name(settings.model), consumer="check")
    try:
        live = queue.live_workers(socket.gethostname())
    except QueueUnavailable as exc:
        print(f"vqa-worker --check: {exc}: {exc.__cause__}", file=sys.stderr)
        return 1
    finally:
        queue.close()
    print(f"{served_name(settings.model)}: {live} live worker(s) on {socket.gethostname()}")
    return 0 if live else 1


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse_args(argv)
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        print(f"vqa-worker: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.check:
        return check(settings)

    from ..queue import RedisWorkerQueue
    from .runner import Runner  # torch: only past --check
    from .worker import Worker, worker_id

    try:
        runner = Runner.load(
            settings.model,
            settings.quantizer,
            settings.device,
            settings.dtype,
            settings.torch_threads,
            settings.fused,
            settings.prefix_cache_mb,
        )
    except (LookupError, ValueError, OSError) as exc:
        quantizer = settings.quantizer or "its default quantizer"
        print(f"vqa-worker: cannot load {settings.model} / {quantizer}: {exc}", file=sys.stderr)
        return 2
    # Warm-up batches before announcing: first-batch costs (allocator, kernels; with fused decoding
    # the compile and CUDA-graph capture of each batch size, seconds each) are paid here, so a
    # worker that looks live (and a pod that probes ready) answers at full speed.
    powers = (1 << i for i in range(settings.max_batch.bit_length()))
    for size in [p for p in powers if p < settings.max_batch] + [settings.max_batch]:
        log.info("warm-up batch of %d took %.0f ms", size, runner.warmup(size))
    # torch + transformers leave ~400k long-lived objects that each full collection would walk
    # (~200 ms on 2 CPU cores, mid-batch). Collected once, then frozen: the collector skips them.
    gc.collect()
    gc.freeze()
    block_s = (settings.poll_ms + settings.max_wait_ms) / 1000
    queue = RedisWorkerQueue(settings, runner.info.name, worker_id(), block_s=block_s)
    worker = Worker(runner, queue, settings, burst=args.burst)

    def drain(signum: int, _frame: object) -> None:
        log.info("%s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    try:
        worker.run()
    finally:
        queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
