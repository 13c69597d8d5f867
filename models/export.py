"""Export the edge half of a split LLaVA plus its AlignedVQ codebook as one *edge bundle*.

    from models.export import write_edge_bundle
    write_edge_bundle(load_model("llava-mini-shapes"), AlignedVQ.load(q_path), "edge.bundle")

A bundle is one safetensors blob: float32 weights of exactly what the edge runs (CLIP patch, class
and position embedding; ``pre_layrnorm`` unless the site is ``embed``; the first ``k`` encoder
layers at ``block:k``), the quantizer's edge side (down projection, position centres, codebooks,
statistics range) and, when the quantizer was calibrated, its normalized rANS tables as uint32.
The metadata is one JSON document under the key ``alignedvq`` (see ``edge_client.bundle`` for the
layout and the checks run at load). Nothing from the cloud half (up projection, later blocks, the
language model) is included, so a bundle reveals no more of the model than the edge computes.

The bytes are a pure function of the inputs: safetensors orders tensors by dtype and name, and the
metadata JSON is written with sorted keys, so re-exporting the same model gives the same sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from torch import nn

from edge_client.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    METADATA_KEY,
    SUPPORTED_ACTIVATIONS,
    tensors_sha256,
)
from edge_client.entropy import normalize_freqs

from .quantizer import AlignedVQ
from .split import vision_model
from .store import LoadedModel

__all__ = ["export_edge_bundle", "write_edge_bundle"]

# Per-layer tensors, named as in transformers' CLIPEncoderLayer (the edge runs the same math).
LAYER_TENSORS = tuple(
    f"{module}.{kind}"
    for module in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for kind in ("weight", "bias")
)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


def _module_tensors(module: nn.Module, prefix: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    state = module.state_dict()
    return {f"{prefix}{name}": _numpy(state[name]) for name in names}


def _edge_tensors(loaded: LoadedModel, quantizer: AlignedVQ) -> dict[str, np.ndarray]:
    """Every tensor the edge needs, float32 except the uint32 entropy tables and int16 ranking."""
    site = quantizer.config.site
    vm = vision_model(loaded.model)
    tensors = _module_tensors(
        vm.embeddings,
        "embeddings.",
        ("patch_embedding.weight", "class_embedding", "position_embedding.weight"),
    )
    if site.kind != "embed":
        tensors.update(_module_tensors(vm.pre_layrnorm, "pre_layrnorm.", ("weight", "bias")))
    for i, layer in enumerate(vm.encoder.layers[: site.edge_blocks]):
        tensors.update(_module_tensors(layer, f"encoder.layers.{i}.", LAYER_TENSORS))
    tensors.update(
        _module_tensors(
            quantizer, "quantizer.", ("down.weight", "down.bias", "token_mean", "codebooks", "stats_range")
        )
    )
    if quantizer.config.rank_tokens:
        tensors["quantizer.rank_books"] = quantizer.rank_books.cpu().numpy()
        tensors["quantizer.rank_offsets"] = quantizer.rank_offsets.cpu().numpy()
    counts = quantizer.freqs.detach().cpu().numpy()
    if counts.any():
        tensors["quantizer.freqs"] = normalize_freqs(counts).astype(np.uint32)
    return tensors


def _vision_meta(loaded: LoadedModel) -> dict:
    vc = loaded.model.config.vision_config
    return {
        "hidden_size": int(vc.hidden_size),
        "num_attention_heads": int(vc.num_attention_heads),
        "intermediate_size": int(vc.intermediate_size),
        "patch_size": int(vc.patch_size),
        "image_size": int(vc.image_size),
        "num_channels": int(vc.num_channels),
        "layer_norm_eps": float(vc.layer_norm_eps),
        "hidden_act": str(vc.hidden_act),
    }


def _check_compatible(loaded: LoadedModel, quantizer: AlignedVQ, vision: dict) -> int:
    """Raise ValueError if the quantizer and model cannot form an edge half; return the token count."""
    config = quantizer.config
    site = config.site
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    layers = len(vision_model(loaded.model).encoder.layers)
    if config.dim != vision["hidden_size"]:
        raise ValueError(
            f"quantizer dim {config.dim} does not match the vision hidden size {vision['hidden_size']}"
        )
    if site.edge_blocks > layers:
        raise ValueError(f"split site {site} needs {site.edge_blocks} vision layers, the model has {layers}")
    if config.tokens not in (0, tokens):
        raise ValueError(f"quantizer centres {config.tokens} tokens, the model produces {tokens}")
    if site.edge_blocks and vision["hidden_act"] not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"the edge encoder supports hidden_act in {sorted(SUPPORTED_ACTIVATIONS)}, "
            f"got {vision['hidden_act']!r}"
        )
    if loaded.image_spec.size != vision["image_size"]:
        raise ValueError(
            f"image spec size {loaded.image_spec.size} does not match the vision image size "
            f"{vision['image_size']}"
        )
    return tokens


def export_edge_bundle(loaded: LoadedModel, quantizer: AlignedVQ) -> bytes:
    """The edge bundle for ``loaded`` cut at ``quantizer.config.split_site``, as safetensors bytes.

    Raises ValueError if the quantizer does not fit the model (feature dim, token count, depth).
    """
    vision = _vision_meta(loaded)
    tokens = _check_compatible(loaded, quantizer, vision)
    tensors = _edge_tensors(loaded, quantizer)
    meta = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model": loaded.name,
        "split_site": quantizer.config.split_site,
        "tokens": tokens,
        "quantizer": asdict(quantizer.config),
        "codebook_hash": quantizer.content_hash(),
        "image_spec": {
            "size": loaded.image_spec.size,
            "mean": list(loaded.image_spec.mean),
            "std": list(loaded.image_spec.std),
        },
        "vision": vision,
        "entropy_coded": "quantizer.freqs" in tensors,
        "tensors_sha256": tensors_sha256(tensors),
    }
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def write_edge_bundle(loaded: LoadedModel, quantizer: AlignedVQ, path: str | Path) -> str:
    """Write :func:`export_edge_bundle` to ``path``; returns the bundle's sha256 (hex)."""
    data = export_edge_bundle(loaded, quantizer)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()
