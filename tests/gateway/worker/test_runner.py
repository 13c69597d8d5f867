"""The worker's compute: ``VQA_FUSED`` picks the decoding path, and both give the same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.worker.runner import Prepared, Runner
from models.fused import FusedLlama
from models.generation import HFEngine
from tests.conftest import TINY_QUANTIZER


def test_fused_decoding_is_chosen_by_setting_and_answers_the_same(tiny_model_dir: Path, runner) -> None:
    fused = Runner.load(str(tiny_model_dir), TINY_QUANTIZER, device="cpu", dtype="float32", fused="on")
    assert isinstance(fused.cloud.engine, FusedLlama) and isinstance(
        runner.cloud.engine, HFEngine
    )  # auto: off on CPU
    rng = np.random.default_rng(3)
    size = fused.quantizer.config.codebook_size
    items = [
        Prepared(question, 4, rng.integers(0, size, (fused.info.tokens, 1, 1), dtype=np.uint16))
        for question in ("what color is the shape?", "is there a circle?", "what shape is present?")
    ]
    assert fused.run(items) == runner.run(items)
