"""Request payloads for load against a real gateway: encoded once, before any load, so a send only
stamps a fresh ``request_id`` into the msgpack map (the gateway answers a repeated id from its
result store, so ids must not repeat)."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack

from edge_client import EdgeClient
from edge_client.encoder import EdgeEncoder
from edge_client.protocol import decode_request
from models.data import generate_shapes


def shapes_dataset(images: int) -> dict:
    """Settings of the generated easy-VQA-style shapes the load scripts send (seed 7)."""
    return {"generator": "models.data.generate_shapes", "images": images, "questions_per_image": 4, "seed": 7}


@dataclass(frozen=True)
class Item:
    fields: dict  # the msgpack map without request_id
    truth: str
    body_bytes: int


def pack(fields: dict, request_id: str) -> bytes:
    return msgpack.packb({**fields, "request_id": request_id}, use_bin_type=True)


def normalize(text: str) -> str:
    """models.evaluate.normalize_answer, without importing torch into the load generator."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def build_items(url: str, settings: dict, cache: Path) -> tuple[list[Item], dict]:
    """Encode every (image, question) of the generated shapes ``settings["dataset"]`` once, with the
    real edge encoder and the bundle the gateway at ``url`` serves for ``settings["model"]``; each
    request asks ``settings["max_new_tokens"]`` within ``settings["request_timeout_ms"]``. The
    items, and what they are."""
    model, dataset = settings["model"], settings["dataset"]
    with EdgeClient(url, model=model, cache_dir=cache, timeout=30) as client:
        bundle = client.load_bundle()
    encoder = EdgeEncoder(bundle)
    split = generate_shapes(
        dataset["images"], seed=dataset["seed"], questions_per_image=dataset["questions_per_image"]
    )
    started = time.perf_counter()
    streams = [encoder.encode_image(image) for image in split.images]
    encode_ms = (time.perf_counter() - started) * 1e3 / len(streams)
    items = []
    for question, answers, index in zip(split.questions, split.answers, split.image_index, strict=True):
        fields = {"v": 1, "model": model, "question": question, "features": streams[index]}
        fields |= {"max_new_tokens": settings["max_new_tokens"], "timeout_ms": settings["request_timeout_ms"]}
        body = pack(fields, "probe-0")
        decode_request(body)  # the gateway's own parser must accept it
        items.append(Item(fields, answers[0], len(body)))
    info = {
        "bundle_sha256": bundle.sha256,
        "codebook_hash": bundle.codebook_hash,
        "tokens": bundle.tokens,
        "requests": len(items),
        "images": len(streams),
        "edge_encode_ms_per_image": round(encode_ms, 2),
        "feature_bytes_mean": round(statistics.fmean(len(s) for s in streams), 1),
        "body_bytes_mean": round(statistics.fmean(i.body_bytes for i in items), 1),
        "answer_counts": dict(Counter(i.truth for i in items).most_common()),
    }
    return items, info
