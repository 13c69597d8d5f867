"""Recipe step 4: variable-rate, neighbour-ranked (and rate-controlled) refinements of a trained quantizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from models.quantizer import AlignedVQ
from models.recipe import refine_quantizers
from models.registry import load_model
from tests.conftest import TINY_QUANTIZER


def test_refinement_keeps_the_base_stage_and_writes_a_ranked_quantizer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = shutil.copytree(tiny_model_dir, tmp_path / "llava-tiny")
    loaded = load_model(str(directory))
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    rows = ((TINY_QUANTIZER, 2.0, 0.0), (TINY_QUANTIZER, 2.0, 0.5))
    names = refine_quantizers(loaded, images, rows, iters=3)
    assert names == ["preln-r2x16-t2-ranked", "preln-r2x16-t2-l0.5-ranked"]
    refined, rated = (AlignedVQ.load(loaded.quantizer_path(name)) for name in names)
    for name, tensor in refined.state_dict().items():  # one second stage and geometry, two tables
        assert torch.equal(tensor, rated.state_dict()[name]) != (name == "freqs"), name
    base = AlignedVQ.load(loaded.quantizer_path(TINY_QUANTIZER))
    assert refined.config.rank_tokens == 17 and refined.freqs.sum() == 64 * 17 * 2
    hidden = torch.randn(4, 17, base.config.dim)
    first, both = base.encode(hidden)[0], refined.encode(hidden)[0]
    assert torch.equal(both[..., :1], first)  # the first stage is the base quantizer, unchanged
    error = lambda q, i: (q.decode(i) - hidden).pow(2).mean()  # noqa: E731
    assert error(refined, both) < error(base, first)
    mtimes = [loaded.quantizer_path(name).stat().st_mtime_ns for name in names]
    assert refine_quantizers(loaded, images, rows) == names  # kept, not rebuilt
    assert [loaded.quantizer_path(name).stat().st_mtime_ns for name in names] == mtimes
