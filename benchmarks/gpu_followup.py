"""GPU follow-ups: a first question about an image vs a follow-up answered from the prefix cache.

    python -m benchmarks.gpu_followup                        # on an H100/H200, ~4 min
    python -m benchmarks.gpu_followup --tiny --batches 1 2 --stream-tokens 8   # CPU smoke (tests)

The LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-2-7B shapes) with random bf16 weights on
the worker's GPU path (``VQA_FUSED=auto``: :class:`models.fused.FusedLlama`), computing what
``Runner.run`` computes (:mod:`gateway.worker.runner`), minus the per-request CPU work
(tokenizing, stream decoding) that no GPU time depends on:

- **first question**: a 577-token AlignedVQ payload (12-bit indices at ``preln``) -> codebook
  gather -> the rest of the vision tower and the projector -> prefill of the prompt prefix (BOS,
  the 5 template tokens of ``USER:``, 576 image tokens) -> one batch-1 copy per row into the
  prefix cache -> prefill of the rest (a question of 6-14 random tokens and the 5 of
  ``ASSISTANT:``) over it -> greedy steps;
- **follow-up**: the same prompts, their prefixes found in the cache: stack them, prefill the
  rest, greedy steps.

Answers are 3 new tokens (EOS ignored, so every run does the same work), as in
``benchmarks/gpu_worker.py``. Measured: (a) batch-1 latency of both; (b) req/s by batch size, and
each one's best; (c) streaming a long answer (``--stream-tokens``, 128) at batch 1: time to the
first token (the ``on_token`` hook's first call, after the host sync the worker's text stream
makes) vs the whole answer, for a first question and a follow-up; (d) the batch-1 latency ratio by
answer length (``--lengths``): a follow-up saves a fixed cost (the vision tower and the prefix
prefill) from a sum that grows by one pass over the weights per answer token. Token agreement checks that a
follow-up answers exactly as the first question did. Median wall time over ``--repeats`` calls
after a warm-up (which compiles and captures CUDA graphs of each new shape); CUDA synchronised.
Raw JSON, written after every measurement, so a cut-off run keeps what it measured.

Bars: follow-up batch-1 latency <= 0.4 x a first question's; follow-up throughput >= 3 x first
questions' at each one's best batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.conversation import NEW_TOKENS, Server, prefix_entry_bytes, prompt_ids
from benchmarks.harness.gpu import build_model, device_and_sync, timed_batch
from benchmarks.harness.record import RESULTS, describe, header, write_result
from benchmarks.harness.stats import timed
from models.split import split_llava, vision_tokens

LATENCY_BAR, THROUGHPUT_BAR = 0.4, 3.0


def streamed(fn: Callable[..., torch.Tensor], sync: Callable[[], object] | None, repeats: int) -> dict:
    """Time to the first token and to the whole answer, with the worker's per-step host sync."""
    runs, marks = [], []

    def on_token(token: torch.Tensor) -> None:
        token.tolist()  # what TextStream does: the token on the host
        marks.append(time.perf_counter())

    for _ in range(repeats + 1):  # the first call warms up (compiles, captures)
        if sync is not None:
            sync()
        marks.clear()
        start = time.perf_counter()
        fn(on_token=on_token)
        if sync is not None:
            sync()
        runs.append(((marks[0] - start) * 1e3, (time.perf_counter() - start) * 1e3, len(marks)))
    runs = runs[1:]
    return {
        "time_to_first_token_ms": round(statistics.median(r[0] for r in runs), 3),
        "total_ms": round(statistics.median(r[1] for r in runs), 3),
        "tokens": runs[0][2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 96])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 3, 8], help="answer lengths for (d)")
    parser.add_argument("--budget-s", type=float, default=330, help="skip batch sizes started after this")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_followup.json")
    args = parser.parse_args()
    device, sync = device_and_sync()
    started = time.monotonic()
    result = header("gpu_followup", device)

    built = time.perf_counter()
    model, quantizer = build_model(args.tiny, device)
    config = model.config
    vq_config = quantizer.config
    _, cloud = split_llava(model, vq_config.site, fused=True)
    tokens = vision_tokens(config.vision_config)
    prefix, _, _ = prompt_ids(config, 1, np.random.default_rng(0))
    prefix = prefix.to(device)
    entry_bytes = prefix_entry_bytes(model, prefix)
    server = Server(cloud, quantizer, prefix, budget=(max(args.batches) + 1) * entry_bytes)
    result |= {
        "settings": {
            "device": device,
            "architecture": "tiny" if args.tiny else "llava-1.5-7b (random weights)",
            "engine": type(cloud.engine).__name__,
            "dtype": str(next(model.parameters()).dtype),
            "payload_tokens": tokens,
            "prefix_tokens": len(prefix),
            "prefix_cache_entry_mib": round(entry_bytes / 2**20, 1),
            "new_tokens": NEW_TOKENS,
            "stream_tokens": args.stream_tokens,
            "lengths": args.lengths,
            "batches": args.batches,
            "repeats": args.repeats,
            "build_s": round(time.perf_counter() - built, 1),
        },
        "notes": __doc__,
        "runs": [],
        "token_agreement": [],
    }

    def save() -> None:
        write_result(result, args.out, started)

    def measure(kind: str, fn, batch: int) -> None:
        run = {"kind": kind, **timed_batch(fn, batch, args.repeats, sync, device)}
        result["runs"].append(run)
        if "error" in run:
            print(f"{kind} batch {batch}: {run['error']}"[:300], flush=True)
        else:
            print(f"{kind:9s} batch {batch:4d}: {run['median_ms']:9.2f} ms  {run['req_per_s']:8.2f} req/s")
        save()

    def batch_runs(batch: int) -> None:
        """(a) and (b): first questions, then follow-ups about the same images; their agreement."""
        rng = np.random.default_rng(batch)
        _, ids, mask = (t.to(device) for t in prompt_ids(config, batch, rng))
        indices = torch.randint(0, vq_config.codebook_size, (batch, tokens, 1, 1), device=device)
        keys = [f"{batch}-{i}".encode() for i in range(batch)]
        short = dict(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        first = partial(server.first, keys, indices, ids, mask, **short)
        follow_up = partial(server.followup, keys, ids, mask, **short)
        measure("first", first, batch)
        measure("follow_up", follow_up, batch)
        try:
            same = first() == follow_up()
            result["token_agreement"].append({"batch": batch, "agreement": float(same.float().mean())})
        except Exception as exc:  # noqa: BLE001
            result["token_agreement"].append({"batch": batch, "error": repr(exc)[:500]})
        server.cache.clear()
        save()

    def streaming() -> None:
        """(c): a long answer at batch 1, first question and follow-up."""
        _, ids, mask = (t.to(device) for t in prompt_ids(config, 1, np.random.default_rng(1)))
        indices = torch.randint(0, vq_config.codebook_size, (1, tokens, 1, 1), device=device)
        long = dict(max_new_tokens=args.stream_tokens, stop_at_eos=False)
        result["streaming"] = {}
        for kind, fn in (
            ("first", partial(server.first, [b"s"], indices, ids, mask, **long)),
            ("follow_up", partial(server.followup, [b"s"], ids, mask, **long)),
        ):
            try:
                result["streaming"][kind] = streamed(fn, sync, args.repeats)
                unstreamed = statistics.median(timed(fn, args.repeats, sync))
                result["streaming"][kind]["unstreamed_total_ms"] = round(unstreamed, 3)
            except Exception as exc:  # noqa: BLE001
                result["streaming"][kind] = {"error": repr(exc)[:500]}
            save()
        server.cache.clear()

    def by_length() -> None:
        """(d): batch-1 latency of both kinds and their ratio for each answer length."""
        _, ids, mask = (t.to(device) for t in prompt_ids(config, 1, np.random.default_rng(2)))
        indices = torch.randint(0, vq_config.codebook_size, (1, tokens, 1, 1), device=device)
        rows = result["by_answer_length"] = []
        for length in args.lengths:
            fixed = dict(max_new_tokens=length, stop_at_eos=False)
            row: dict = {"new_tokens": length}
            for kind, fn in (
                ("first", partial(server.first, [b"n"], indices, ids, mask, **fixed)),
                ("follow_up", partial(server.followup, [b"n"], ids, mask, **fixed)),
            ):
                run = timed_batch(fn, 1, args.repeats, sync, device)
                row[f"{kind}_ms"] = run.get("median_ms", run.get("error"))
            if isinstance(row["first_ms"], float) and isinstance(row["follow_up_ms"], float):
                row["ratio"] = round(row["follow_up_ms"] / row["first_ms"], 3)
                print(
                    f"{length:3d} new tokens: {row['first_ms']:8.2f} vs {row['follow_up_ms']:8.2f} ms",
                    flush=True,
                )
            rows.append(row)
            server.cache.clear()
            save()

    # The smallest batch, streaming and answer lengths first: a run cut short by --budget-s still
    # answers (a), (c) and (d).
    with torch.inference_mode():
        for step in [args.batches[0], streaming, by_length, *args.batches[1:]]:
            if time.monotonic() - started > args.budget_s:
                result.setdefault("skipped", []).append(step if isinstance(step, int) else step.__name__)
            elif isinstance(step, int):
                batch_runs(step)
            else:
                step()
    result["summary"] = summarize(result["runs"])
    save()
    print(describe(result))
    for name, value in result["summary"].items():
        print(f"{name:36s} {value}")
    for kind, stream in result.get("streaming", {}).items():
        print(f"streaming {kind:9s} {stream}")


def summarize(runs: list[dict]) -> dict:
    """Batch-1 latency and best req/s of each kind, their ratios and the bars."""
    out: dict = {}
    for kind in ("first", "follow_up"):
        done = [r for r in runs if r["kind"] == kind and "median_ms" in r]
        one = next((r for r in done if r["batch"] == 1), None)
        best = max(done, key=lambda r: r["req_per_s"], default=None)
        out[f"{kind}_batch1_ms"] = one["median_ms"] if one else None
        out[f"{kind}_best_req_per_s"] = best["req_per_s"] if best else None
        out[f"{kind}_best_batch"] = best["batch"] if best else None
    if out["first_batch1_ms"] and out["follow_up_batch1_ms"]:
        out["latency_ratio"] = round(out["follow_up_batch1_ms"] / out["first_batch1_ms"], 3)
        out["latency_bar_met"] = out["latency_ratio"] <= LATENCY_BAR
    if out["first_best_req_per_s"] and out["follow_up_best_req_per_s"]:
        out["throughput_ratio"] = round(out["follow_up_best_req_per_s"] / out["first_best_req_per_s"], 2)
        out["throughput_bar_met"] = out["throughput_ratio"] >= THROUGHPUT_BAR
    return out


if __name__ == "__main__":
    main()
