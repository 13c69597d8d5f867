"""Worker compute on a GPU with VQA_FUSED=auto: the bundled model answers as on the HF-module path.

    python -m benchmarks.worker_gpu_check OUT.json      # CUDA only; about a minute

256 easy-VQA test questions, encoded by the numpy edge encoder with the default quantizer and
answered in batches of 16 by the worker's ``Runner``, once with fused decoding (what ``auto``
picks on CUDA) and once with it off. Records which engine each got, answer agreement, both
accuracies, and the first-call costs (compile and CUDA-graph capture of a new batch size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.record import header, write_result
from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from edge_client.protocol import VQARequest
from gateway.worker.runner import Runner
from models.data import load_easy_vqa
from models.store import DEFAULT_MODEL, DEFAULT_QUANTIZER

QUESTIONS, BATCH, NEW_TOKENS = 256, 16, 3


def run() -> dict:
    result = header("worker_gpu_check", "cuda")
    runners = {
        "fused": Runner.load(DEFAULT_MODEL, DEFAULT_QUANTIZER, device="cuda", dtype="float32"),
        "plain": Runner.load(DEFAULT_MODEL, DEFAULT_QUANTIZER, device="cuda", dtype="float32", fused="off"),
    }
    result["engines"] = [type(r.cloud.engine).__name__ for r in runners.values()]
    bundle = EdgeBundle.from_bytes(runners["fused"].bundle)
    encoder = EdgeEncoder(bundle)
    test = load_easy_vqa("test").subset(QUESTIONS)
    items = [
        runners["fused"].prepare_request(
            VQARequest(
                request_id=f"q{n}",
                model=DEFAULT_MODEL,
                question=question,
                features=encoder.encode_image(test.images[i]),
                max_new_tokens=NEW_TOKENS,
            ),
            scope="benchmark",
        )
        for n, (question, i) in enumerate(zip(test.questions, test.image_index, strict=True))
    ]
    answers = {}
    for name, runner in runners.items():
        started = time.perf_counter()
        runner.warmup(BATCH)
        result[f"{name}_warmup{BATCH}_ms"] = (time.perf_counter() - started) * 1e3
        answers[name] = [a for b in range(0, len(items), BATCH) for a in runner.run(items[b : b + BATCH])]
        started = time.perf_counter()
        runner.run(items[:1])  # a new batch size: the fused path compiles and captures here
        torch.cuda.synchronize()
        result[f"{name}_first_batch1_ms"] = (time.perf_counter() - started) * 1e3
        result[f"accuracy_{name}"] = float(
            np.mean([a.text == refs[0] for a, refs in zip(answers[name], test.answers, strict=True)])
        )
    pairs = zip(answers["fused"], answers["plain"], strict=True)
    result["agree"] = float(np.mean([a == b for a, b in pairs]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the JSON result")
    args = parser.parse_args()
    started = time.monotonic()
    result = write_result(run(), args.out, started)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
