"""EdgeBundle loading: a good bundle round-trips; every kind of damage is a BundleError naming it."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from edge_client.bundle import METADATA_KEY, EdgeBundle, tensors_sha256
from edge_client.errors import AlignedVQError, BundleError
from edge_client.preprocess import ImageSpec
from tests.conftest import TINY_QUANTIZER


@pytest.fixture(scope="module")
def bundle_bytes(tiny_model_dir: Path) -> bytes:
    from models.export import export_edge_bundle
    from models.quantizer import AlignedVQ
    from models.store import load_model

    loaded = load_model(str(tiny_model_dir))
    return export_edge_bundle(loaded, AlignedVQ.load(loaded.quantizer_path(TINY_QUANTIZER)))


def _parts(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    (size,) = struct.unpack_from("<Q", data)
    meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY])
    return {k: v.copy() for k, v in safetensors.numpy.load(data).items()}, meta


def _rebuild(
    data: bytes,
    tensors_fn: Callable[[dict], None] = lambda t: None,
    meta_fn: Callable[[dict], None] = lambda m: None,
    rehash: bool = True,
) -> bytes:
    tensors, meta = _parts(data)
    tensors_fn(tensors)
    meta_fn(meta)
    if rehash:
        meta["tensors_sha256"] = tensors_sha256(tensors)
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def test_good_bundle_loads_with_its_geometry(bundle_bytes: bytes, tmp_path: Path) -> None:
    bundle = EdgeBundle.from_bytes(bundle_bytes)
    assert (bundle.model, bundle.split_site, bundle.tokens) == ("llava-tiny", "preln", 17)
    assert (bundle.groups, bundle.stages, bundle.codebook_size, bundle.code_dim, bundle.stat_bits) == (
        1,
        1,
        16,
        8,
        0,
    )
    assert bundle.image_spec == ImageSpec(size=32)
    assert bundle.vision.tokens == 17 and bundle.edge_blocks == 0
    assert bundle.freqs is not None and bundle.freqs.shape == (1, 1, 16) and bundle.freqs.dtype == np.uint32
    assert len(bundle.codebook_hash) == 64 and bundle.nbytes == len(bundle_bytes)
    header = bundle.stream_header()
    assert header.matches_codebook(bundle.codebook_hash)
    assert (header.model, header.tokens, header.codebook_size, header.bits_per_token) == (
        "llava-tiny",
        17,
        16,
        4,
    )
    with pytest.raises(ValueError, match="read-only"):
        bundle.tensors["quantizer.codebooks"][0, 0, 0, 0] = 1.0
    (tmp_path / "b.bundle").write_bytes(bundle_bytes)
    assert EdgeBundle.load(tmp_path / "b.bundle").sha256 == bundle.sha256
    info = bundle.describe()
    assert info["sha256"] == bundle.sha256 and info["tensors"]["quantizer.codebooks"] == [
        "float32",
        [1, 1, 16, 8],
    ]
    json.dumps(info)


def _drop(name: str) -> Callable[[dict], None]:
    return lambda t: t.pop(name)


def _set(key: str, value: object) -> Callable[[dict], None]:
    def apply(meta: dict) -> None:
        target = meta
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value

    return apply


def _reshape_codebooks(t: dict) -> None:
    t["quantizer.codebooks"] = np.zeros((1, 1, 15, 8), np.float32)


def _double_tensor(t: dict) -> None:
    t["quantizer.down.bias"] = t["quantizer.down.bias"].astype(np.float64)


def _bad_freqs(t: dict) -> None:
    t["quantizer.freqs"] = t["quantizer.freqs"].copy()
    t["quantizer.freqs"][0, 0, 0] += 1


def _extra_layer(t: dict) -> None:
    t["encoder.layers.0.layer_norm1.weight"] = np.ones(32, np.float32)


@pytest.mark.parametrize(
    ("tensors_fn", "meta_fn", "message"),
    [
        (
            None,
            _set("format", "something-else"),
            "expected format 'alignedvq-edge-bundle', got 'something-else'",
        ),
        (None, _set("version", 2), "expected edge bundle version 1, got version 2"),
        (None, _set("tokens", 16), "expected tokens 17 for the vision geometry, got 16"),
        (
            None,
            _set("split_site", "middle"),
            "expected split_site 'embed', 'preln' or 'block:k', got 'middle'",
        ),
        (None, _set("split_site", "embed"), "expected quantizer.split_site 'embed'"),
        (None, _set("quantizer.dim", 64), "expected quantizer.dim 32 \\(vision hidden size\\), got 64"),
        (None, _set("quantizer.stat_bits", 8), "expected quantizer.stat_bits 0 at site preln, got 8"),
        (None, _set("quantizer.groups", "1"), "field 'quantizer.groups': expected int, got str"),
        (None, _set("quantizer.rate_lambda", 0.5), "expected quantizer.rate_lambda 0, or finite and > 0 w"),
        (None, _set("quantizer.rate_lambda", -1.0), "expected quantizer.rate_lambda 0, or finite"),
        (
            None,
            _set("quantizer.background_norm", -1.0),
            "expected quantizer.background_norm 0, or finite and > 0, got",
        ),
        (None, _set("image_spec.size", 64), "expected image_spec.size 32 \\(vision.image_size\\), got 64"),
        (None, _set("codebook_hash", "abc"), "expected codebook_hash as 64 lower-case hex chars"),
        (None, _set("model", "x" * 49), "does not fit the stream format: model name must be at most 48"),
        (None, _set("entropy_coded", False), "says entropy_coded=False, but quantizer.freqs is present"),
        (_drop("pre_layrnorm.bias"), None, "missing \\['pre_layrnorm.bias'\\], unexpected \\[\\]"),
        (_extra_layer, None, "missing \\[\\], unexpected \\['encoder.layers.0.layer_norm1.weight'\\]"),
        (
            _reshape_codebooks,
            None,
            "tensor quantizer.codebooks: expected float32 \\(1, 1, 16, 8\\), got float32",
        ),
        (_double_tensor, None, "tensor quantizer.down.bias: expected float32 \\(8,\\), got float64"),
        (_bad_freqs, None, "quantizer.freqs is not a valid rANS table"),
    ],
)
def test_inconsistent_bundles_are_refused(
    bundle_bytes: bytes, tensors_fn: Callable | None, meta_fn: Callable | None, message: str
) -> None:
    data = _rebuild(bundle_bytes, tensors_fn or (lambda t: None), meta_fn or (lambda m: None))
    with pytest.raises(BundleError, match=message) as info:
        EdgeBundle.from_bytes(data)
    assert info.value.code == "bad_bundle" and isinstance(info.value, AlignedVQError)


def test_bundles_from_before_later_quantizer_fields_load_with_them_off(bundle_bytes: bytes) -> None:
    def strip(meta: dict) -> None:
        for key in ("rank_tokens", "refine_threshold", "rate_lambda", "background_norm"):
            meta["quantizer"].pop(key)

    bundle = EdgeBundle.from_bytes(_rebuild(bundle_bytes, meta_fn=strip))
    assert (bundle.ranking, bundle.refine_threshold, bundle.rate_lambda, bundle.background_norm) == (
        None,
        0.0,
        0.0,
        0.0,
    )
    assert bundle.codebook_hash == EdgeBundle.from_bytes(bundle_bytes).codebook_hash


def test_altered_tensor_fails_the_hash(bundle_bytes: bytes) -> None:
    def flip(t: dict) -> None:
        t["quantizer.codebooks"] = t["quantizer.codebooks"] + np.float32(1e-3)

    with pytest.raises(BundleError, match="tensors_sha256 .* the bundle was altered"):
        EdgeBundle.from_bytes(_rebuild(bundle_bytes, flip, rehash=False))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "at least 8 bytes, got 0"),
        (b"\xff" * 16, "this is not an edge bundle"),
        (struct.pack("<Q", 99) + b"{}  ", "header of at most 4 bytes, got a declared 99"),
        (struct.pack("<Q", 4) + b"{}  ", "JSON 'alignedvq' entry: KeyError"),
        (struct.pack("<Q", 3) + b"{\xff}", "JSON 'alignedvq' entry: UnicodeDecodeError"),
    ],
)
def test_garbage_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        EdgeBundle.from_bytes(data)


def test_truncated_bundle_is_refused(bundle_bytes: bytes) -> None:
    with pytest.raises(BundleError, match="expected valid safetensors data"):
        EdgeBundle.from_bytes(bundle_bytes[:-5])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read edge bundle .*nope.bundle"):
        EdgeBundle.load(tmp_path / "nope.bundle")
    (tmp_path / "bad.bundle").write_bytes(b"12345678")
    with pytest.raises(BundleError, match="bad.bundle: this is not an edge bundle"):
        EdgeBundle.load(tmp_path / "bad.bundle")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(60))
    with pytest.raises(BundleError, match=r"not an edge bundle: expected a safetensors file .* b'\\xff\\xd8"):
        EdgeBundle.load(tmp_path / "photo.jpg")


def test_rank_tables_that_do_not_fit_are_a_bundle_error() -> None:
    ranked = Path(__file__).parents[1] / "web" / "golden" / "tiny-preln-r2-gated-ranked.bundle"

    def out_of_bounds(t: dict) -> None:  # int16 books too large for exact float32 distances
        t["quantizer.rank_books"] = np.full_like(t["quantizer.rank_books"], 32000)

    with pytest.raises(BundleError, match="neighbour-rank tables are invalid: expected .books."):
        EdgeBundle.from_bytes(_rebuild(ranked.read_bytes(), out_of_bounds))
