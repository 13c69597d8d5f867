"""Training smoke tests on CPU: the recipe's loops run, checkpoint, resume and write loadable files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.config import QuantizerConfig
from models.data import generate_shapes, shapes_training_splits
from models.quantizer import AlignedVQ
from models.split import vision_model
from models.store import load_model, load_model_dir
from models.train import train_mini, train_quantizers


def _events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_train_mini_pauses_resumes_and_saves_a_verified_model(tmp_path: Path) -> None:
    splits = shapes_training_splits(generated_images=8, easy_vqa_limit=40)
    kw = dict(steps=3, batch_size=4, eval_every=2)
    assert train_mini(tmp_path, *splits, time_budget_s=0.0, **kw) == tmp_path  # paused after one step
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "model").exists()
    model_dir = train_mini(tmp_path, *splits, **kw)
    assert _events(tmp_path / "train_log.jsonl") == ["start", "paused", "start", "eval", "eval", "done"]
    loaded = load_model_dir(model_dir)
    assert loaded.model.config.vision_config.image_size == 64
    assert loaded.model.dtype == torch.float32  # fp16 on disk, fp32 compute
    assert len(loaded.tokenizer) == loaded.model.config.text_config.vocab_size


def test_train_quantizers_jointly_with_the_cloud(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    dim = loaded.model.config.vision_config.hidden_size
    configs = [
        QuantizerConfig(dim=dim, split_site=site, tokens=17, codebook_size=8, code_dim=4)
        for site in ("preln", "embed")
    ]
    data = generate_shapes(12, seed=3, size=32)
    before = loaded.model.model.multi_modal_projector.linear_1.weight.detach().clone()
    train_quantizers(
        loaded,
        configs,
        data,
        data,
        tmp_path,
        steps=4,
        batch_size=4,
        trainable=("quantizer", "projector"),
        kmeans_images=12,
        kmeans_iters=2,
    )
    after = loaded.model.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(before, after)
    for config in configs:
        q = AlignedVQ.load(tmp_path / f"{config.name}.safetensors")
        assert q.config == config
        assert q.freqs.sum() == 12 * 17  # calibration counts every token of every image
    names = [
        json.loads(x).get("name") for x in (tmp_path / "train_quantizers.log.jsonl").read_text().splitlines()
    ]
    assert {"preln-8", "embed-8", "unquantized"} <= set(names)


def test_a_rate_controlled_quantizer_needs_a_calibrated_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    """k-means would leave it without tables (so nearest codes all along) and frozen at k-means."""
    loaded = load_model(str(tiny_model_dir))
    dim = loaded.model.config.vision_config.hidden_size
    geometry = dict(tokens=17, codebook_size=8, code_dim=4, stages=2, refine_threshold=1.0)
    config = QuantizerConfig(dim=dim, **geometry, rank_tokens=17, rate_lambda=1.0)
    data = generate_shapes(4, seed=3, size=32)
    with pytest.raises(ValueError, match="rate-controlled: it trains from a calibrated quantizer"):
        train_quantizers(loaded, [config], data, data, tmp_path, steps=1, batch_size=4, init_dir=tmp_path)


def test_quantization_aware_training_moves_the_edge_and_the_language_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    loaded = load_model(str(tiny_model_dir))
    config = QuantizerConfig(dim=loaded.model.config.vision_config.hidden_size, codebook_size=8, code_dim=4)
    data = generate_shapes(8, seed=5, size=32)
    weights = {
        "edge": vision_model(loaded.model).embeddings.patch_embedding.weight,
        "language": loaded.model.lm_head.weight,
    }
    before = {k: w.detach().clone() for k, w in weights.items()}
    kw = dict(steps=3, batch_size=4, kmeans_images=8, kmeans_iters=2)
    trained = train_quantizers(
        loaded, [config], data, data, tmp_path, trainable=("quantizer", "edge", "language"), **kw
    )
    assert trained is not None
    assert all(not torch.equal(before[k], w) for k, w in weights.items())
    assert not any(p.requires_grad for p in loaded.model.parameters())  # frozen again for serving


def test_train_quantizers_checkpoints_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    config = QuantizerConfig(dim=loaded.model.config.vision_config.hidden_size, codebook_size=8, code_dim=4)
    data = generate_shapes(8, seed=5, size=32)
    kw = dict(steps=3, batch_size=4, kmeans_images=8, kmeans_iters=2)
    assert train_quantizers(loaded, [config], data, data, tmp_path, time_budget_s=0.0, **kw) is None
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 0
    train_quantizers(loaded, [config], data, data, tmp_path, **kw)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3
    events = _events(tmp_path / "train_quantizers.log.jsonl")
    assert events.count("init") == 1 and "stopped" in events and "resumed" in events
    assert events.count("start") == 2  # each call logs the schedule it runs
    other = QuantizerConfig(dim=config.dim, codebook_size=4, code_dim=4)
    with pytest.raises(ValueError, match="holds quantizers"):
        train_quantizers(loaded, [other], data, data, tmp_path, **kw)


def test_cloud_only_training_keeps_the_codes_the_edge_sends(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``adapter`` without ``quantizer`` or ``edge``: only the quantizer's ``up`` map and the cloud learn,
    so every index the edge would send (and the codebooks, even an EMA one) stays as it was."""
    loaded = load_model(str(tiny_model_dir))
    config = QuantizerConfig(
        dim=loaded.model.config.vision_config.hidden_size, codebook_size=8, code_dim=4, ema_decay=0.9
    )
    data = generate_shapes(8, seed=5, size=32)
    kw = dict(steps=1, batch_size=4, kmeans_images=8, kmeans_iters=2)
    start = train_quantizers(loaded, [config], data, data, tmp_path / "start", **kw)
    assert start is not None
    edge_weight = vision_model(loaded.model).embeddings.patch_embedding.weight.detach().clone()
    head = loaded.model.lm_head.weight.detach().clone()
    trained = train_quantizers(
        loaded,
        [config],
        data,
        data,
        tmp_path / "cloud",
        init_dir=tmp_path / "start",
        trainable=("adapter", "vision", "projector", "language"),
        **{**kw, "steps": 3},
    )
    assert trained is not None
    before, after = start[0].state_dict(), trained[0].state_dict()
    for name in ("down.weight", "down.bias", "codebooks"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["up.weight"], after["up.weight"])
    assert torch.equal(edge_weight, vision_model(loaded.model).embeddings.patch_embedding.weight)
    assert not torch.equal(head, loaded.model.lm_head.weight)
