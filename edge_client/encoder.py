"""The edge half in numpy: image -> CLIP embeddings (+ blocks) -> AlignedVQ indices -> bitstream.

Mirrors, operation for operation, what the torch side computes (``models.split.EdgeHalf`` followed
by ``models.quantizer.AlignedVQ.encode``), in float32:

1. patch embedding: CLIP's stride-P conv without bias, as one ``(patches, C*P*P) @ (C*P*P, D)``
   matmul on a reshaped view of the pixels; class token prepended, position embedding added;
2. ``pre_layrnorm`` (not at ``embed``) and, at ``block:k``, k pre-LN CLIP encoder layers
   (softmax attention, ``hidden_act`` MLP; transformers' ``CLIPEncoderLayer``);
3. at ``block:k``: per-token standardisation, the mean and log-std quantized to ``stat_bits``
   levels exactly as ``AlignedVQ.standardize``/``_quantize_stats`` (round half to even, clamp);
4. subtract the per-position centre, project down to ``(tokens, groups, code_dim)``;
5. residual nearest-code search per group and stage: ``argmin(||c||^2 - 2 z.c)``, the same
   expression (and therefore the same ties, up to float summation order) as ``nearest_code``;
   with a ``refine_threshold``, later stages send code 0 (zero) where the residual's squared norm
   is at most the threshold, as ``AlignedVQ._search``.

Speed: LLaVA-1.5 geometry (336 px, 577 x 1024, one 4096 x 32 codebook) at ``preln`` is two GEMMs
and one argmin; the weights are pre-transposed and the codebook norms precomputed once, the
``-2`` is folded into the codebook (exact: a power of two), and the distance matrix is built in
token chunks that stay in cache. No Python loop runs over tokens. The encoder is stateless
after construction, so one instance may serve several threads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image

from .bitstream import encode_stream
from .bundle import EdgeBundle
from .errors import ImageError
from .preprocess import load_image, preprocess
from .rdo import code_lengths, rdo_search

__all__ = ["EdgeEncoder", "activation"]

_STATS_EPS = np.float32(1e-6)  # models.quantizer._EPS
_SEARCH_CHUNK = 128  # tokens per distance block: 128 x 4096 float32 = 2 MiB


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / (np.float32(1.0) + np.exp(np.float32(-1.702) * x))
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    out: np.ndarray = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    return out


_ERFC_COEFFICIENTS = (  # t^9 .. t^1 coefficients of the exponent's polynomial
    0.17087277,
    -0.82215223,
    1.48851587,
    -1.13520398,
    0.27886807,
    -0.18628806,
    0.09678418,
    0.37409196,
    1.00002368,
)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit); numpy has no erf."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.5 * z)
    # Horner's scheme on t for the coefficients above (highest power first).
    horner = np.zeros_like(t)
    for coef in _ERFC_COEFFICIENTS:
        horner = horner * t + coef
    erfc = t * np.exp(-z * z - 1.26551223 + t * horner)
    out: np.ndarray = np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(np.float32)
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1.0 / math.sqrt(2.0))))
    return out


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy twin of transformers' ``ACT2FN[name]`` for the names a bundle may carry."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"expected hidden_act in {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with biased variance, as ``torch.nn.LayerNorm``."""
    centred: np.ndarray = x - x.mean(-1, keepdims=True)
    var = np.einsum("td,td->t", centred, centred)[:, None] / np.float32(x.shape[-1])
    centred /= np.sqrt(var + np.float32(eps))  # in place: saves two (tokens, D) temporaries
    centred *= weight
    centred += bias
    return centred


class _Layer:
    """One CLIP encoder layer with pre-transposed, fused weights."""

    def __init__(
        self, tensors: Mapping[str, np.ndarray], prefix: str, heads: int, eps: float, act: str
    ) -> None:
        def t(name: str) -> np.ndarray:
            return tensors[prefix + name]

        self.heads, self.eps, self.act = heads, eps, activation(act)
        self.ln1 = (t("layer_norm1.weight"), t("layer_norm1.bias"))
        self.ln2 = (t("layer_norm2.weight"), t("layer_norm2.bias"))
        projections = [f"self_attn.{p}_proj" for p in "qkv"]
        self.qkv_weight = np.ascontiguousarray(np.concatenate([t(f"{p}.weight") for p in projections]).T)
        self.qkv_bias = np.concatenate([t(f"{p}.bias") for p in projections])
        self.out_weight = np.ascontiguousarray(t("self_attn.out_proj.weight").T)
        self.out_bias = t("self_attn.out_proj.bias")
        self.fc1_weight, self.fc1_bias = np.ascontiguousarray(t("mlp.fc1.weight").T), t("mlp.fc1.bias")
        self.fc2_weight, self.fc2_bias = np.ascontiguousarray(t("mlp.fc2.weight").T), t("mlp.fc2.bias")

    def __call__(self, hidden_states: np.ndarray) -> np.ndarray:
        """``(tokens, D)`` -> ``(tokens, D)``."""
        tokens, dim = hidden_states.shape
        head_dim = dim // self.heads
        h = _layer_norm(hidden_states, *self.ln1, self.eps)
        qkv = (h @ self.qkv_weight + self.qkv_bias).reshape(tokens, 3, self.heads, head_dim)
        q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))  # (heads, tokens, head_dim)
        scores = (q @ k.transpose(0, 2, 1)) * np.float32(head_dim**-0.5)
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        attn = (scores @ v).transpose(1, 0, 2).reshape(tokens, dim)
        hidden_states = hidden_states + (attn @ self.out_weight + self.out_bias)
        h = _layer_norm(hidden_states, *self.ln2, self.eps)
        h = self.act(h @ self.fc1_weight + self.fc1_bias) @ self.fc2_weight + self.fc2_bias
        out: np.ndarray = hidden_states + h
        return out


class EdgeEncoder:
    """Encode images with an :class:`EdgeBundle`; numpy float32 only, no torch.

    >>> encoder = EdgeEncoder(EdgeBundle.load("edge.bundle"))
    >>> stream = encoder.encode_image(open("photo.jpg", "rb").read())
    """

    def __init__(self, bundle: EdgeBundle) -> None:
        self.bundle = bundle
        t = bundle.tensors
        v = bundle.vision
        self.header = bundle.stream_header()
        # Patch conv (D, C, P, P) -> matmul weight (C*P*P, D) over patches flattened in (C, P, P) order.
        self._patch_weight = np.ascontiguousarray(
            t["embeddings.patch_embedding.weight"].reshape(v.hidden_size, -1).T
        )
        self._class_row = t["embeddings.class_embedding"] + t["embeddings.position_embedding.weight"][0]
        self._patch_positions = t["embeddings.position_embedding.weight"][1:]
        self._pre_ln = (
            (t["pre_layrnorm.weight"], t["pre_layrnorm.bias"]) if "pre_layrnorm.weight" in t else None
        )
        self._layers = [
            _Layer(t, f"encoder.layers.{i}.", v.num_attention_heads, v.layer_norm_eps, v.hidden_act)
            for i in range(bundle.edge_blocks)
        ]
        stats_range = t["quantizer.stats_range"]
        self._stats_lo, self._stats_hi = stats_range[:, 0], stats_range[:, 1]
        self._stats_top = np.float32(2**bundle.stat_bits - 1)
        token_mean = t["quantizer.token_mean"]
        self._centre = token_mean if bundle.quantizer_tokens else token_mean[0]
        self._down_weight = np.ascontiguousarray(t["quantizer.down.weight"].T)  # (D, G*d)
        self._down_bias = t["quantizer.down.bias"]
        books = t["quantizer.codebooks"].copy()  # (G, S, K, d)
        if bundle.refine_threshold:
            books[:, 1:, 0] = 0  # the pinned "no refinement" codewords, as AlignedVQ.books()
        if bundle.background_norm:
            books[:, 0, 0] = 0  # the pinned background codeword
        self._books = books
        self._lengths = (
            code_lengths(bundle.freqs)
            if bundle.rate_lambda and bundle.ranking is not None and bundle.freqs is not None
            else None
        )
        # -2 c^T per (group, stage): (G, S, d, K); multiplying by 2 is exact, so z @ this == -2 (z @ c^T).
        self._books_m2t = np.ascontiguousarray(np.float32(-2.0) * books.transpose(0, 1, 3, 2))
        self._norms = (books * books).sum(-1)  # (G, S, K)

    # ---- the edge half ----------------------------------------------------------------------

    def hidden_states(self, pixel_values: np.ndarray) -> np.ndarray:
        """``pixel_values`` ``(3, H, W)`` float32 -> ``hidden_states`` ``(tokens, D)`` at the split site."""
        v = self.bundle.vision
        expected = (v.num_channels, v.image_size, v.image_size)
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.shape != expected:
            raise ValueError(f"expected pixel_values of shape {expected}, got {pixel_values.shape}")
        p, grid = v.patch_size, v.image_size // v.patch_size
        patches = (
            pixel_values.reshape(v.num_channels, grid, p, grid, p)
            .transpose(1, 3, 0, 2, 4)
            .reshape(grid * grid, v.num_channels * p * p)
        )
        hidden = np.empty((grid * grid + 1, v.hidden_size), dtype=np.float32)
        hidden[0] = self._class_row
        np.matmul(patches, self._patch_weight, out=hidden[1:])
        hidden[1:] += self._patch_positions
        if self._pre_ln is not None:
            hidden = _layer_norm(hidden, *self._pre_ln, v.layer_norm_eps)
        for layer in self._layers:
            hidden = layer(hidden)
        return hidden

    # ---- the quantizer's edge side ----------------------------------------------------------

    def _standardize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.bundle.stat_bits:
            return x, None
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        std = np.sqrt(np.mean(centred * centred, -1, keepdims=True) + _STATS_EPS)
        stats = np.concatenate([mean, np.log(std)], -1)
        scaled = (stats - self._stats_lo) / (self._stats_hi - self._stats_lo) * self._stats_top
        levels = np.clip(np.round(scaled), 0, self._stats_top).astype(np.uint16)
        return centred / std, levels

    def _search(self, z: np.ndarray) -> np.ndarray:
        """Residual nearest-code search: ``z`` ``(tokens, G, d)`` -> indices ``(tokens, G, S)`` uint16."""
        tokens = z.shape[0]
        groups, stages = self.bundle.groups, self.bundle.stages
        indices = np.empty((tokens, groups, stages), dtype=np.uint16)
        scratch = np.empty((min(_SEARCH_CHUNK, tokens), self.bundle.codebook_size), dtype=np.float32)
        for g in range(groups):
            residual = np.ascontiguousarray(z[:, g])
            for s in range(stages):
                books_m2t, norms = self._books_m2t[g, s], self._norms[g, s]
                for start in range(0, tokens, _SEARCH_CHUNK):
                    part = residual[start : start + _SEARCH_CHUNK]
                    dist = scratch[: part.shape[0]]
                    np.matmul(part, books_m2t, out=dist)
                    dist += norms
                    indices[start : start + part.shape[0], g, s] = dist.argmin(1)
                if s and self.bundle.refine_threshold:
                    small = np.einsum("td,td->t", residual, residual) <= self.bundle.refine_threshold
                    indices[small, g, s] = 0
                if s + 1 < stages:
                    residual = residual - self._books[g, s][indices[:, g, s]]
        return indices

    def encode_hidden_states(
        self, hidden_states: np.ndarray, *, rate_controlled: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(tokens, D)`` -> (indices ``(tokens, G, S)`` uint16, stat levels ``(tokens, 2)`` or None).

        ``rate_controlled`` (for a ranked stream of a bundle with ``rate_lambda``): indices chosen
        for error + rate_lambda x bits (``edge_client.rdo``) instead of the nearest codes.
        """
        expected = (self.bundle.tokens, self.bundle.vision.hidden_size)
        if hidden_states.shape != expected:
            raise ValueError(f"expected hidden_states of shape {expected}, got {hidden_states.shape}")
        x, levels = self._standardize(hidden_states.astype(np.float32, copy=False))
        z = (x - self._centre) @ self._down_weight + self._down_bias
        z = z.reshape(z.shape[0], self.bundle.groups, self.bundle.code_dim)
        if self.bundle.background_norm:  # AlignedVQ.suppress: the background is sent as zero
            z[np.einsum("tgd,tgd->tg", z, z) <= self.bundle.background_norm] = 0
        if rate_controlled and self._lengths is not None:
            b = self.bundle
            assert b.ranking is not None  # __init__ sets _lengths only for a bundle with a ranking
            chosen = rdo_search(
                z[None], self._books, b.ranking, self._lengths, b.rate_lambda, b.refine_threshold
            )
            return chosen[0], levels
        return self._search(z), levels

    def encode_pixels(
        self, pixel_values: np.ndarray, *, rate_controlled: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``pixel_values`` ``(3, H, W)`` float32 -> (indices ``(T, G, S)``, levels ``(T, 2)`` or None).

        Both uint16; levels only at ``block:k`` sites.
        """
        return self.encode_hidden_states(self.hidden_states(pixel_values), rate_controlled=rate_controlled)

    # ---- images and streams -----------------------------------------------------------------

    def pixel_values(self, image: Image.Image | np.ndarray | bytes) -> np.ndarray:
        """Decode (bytes), resize, crop and normalize one image to ``(3, size, size)`` float32."""
        if isinstance(image, (bytes, bytearray, memoryview, io.BytesIO)):
            image = load_image(bytes(image.getvalue() if isinstance(image, io.BytesIO) else image))
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL image, (H, W, 3) uint8 array or bytes, got {type(image).__name__}")
        return preprocess(image, self.bundle.image_spec)

    def encode_image(self, image: Image.Image | np.ndarray | bytes, *, entropy: bool = True) -> bytes:
        """One image -> the complete feature stream (header + indices [+ stats]).

        rANS-coded when the bundle carries tables and that is smaller (``entropy=False`` forces
        plain packing), else packed at ``bits_for(codebook_size)`` bits per index. With a
        ``rate_lambda`` the indices are chosen for the ranked stream (in the rare case that it comes
        out larger than packing, the packed stream carries those same indices).
        """
        indices, levels = self.encode_pixels(self.pixel_values(image), rate_controlled=entropy)
        return encode_stream(
            self.header,
            indices,
            levels,
            freqs=self.bundle.freqs,
            ranking=self.bundle.ranking,
            entropy=entropy,
        )
