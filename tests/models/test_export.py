"""Edge bundle export: exactly the edge's tensors, honest metadata, deterministic bytes."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.bundle import METADATA_KEY, EdgeBundle, tensors_sha256
from edge_client.entropy import normalize_freqs
from edge_client.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from models.config import QuantizerConfig
from models.export import LAYER_TENSORS, export_edge_bundle, write_edge_bundle
from models.quantizer import AlignedVQ
from models.split import vision_model
from models.store import LoadedModel, load_model
from tests.conftest import TINY_QUANTIZER, build_tiny_model_dir


def _metadata(data: bytes) -> dict:
    (size,) = struct.unpack_from("<Q", data)
    return json.loads(json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY])


@pytest.fixture(scope="module")
def sites(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """site -> (loaded model, quantizer) for preln (shared fixture), embed and block:1."""
    out = {}
    for site in ("preln", "embed", "block:1"):
        if site == "preln":
            directory, name = tiny_model_dir, TINY_QUANTIZER
        else:
            directory = build_tiny_model_dir(tmp_path_factory.mktemp("export") / "llava-tiny", site=site)
            name = f"{site.replace(':', '')}-16"
        loaded = load_model(str(directory))
        out[site] = (loaded, AlignedVQ.load(loaded.quantizer_path(name)))
    return out


@pytest.mark.parametrize("site", ["preln", "embed", "block:1"])
def test_bundle_holds_exactly_the_edge_tensors(sites: dict, site: str) -> None:
    loaded, vq = sites[site]
    bundle = EdgeBundle.from_bytes(export_edge_bundle(loaded, vq))
    names = set(bundle.tensors)
    expected = {
        "embeddings.patch_embedding.weight",
        "embeddings.class_embedding",
        "embeddings.position_embedding.weight",
        "quantizer.down.weight",
        "quantizer.down.bias",
        "quantizer.token_mean",
        "quantizer.codebooks",
        "quantizer.stats_range",
        "quantizer.freqs",
    }
    if site != "embed":
        expected |= {"pre_layrnorm.weight", "pre_layrnorm.bias"}
    if site == "block:1":
        expected |= {f"encoder.layers.0.{name}" for name in LAYER_TENSORS}
    assert names == expected

    vm = vision_model(loaded.model)
    state = {f"embeddings.{k}": v for k, v in vm.embeddings.state_dict().items()}
    state |= {f"pre_layrnorm.{k}": v for k, v in vm.pre_layrnorm.state_dict().items()}
    state |= {f"encoder.layers.{k}": v for k, v in vm.encoder.layers.state_dict().items()}
    state |= {f"quantizer.{k}": v for k, v in vq.state_dict().items() if k != "freqs"}
    for name in names - {"quantizer.freqs"}:
        assert bundle.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(bundle.tensors[name], state[name].float().numpy(), err_msg=name)
    np.testing.assert_array_equal(bundle.freqs, normalize_freqs(vq.freqs.numpy()))


@pytest.mark.parametrize("site", ["preln", "block:1"])
def test_metadata_records_config_hashes_and_geometry(sites: dict, site: str) -> None:
    loaded, vq = sites[site]
    data = export_edge_bundle(loaded, vq)
    meta = _metadata(data)
    vc = loaded.model.config.vision_config
    assert meta["format"] == "alignedvq-edge-bundle" and meta["version"] == 1
    assert meta["model"] == "llava-tiny" and meta["split_site"] == site
    assert meta["tokens"] == 17
    assert meta["quantizer"] == asdict(vq.config)
    assert meta["codebook_hash"] == vq.content_hash()
    assert meta["image_spec"] == {"size": 32, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}
    assert meta["vision"] == {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "patch_size": 8,
        "image_size": 32,
        "num_channels": 3,
        "layer_norm_eps": vc.layer_norm_eps,
        "hidden_act": "quick_gelu",
    }
    assert meta["entropy_coded"] is True
    bundle = EdgeBundle.from_bytes(data)
    assert meta["tensors_sha256"] == tensors_sha256(dict(bundle.tensors))
    assert bundle.sha256 == hashlib.sha256(data).hexdigest()
    assert bundle.stat_bits == (8 if site == "block:1" else 0)


def test_export_is_deterministic_and_written(sites: dict, tmp_path: Path) -> None:
    loaded, vq = sites["preln"]
    data = export_edge_bundle(loaded, vq)
    assert export_edge_bundle(loaded, vq) == data
    digest = write_edge_bundle(loaded, vq, tmp_path / "edge.bundle")
    assert (tmp_path / "edge.bundle").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest() == EdgeBundle.load(tmp_path / "edge.bundle").sha256


def test_uncalibrated_quantizer_has_no_entropy_tables(sites: dict) -> None:
    loaded, vq = sites["preln"]
    plain = AlignedVQ(vq.config)
    plain.load_state_dict(vq.state_dict())
    plain.freqs.zero_()
    bundle = EdgeBundle.from_bytes(export_edge_bundle(loaded, plain))
    assert bundle.freqs is None and "quantizer.freqs" not in bundle.tensors
    assert bundle.metadata["entropy_coded"] is False
    assert bundle.codebook_hash == plain.content_hash() != vq.content_hash()


def test_mismatched_quantizer_is_refused(sites: dict) -> None:
    loaded, _ = sites["preln"]
    with pytest.raises(ValueError, match="quantizer dim 16 does not match the vision hidden size 32"):
        export_edge_bundle(loaded, AlignedVQ(QuantizerConfig(dim=16, codebook_size=16, code_dim=4)))
    with pytest.raises(ValueError, match="centres 5 tokens, the model produces 17"):
        export_edge_bundle(loaded, AlignedVQ(QuantizerConfig(dim=32, codebook_size=16, code_dim=4, tokens=5)))
    deep = AlignedVQ(QuantizerConfig(dim=32, split_site="block:4", stat_bits=8, codebook_size=16, code_dim=4))
    with pytest.raises(ValueError, match="needs 4 vision layers, the model has 3"):
        export_edge_bundle(loaded, deep)


def test_half_precision_model_exports_float32(sites: dict) -> None:
    loaded, vq = sites["preln"]
    half = LoadedModel(
        loaded.name,
        loaded.model.to(torch.float16),
        loaded.tokenizer,
        loaded.prompt,
        loaded.image_spec,
        loaded.path,
    )
    try:
        bundle = EdgeBundle.from_bytes(export_edge_bundle(half, vq))
    finally:
        loaded.model.to(torch.float32)
    assert bundle.tensors["embeddings.patch_embedding.weight"].dtype == np.float32
