"""Evaluation: metrics, the JSON record of `alignedvq eval`, and honest byte counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.bitstream import StreamHeader, encode_stream
from models.architectures import llava15_geometry_config
from models.evaluate import evaluate, normalize_answer, vqa_score
from models.quantizer import AlignedVQ
from models.store import ModelNotAvailable, load_model

RECORD_KEYS = {
    "model",
    "dataset",
    "n",
    "accuracy_original",
    "accuracy_alignedvq",
    "bits_per_token",
    "payload_bytes",
    "stream_bytes_packed",
    "stream_bytes_entropy",
    "bits_per_token_entropy",
    "codebook_hash",
}


def test_vqa_score_exact_match_and_soft_accuracy() -> None:
    assert normalize_answer(" Blue.\n") == "blue"
    assert vqa_score("blue", ["blue"]) == 1.0
    assert vqa_score("red", ["blue"]) == 0.0
    assert vqa_score("two", ["two", "two", "2", "three"]) == pytest.approx(2 / 3)
    assert vqa_score("two", ["two"] * 5) == 1.0


def test_evaluate_record_measures_real_streams(tiny_model_dir: Path) -> None:
    from models.data import generate_shapes

    loaded = load_model(str(tiny_model_dir))
    q = AlignedVQ.load(loaded.quantizer_path("preln-16"))
    data = generate_shapes(6, seed=1, questions_per_image=2, size=64)  # resized to the model's 32 px
    record = evaluate(loaded, data, "shapes", "test", q, q.config.site)
    assert record.keys() >= RECORD_KEYS
    assert record["n"] == 12 and record["bits_per_token"] == 4
    header = 3 + 1 + 1 + len("llava-tiny") + 26
    assert record["stream_bytes_packed"] == header + (17 * 4 + 7) // 8
    assert record["stream_bytes_entropy"] <= record["stream_bytes_packed"]
    assert record["payload_bytes"] > record["stream_bytes_entropy"]  # the msgpack body around it


@pytest.mark.slow
def test_alignedvq_eval_cli_prints_one_json_object(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.cli",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--quantizer",
            "preln-16",
            "--limit",
            "8",
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record.keys() >= RECORD_KEYS and record["n"] == 8 and record["dataset"] == "easy-vqa"


def test_llava15_geometry_packs_to_866_bytes_plus_a_small_header() -> None:
    vision = llava15_geometry_config(vision_layers=1, text_layers=1).vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    assert (tokens, vision.hidden_size) == (577, 1024)
    header = StreamHeader(
        model="llava-1.5-7b",
        codebook_hash="ab" * 32,
        split_site="preln",
        tokens=tokens,
        groups=1,
        stages=1,
        codebook_size=4096,
    )
    indices = np.random.default_rng(0).integers(0, 4096, size=(tokens, 1, 1))
    stream = encode_stream(header, indices, entropy=False)
    assert len(stream) - header.nbytes == 866
    assert header.nbytes <= 64


def test_llava15_is_resolved_from_the_local_cache_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="local Hugging Face cache"):
        load_model("llava-1.5-7b")


def test_unknown_model_names_the_available_ones() -> None:
    with pytest.raises(ModelNotAvailable, match="llava-mini-shapes"):
        load_model("no-such-model")


def test_bundled_model_loads_with_verified_manifest() -> None:
    loaded = load_model("llava-mini-shapes")
    assert loaded.model.config.vision_config.image_size == 64 and loaded.prompt.image_tokens == 64
    assert sum(p.numel() for p in loaded.model.parameters()) < 10_000_000
    assert loaded.model.dtype == torch.float32
