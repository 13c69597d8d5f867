"""The edge bundle: everything the edge needs to encode an image, in one verified safetensors blob.

Written by ``models.export`` (the only place that touches torch); read here with numpy only. The
gateway serves it at ``GET /v1/models/{model}/edge-bundle``.

Layout. Tensors are float32 unless noted; ``D`` = vision hidden size, ``F`` = its intermediate
size, ``C`` channels, ``P`` patch size, ``T`` = (image_size / P)^2 + 1 tokens, ``G`` groups,
``S`` stages, ``K`` codebook size, ``d`` code dim, ``k`` edge blocks of a ``block:k`` site:

    embeddings.patch_embedding.weight      (D, C, P, P)   CLIP's bias-free patch conv
    embeddings.class_embedding             (D,)
    embeddings.position_embedding.weight   (T, D)
    pre_layrnorm.weight / .bias            (D,)           absent at the ``embed`` site
    encoder.layers.{i}.layer_norm1.*       (D,)           i < k, as in CLIPEncoderLayer
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight (D, D), .bias (D,)
    encoder.layers.{i}.layer_norm2.*       (D,)
    encoder.layers.{i}.mlp.fc1.weight (F, D), .bias (F,); mlp.fc2.weight (D, F), .bias (D,)
    quantizer.down.weight (G*d, D), quantizer.down.bias (G*d,)
    quantizer.token_mean                   (max(quantizer tokens, 1), D)
    quantizer.codebooks                    (G, S, K, d)
    quantizer.stats_range                  (2, 2)   rows (mean, log_std), cols (lo, hi)
    quantizer.freqs                        (G, S, K) uint32, normalized rANS tables; optional
    quantizer.rank_books                   (G, S, K, d) int16; only with quantizer.rank_tokens = T
    quantizer.rank_offsets                 (T, G, S, d) int16; likewise (see edge_client.ranking)

Metadata: safetensors' string map holds one key, ``alignedvq``, whose value is a JSON object:
``format`` ("alignedvq-edge-bundle"), ``version`` (1), ``model``, ``split_site``, ``tokens`` (T),
``quantizer`` (every QuantizerConfig field), ``codebook_hash`` (the quantizer's full sha256: the
stream header carries its first 16 hex chars), ``image_spec``, ``vision`` (CLIP hyper-parameters),
``entropy_coded`` and ``tensors_sha256`` (see :func:`tensors_sha256`).

Loading checks the format and version, every metadata field's type and their mutual consistency,
every tensor's name, dtype and shape against the metadata, the entropy tables, and the tensor hash;
any failure is a :class:`BundleError` naming what was expected and what arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import safetensors.numpy

from .bitstream import StreamHeader
from .entropy import table_hash
from .errors import BundleError
from .preprocess import ImageSpec
from .ranking import NeighbourRanks

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "METADATA_KEY",
    "SUPPORTED_ACTIVATIONS",
    "EdgeBundle",
    "VisionSpec",
    "tensors_sha256",
]

BUNDLE_FORMAT = "alignedvq-edge-bundle"
BUNDLE_VERSION = 1
METADATA_KEY = "alignedvq"
SUPPORTED_ACTIVATIONS = frozenset({"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"})
MAX_BUNDLE_BYTES = 1 << 30  # CLIP-L with a few edge blocks is ~100 MB; refuse anything absurd
MAX_HEADER_BYTES = 1 << 20
_SITE = re.compile(r"embed|preln|block:([1-9][0-9]{0,2})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LAYER_SHAPES = (  # (name, shape in terms of D and F)
    ("layer_norm1.weight", ("D",)),
    ("layer_norm1.bias", ("D",)),
    ("self_attn.q_proj.weight", ("D", "D")),
    ("self_attn.q_proj.bias", ("D",)),
    ("self_attn.k_proj.weight", ("D", "D")),
    ("self_attn.k_proj.bias", ("D",)),
    ("self_attn.v_proj.weight", ("D", "D")),
    ("self_attn.v_proj.bias", ("D",)),
    ("self_attn.out_proj.weight", ("D", "D")),
    ("self_attn.out_proj.bias", ("D",)),
    ("layer_norm2.weight", ("D",)),
    ("layer_norm2.bias", ("D",)),
    ("mlp.fc1.weight", ("F", "D")),
    ("mlp.fc1.bias", ("F",)),
    ("mlp.fc2.weight", ("D", "F")),
    ("mlp.fc2.bias", ("D",)),
)


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over ``name:dtype:shape`` and the little-endian C-order bytes of each tensor, by name."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}:{array.dtype.str}:{tuple(array.shape)}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class VisionSpec:
    """The CLIP vision hyper-parameters the edge encoder needs (``vision`` in the metadata)."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _field(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``meta[key]`` if it has type ``kind`` (bools are not ints), else BundleError."""
    name = f"{where}{key}"
    if key not in meta:
        raise BundleError(f"bundle metadata lacks field {name!r}")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise BundleError(f"bundle metadata field {name!r}: expected {expected}, got {type(value).__name__}")
    return value


def _positive(meta: Mapping[str, Any], key: str, where: str = "") -> int:
    value: int = _field(meta, key, int, where)
    if value < 1:
        raise BundleError(f"bundle metadata field {where}{key!r}: expected a positive int, got {value}")
    return value


def _read_metadata(data: bytes) -> dict[str, Any]:
    """The ``alignedvq`` JSON from a safetensors header, bounds-checked before parsing."""
    if len(data) < 8:
        raise BundleError(f"expected a safetensors blob of at least 8 bytes, got {len(data)}")
    (header_size,) = struct.unpack_from("<Q", data)
    if data[8:9] != b"{":
        raise BundleError(
            "this is not an edge bundle: expected a safetensors file (an 8-byte header length, then a "
            f"JSON header) as GET /v1/models/<name>/edge-bundle serves, got bytes starting {data[:12]!r}"
        )
    if header_size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise BundleError(
            f"expected a safetensors header of at most {min(MAX_HEADER_BYTES, len(data) - 8)} bytes, "
            f"got a declared {header_size}"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
        text = header["__metadata__"][METADATA_KEY]
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(
            f"expected safetensors metadata with a JSON {METADATA_KEY!r} entry: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(meta, dict):
        raise BundleError(
            f"expected the {METADATA_KEY!r} metadata to be a JSON object, got {type(meta).__name__}"
        )
    fmt, version = meta.get("format"), meta.get("version")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"expected format {BUNDLE_FORMAT!r}, got {fmt!r}: not an edge bundle")
    if version != BUNDLE_VERSION:
        raise BundleError(f"expected edge bundle version {BUNDLE_VERSION}, got version {version!r}")
    return meta


def _vision_spec(meta: Mapping[str, Any]) -> VisionSpec:
    vision = _field(meta, "vision", dict)
    where = "vision."
    spec = VisionSpec(
        hidden_size=_positive(vision, "hidden_size", where),
        num_attention_heads=_positive(vision, "num_attention_heads", where),
        intermediate_size=_positive(vision, "intermediate_size", where),
        patch_size=_positive(vision, "patch_size", where),
        image_size=_positive(vision, "image_size", where),
        num_channels=_positive(vision, "num_channels", where),
        layer_norm_eps=float(_field(vision, "layer_norm_eps", (int, float), where)),
        hidden_act=_field(vision, "hidden_act", str, where),
    )
    if spec.hidden_size % spec.num_attention_heads:
        raise BundleError(
            f"expected vision.hidden_size divisible by num_attention_heads, "
            f"got {spec.hidden_size} and {spec.num_attention_heads}"
        )
    if spec.image_size % spec.patch_size:
        raise BundleError(
            f"expected vision.image_size divisible by patch_size, got {spec.image_size} and {spec.patch_size}"
        )
    return spec


def _image_spec(meta: Mapping[str, Any]) -> ImageSpec:
    raw = _field(meta, "image_spec", dict)
    size = _positive(raw, "size", "image_spec.")
    channels: list[tuple[float, float, float]] = []
    for key in ("mean", "std"):
        values = _field(raw, key, list, "image_spec.")
        if len(values) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise BundleError(f"expected image_spec.{key} to be 3 numbers, got {values!r}")
        channels.append((float(values[0]), float(values[1]), float(values[2])))
    if min(channels[1]) <= 0:
        raise BundleError(f"expected positive image_spec.std, got {channels[1]}")
    return ImageSpec(size=size, mean=channels[0], std=channels[1])


def _edge_blocks(split_site: str) -> int:
    match = _SITE.fullmatch(split_site)
    if match is None:
        raise BundleError(f"expected split_site 'embed', 'preln' or 'block:k', got {split_site!r}")
    return int(match.group(1)) if match.group(1) else 0


def _expected_shapes(q: dict[str, Any], vision: VisionSpec, blocks: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape implied by the quantizer and vision metadata (freqs is optional)."""
    sizes = {"D": vision.hidden_size, "F": vision.intermediate_size}
    p = vision.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.patch_embedding.weight": (vision.hidden_size, vision.num_channels, p, p),
        "embeddings.class_embedding": (vision.hidden_size,),
        "embeddings.position_embedding.weight": (vision.tokens, vision.hidden_size),
        "quantizer.down.weight": (q["groups"] * q["code_dim"], vision.hidden_size),
        "quantizer.down.bias": (q["groups"] * q["code_dim"],),
        "quantizer.token_mean": (max(q["tokens"], 1), vision.hidden_size),
        "quantizer.codebooks": (q["groups"], q["stages"], q["codebook_size"], q["code_dim"]),
        "quantizer.stats_range": (2, 2),
    }
    if q["split_site"] != "embed":
        shapes["pre_layrnorm.weight"] = shapes["pre_layrnorm.bias"] = (vision.hidden_size,)
    for i in range(blocks):
        for name, dims in _LAYER_SHAPES:
            shapes[f"encoder.layers.{i}.{name}"] = tuple(sizes[dim] for dim in dims)
    return shapes


def _quantizer_meta(meta: Mapping[str, Any], vision: VisionSpec, tokens: int, site: str) -> dict[str, Any]:
    raw = _field(meta, "quantizer", dict)
    where = "quantizer."
    q: dict[str, Any] = {
        key: _positive(raw, key, where) for key in ("dim", "groups", "stages", "codebook_size", "code_dim")
    }
    q["stat_bits"] = _field(raw, "stat_bits", int, where)
    q["tokens"] = _field(raw, "tokens", int, where)
    q["split_site"] = _field(raw, "split_site", str, where)
    if q["split_site"] != site:
        raise BundleError(f"expected quantizer.split_site {site!r} (the bundle's), got {q['split_site']!r}")
    if q["dim"] != vision.hidden_size:
        raise BundleError(f"expected quantizer.dim {vision.hidden_size} (vision hidden size), got {q['dim']}")
    if q["groups"] * q["code_dim"] > q["dim"]:
        raise BundleError(f"expected groups * code_dim <= dim {q['dim']}, got {q['groups'] * q['code_dim']}")
    if not 2 <= q["codebook_size"] <= 65536:
        raise BundleError(f"expected quantizer.codebook_size in 2..65536, got {q['codebook_size']}")
    needs_stats = site.startswith("block:")
    if not 0 <= q["stat_bits"] <= 16 or needs_stats != (q["stat_bits"] > 0):
        expected = "1..16" if needs_stats else "0"
        raise BundleError(f"expected quantizer.stat_bits {expected} at site {site}, got {q['stat_bits']}")
    if q["tokens"] not in (0, tokens):
        raise BundleError(f"expected quantizer.tokens 0 or {tokens}, got {q['tokens']}")
    # Fields added after version 1 bundles: absent means off.
    q["rank_tokens"] = _field(raw, "rank_tokens", int, where) if "rank_tokens" in raw else 0
    if q["rank_tokens"] not in (0, tokens):
        raise BundleError(f"expected quantizer.rank_tokens 0 or {tokens}, got {q['rank_tokens']}")
    q["refine_threshold"] = _later_setting(raw, "refine_threshold", where, q["stages"] >= 2, "2+ stages")
    q["rate_lambda"] = _later_setting(raw, "rate_lambda", where, bool(q["rank_tokens"]), "rank_tokens")
    q["background_norm"] = _later_setting(raw, "background_norm", where, True, "")
    return q


def _later_setting(raw: Mapping[str, Any], key: str, where: str, allowed: bool, needs: str) -> float:
    """An optional quantizer setting added after version 1 bundles: absent means 0 (off); otherwise
    finite and >= 0, and > 0 only where ``allowed`` (what it ``needs``)."""
    value = _field(raw, key, (int, float), where) if key in raw else 0.0
    if not 0 <= value < float("inf") or (value and not allowed):
        condition = f" with {needs}" if needs else ""
        raise BundleError(f"expected {where}{key} 0, or finite and > 0{condition}, got {value}")
    return float(value)


def _load_tensors(data: bytes) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise BundleError(f"expected valid safetensors data: {type(exc).__name__}: {exc}") from None
    for array in tensors.values():
        array.setflags(write=False)
    return tensors


def _ranking_shapes(q: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The int16 ranking tensors a ranked quantizer needs (none otherwise)."""
    if not q["rank_tokens"]:
        return {}
    g, s, d = q["groups"], q["stages"], q["code_dim"]
    return {
        "quantizer.rank_books": (g, s, q["codebook_size"], d),
        "quantizer.rank_offsets": (q["rank_tokens"], g, s, d),
    }


def _check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: dict[str, tuple[int, ...]],
    ranking: dict[str, tuple[int, ...]],
    freqs_shape: tuple[int, ...],
) -> None:
    names = set(expected) | set(ranking) | ({"quantizer.freqs"} & set(tensors))
    missing = sorted((set(expected) | set(ranking)) - set(tensors))
    unexpected = sorted(set(tensors) - names)
    if missing or unexpected:
        raise BundleError(
            f"bundle tensors do not match its metadata: missing {missing}, unexpected {unexpected}"
        )
    for dtype, shapes in ((np.float32, expected), (np.int16, ranking)):
        for name, shape in shapes.items():
            array = tensors[name]
            if array.dtype != dtype or array.shape != shape:
                raise BundleError(
                    f"tensor {name}: expected {np.dtype(dtype).name} {shape}, "
                    f"got {array.dtype} {tuple(array.shape)}"
                )
    freqs = tensors.get("quantizer.freqs")
    if freqs is not None:
        if freqs.dtype != np.uint32 or freqs.shape != freqs_shape:
            raise BundleError(
                f"tensor quantizer.freqs: expected uint32 {freqs_shape}, "
                f"got {freqs.dtype} {tuple(freqs.shape)}"
            )
        try:
            table_hash(freqs)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"tensor quantizer.freqs is not a valid rANS table: {exc}") from None


@dataclass(frozen=True, eq=False)
class EdgeBundle:
    """A verified edge bundle (see the module docstring for the layout).

    ``tensors`` maps the names above to read-only numpy arrays; ``freqs`` is the rANS table
    ``(groups, stages, codebook_size)`` uint32 or None; ``ranking`` the neighbour-rank transform of
    a ranked quantizer (its ``freqs`` count ranks) or None; ``sha256`` is the digest of the whole blob
    (the client's cache key); ``metadata`` is the parsed JSON, for display.
    """

    model: str
    split_site: str
    tokens: int
    groups: int
    stages: int
    codebook_size: int
    code_dim: int
    stat_bits: int
    quantizer_tokens: int
    refine_threshold: float
    rate_lambda: float
    background_norm: float
    codebook_hash: str
    image_spec: ImageSpec
    vision: VisionSpec
    tensors: Mapping[str, np.ndarray]
    freqs: np.ndarray | None
    ranking: NeighbourRanks | None
    sha256: str
    nbytes: int
    metadata: Mapping[str, Any]

    @property
    def edge_blocks(self) -> int:
        """How many CLIP encoder layers the edge runs (k of ``block:k``, else 0)."""
        return _edge_blocks(self.split_site)

    @property
    def bits_per_token(self) -> int:
        """Nominal packed bits per token, statistics included."""
        return StreamHeader(**self._header_fields()).bits_per_token

    def _header_fields(self) -> dict[str, Any]:
        return dict(
            model=self.model,
            codebook_hash=self.codebook_hash,
            split_site=self.split_site,
            tokens=self.tokens,
            groups=self.groups,
            stages=self.stages,
            codebook_size=self.codebook_size,
            stat_bits=self.stat_bits,
        )

    def stream_header(self) -> StreamHeader:
        """The header template of this bundle's streams (``encode_stream`` picks the coder)."""
        return StreamHeader(**self._header_fields())

    @classmethod
    def from_bytes(cls, data: bytes) -> EdgeBundle:
        """Parse and verify a bundle; raises :class:`BundleError` naming the first problem found."""
        data = bytes(data)
        if len(data) > MAX_BUNDLE_BYTES:
            raise BundleError(f"expected a bundle of at most {MAX_BUNDLE_BYTES} bytes, got {len(data)}")
        meta = _read_metadata(data)
        model = _field(meta, "model", str)
        site = _field(meta, "split_site", str)
        blocks = _edge_blocks(site)
        tokens = _positive(meta, "tokens")
        vision = _vision_spec(meta)
        if tokens != vision.tokens:
            raise BundleError(f"expected tokens {vision.tokens} for the vision geometry, got {tokens}")
        image_spec = _image_spec(meta)
        if image_spec.size != vision.image_size:
            raise BundleError(
                f"expected image_spec.size {vision.image_size} (vision.image_size), got {image_spec.size}"
            )
        if blocks and vision.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise BundleError(
                f"expected vision.hidden_act in {sorted(SUPPORTED_ACTIVATIONS)}, got {vision.hidden_act!r}"
            )
        q = _quantizer_meta(meta, vision, tokens, site)
        codebook_hash = _field(meta, "codebook_hash", str)
        if not _SHA256.fullmatch(codebook_hash):
            raise BundleError(f"expected codebook_hash as 64 lower-case hex chars, got {codebook_hash!r}")
        recorded = _field(meta, "tensors_sha256", str)

        tensors = _load_tensors(data)
        _check_tensors(
            tensors,
            _expected_shapes(q, vision, blocks),
            _ranking_shapes(q),
            (q["groups"], q["stages"], q["codebook_size"]),
        )
        entropy_coded = _field(meta, "entropy_coded", bool)
        if entropy_coded != ("quantizer.freqs" in tensors):
            raise BundleError(
                f"metadata says entropy_coded={entropy_coded}, but quantizer.freqs is "
                f"{'present' if 'quantizer.freqs' in tensors else 'absent'}"
            )
        actual = tensors_sha256(tensors)
        if actual != recorded:
            raise BundleError(
                f"expected tensors_sha256 {recorded[:16]}..., got {actual[:16]}...: the bundle was altered"
            )
        bundle = cls(
            model=model,
            split_site=site,
            tokens=tokens,
            groups=q["groups"],
            stages=q["stages"],
            codebook_size=q["codebook_size"],
            code_dim=q["code_dim"],
            stat_bits=q["stat_bits"],
            quantizer_tokens=q["tokens"],
            refine_threshold=q["refine_threshold"],
            rate_lambda=q["rate_lambda"],
            background_norm=q["background_norm"],
            codebook_hash=codebook_hash,
            image_spec=image_spec,
            vision=vision,
            tensors=MappingProxyType(tensors),
            freqs=tensors.get("quantizer.freqs"),
            ranking=_ranking(tensors) if q["rank_tokens"] else None,
            sha256=hashlib.sha256(data).hexdigest(),
            nbytes=len(data),
            metadata=MappingProxyType(meta),
        )
        try:
            bundle.stream_header()  # model name length and geometry limits of the wire format
        except ValueError as exc:
            raise BundleError(f"bundle does not fit the stream format: {exc}") from None
        return bundle

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EdgeBundle:
        """Read and verify a bundle file."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                raise BundleError(f"{path}: expected at most {MAX_BUNDLE_BYTES} bytes, got {size}")
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read edge bundle {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_bytes(data)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc.message}") from None

    def describe(self) -> dict[str, Any]:
        """The metadata plus sha256, size and tensor shapes, JSON-able (``edge-client bundle-info``)."""
        return {
            **self.metadata,
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "bits_per_token": self.bits_per_token,
            "tensors": {name: [str(a.dtype), list(a.shape)] for name, a in sorted(self.tensors.items())},
        }


def _ranking(tensors: dict[str, np.ndarray]) -> NeighbourRanks:
    """The bundle's neighbour-rank tables, or BundleError if they do not fit its codebook."""
    try:
        return NeighbourRanks(tensors["quantizer.rank_books"], tensors["quantizer.rank_offsets"])
    except ValueError as exc:
        raise BundleError(f"the bundle's neighbour-rank tables are invalid: {exc}") from None
