"""Recipe step 4: variable-rate, neighbour-ranked (and rate-controlled) refinements of a trained quantizer."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.quantizer import AlignedVQ
from models.recipe import refine_quantizers, retuned_quantizer, suppressed_quantizer
from models.store import LoadedModel, load_model
from tests.conftest import TINY_QUANTIZER


@pytest.fixture
def writable(tiny_model_dir: Path, tmp_path: Path) -> tuple[LoadedModel, np.ndarray]:
    """The tiny model in a folder the test may write quantizers to, and 64 random 32 px images."""
    loaded = load_model(str(shutil.copytree(tiny_model_dir, tmp_path / "llava-tiny")))
    return loaded, np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def test_refinement_keeps_the_base_stage_and_writes_a_ranked_quantizer(
    writable: tuple[LoadedModel, np.ndarray],
) -> None:
    loaded, images = writable
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


def test_retune_changes_only_the_rate_lambda(writable: tuple[LoadedModel, np.ndarray]) -> None:
    """``alignedvq retune``: another lambda over the same codebooks and tables (what a model trained
    on one table's choices reads), so the stream is still coded with that table."""
    loaded, images = writable
    (rated,) = refine_quantizers(loaded, images, ((TINY_QUANTIZER, 2.0, 0.5),), iters=3)
    with pytest.raises(ValueError, match="not rate-controlled"):
        retuned_quantizer(loaded, TINY_QUANTIZER, 2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        retuned_quantizer(loaded, rated, 0.0)
    with pytest.raises(FileExistsError, match="l0.5-ranked"):
        retuned_quantizer(loaded, rated, 0.5)  # never overwrites (here: its own source)
    name = retuned_quantizer(loaded, rated, 4.0)
    assert name == "preln-r2x16-t2-l4-ranked"
    before, after = (AlignedVQ.load(loaded.quantizer_path(n)) for n in (rated, name))
    assert after.config == replace(before.config, rate_lambda=4.0)
    for key, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[key]), key
    hidden = torch.randn(8, 17, before.config.dim)
    rank_sum = lambda q: sum(q.ranking().ranks(i.numpy()).sum() for i in q.encode(hidden)[0])  # noqa: E731
    assert rank_sum(after) <= rank_sum(before)  # a higher lambda picks cheaper (lower) ranks


def test_suppressed_copy_keeps_the_codebooks_and_drops_the_ranks(
    writable: tuple[LoadedModel, np.ndarray],
) -> None:
    """``alignedvq suppress``: the same projections and codebooks (code 0 of stage 1 now pinned to
    zero), refinement gated at the new threshold, index-frequency tables from the images."""
    loaded, images = writable
    with pytest.raises(ValueError, match="has one stage"):
        suppressed_quantizer(loaded, TINY_QUANTIZER, images, 1.0, 2.0)
    (ranked,) = refine_quantizers(loaded, images, ((TINY_QUANTIZER, 2.0, 0.5),), iters=3)
    source = AlignedVQ.load(loaded.quantizer_path(ranked))
    hidden = torch.randn(8, 17, source.config.dim)
    with torch.no_grad():
        norm = float(source.project(hidden).pow(2).sum(-1).median())
    name = suppressed_quantizer(loaded, ranked, images, norm, 3.0)
    assert name == f"preln-r2x16-t3-b{norm:g}"
    with pytest.raises(FileExistsError, match="suppress into a copy"):
        suppressed_quantizer(loaded, ranked, images, norm, 3.0)  # never overwrites a (served) file
    q = AlignedVQ.load(loaded.quantizer_path(name))
    assert (q.config.rank_tokens, q.config.rate_lambda, q.config.background_norm) == (0, 0.0, norm)
    assert torch.equal(q.codebooks, source.codebooks) and torch.equal(q.down.weight, source.down.weight)
    assert q.freqs.sum() == 64 * 17 * 2  # counted on the images' own codes
    indices = q.encode(hidden)[0]
    assert 0 < (indices == 0).all(-1).float().mean() < 1  # some tokens are background, some are not


def test_a_gated_two_stage_quantizer_gains_a_third_stage_and_keeps_its_own(
    writable: tuple[LoadedModel, np.ndarray],
) -> None:
    loaded, images = writable
    (two,) = refine_quantizers(loaded, images, ((TINY_QUANTIZER, 2.0, 0.0),), iters=3)
    (three,) = refine_quantizers(loaded, images, ((two, 2.0, 0.5),), iters=3, stages=3)
    assert three == "preln-r3x16-t2-l0.5-ranked"
    base, extended = AlignedVQ.load(loaded.quantizer_path(two)), AlignedVQ.load(loaded.quantizer_path(three))
    assert torch.equal(extended.codebooks[:, :2], base.codebooks)  # both trained stages kept exactly
    assert extended.config.refine_threshold == 2.0 and extended.freqs[:, 2].sum() > 0
    with pytest.raises(ValueError, match="keeps its threshold"):
        AlignedVQ.refined(base, torch.randn(4, 17, base.config.dim), refine_threshold=5.0, stages=3)
    with pytest.raises(ValueError, match="adds stages"):
        AlignedVQ.refined(base, torch.randn(4, 17, base.config.dim), refine_threshold=2.0, stages=2)
    hidden = torch.randn(4, 17, base.config.dim)
    plain = AlignedVQ(replace(extended.config, rate_lambda=0.0))
    plain.load_state_dict(extended.state_dict())
    error = lambda q: (q.decode(q.encode(hidden)[0]) - hidden).pow(2).mean()  # noqa: E731
    assert error(plain) <= error(base)  # a third stage only ever refines


@pytest.mark.slow
def test_scenes_recipe_runs_both_qat_stages_on_cpu(tmp_path: Path) -> None:
    """CPU smoke of ``alignedvq train-scenes``: base training with the per-patch loss and plain QAT,
    then the gated stage started from a k-means refinement of the first one's 4096-codebook."""
    from models.recipe import ranked_quantizer, run_scenes_recipe
    from models.store import load_model_dir

    small = dict(budget_s=600, device="cpu", qat_steps=2, train_images=64, holdout_images=4, batch_size=4)
    assert run_scenes_recipe(tmp_path / "a", base_steps=2, **small)
    first = tmp_path / "a" / "qat"
    assert {p.name for p in (first / "quantizers").glob("*.safetensors")} == {
        "preln-4096.safetensors",
        "preln-1024.safetensors",
    }
    assert (tmp_path / "a" / "base" / "patch_head.pt").is_file()
    assert run_scenes_recipe(tmp_path / "b", base_model=first, qat_stage="gated", **small)
    assert (first / "quantizers" / "preln-r2x4096-t20.safetensors").is_file()  # the gated start
    gated = AlignedVQ.load(tmp_path / "b" / "qat" / "quantizers" / "preln-r2x4096-t20.safetensors")
    assert gated.config.stages == 2 and gated.config.refine_threshold == 20.0
    loaded = load_model_dir(tmp_path / "b" / "qat")
    images = np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
    name = ranked_quantizer(loaded, "preln-r2x4096-t20", images, rate_lambda=0.5)
    ranked = AlignedVQ.load(loaded.quantizer_path(name))
    assert name == "preln-r2x4096-t20-l0.5-ranked" and ranked.config.rank_tokens == 65
    assert torch.equal(ranked.codebooks, gated.codebooks)  # same codes, new tables
    with pytest.raises(ValueError, match="unknown QAT stage 'gated3'; choose from plain, gated"):
        run_scenes_recipe(tmp_path / "c", base_model=tmp_path / "b" / "qat", qat_stage="gated3", **small)
    # The rdo stage trains on rate-distortion optimised three-stage codes, from their k-means start.
    with pytest.raises(FileNotFoundError, match="alignedvq refine"):
        run_scenes_recipe(tmp_path / "c", base_model=tmp_path / "b" / "qat", qat_stage="rdo", **small)
    train = np.random.default_rng(1).integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)
    rows = (("preln-r2x4096-t20", 20.0, 1.0), ("preln-r2x4096-t20", 20.0, 4.0))
    starts = refine_quantizers(loaded, train, rows, stages=3)
    assert starts == ["preln-r3x4096-t20-l1-ranked", "preln-r3x4096-t20-l4-ranked"]
    assert run_scenes_recipe(tmp_path / "c", base_model=tmp_path / "b" / "qat", qat_stage="rdo", **small)
    for name in starts:
        start = AlignedVQ.load(loaded.quantizer_path(name))
        trained = AlignedVQ.load(tmp_path / "c" / "qat" / "quantizers" / f"{name}.safetensors")
        for fixed in ("codebooks", "rank_books", "rank_offsets", "freqs"):  # the rate model it learned
            assert torch.equal(getattr(trained, fixed), getattr(start, fixed)), fixed
        assert not torch.equal(trained.down.weight, start.down.weight)  # the projection learned
    # gated3-focus starts from a k-means third stage on the trained two-stage quantizer.
    trained_two = tmp_path / "b" / "qat"
    assert run_scenes_recipe(tmp_path / "d", base_model=trained_two, qat_stage="gated3-focus", **small)
    three = AlignedVQ.load(trained_two / "quantizers" / "preln-r3x4096-t20.safetensors")
    assert torch.equal(three.codebooks[:, :2], gated.codebooks)
