"""Frozen configs for the compressed representation: where the model is cut and how it is quantized.

Every artifact (quantizer checkpoint, edge bundle) embeds one of these as JSON, so it can be rebuilt
exactly and a mismatch is caught at load time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

SiteKind = Literal["embed", "preln", "block"]
_LATER_FIELDS: dict[str, Any] = {
    "refine_threshold": 0.0,
    "rank_tokens": 0,
    "rate_lambda": 0.0,
    "background_norm": 0.0,
}  # after v1


@dataclass(frozen=True)
class SplitSite:
    """Where the vision tower is cut.

    - ``embed``: after patch + position embedding, *before* CLIP's ``pre_layrnorm`` (the unaligned
      baseline: the quantized tensor is not a LayerNorm output).
    - ``preln`` (default): after ``pre_layrnorm``; the whole residual stream entering block 0 is a
      LayerNorm output, so nothing else has to cross the wire.
    - ``block:k``: after encoder blocks ``0..k-1``; the stream is standardized per token and each
      token's mean and log-std travel beside the indices (docs/design.md, "Honest bytes").
    """

    kind: SiteKind = "preln"
    k: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("embed", "preln", "block"):
            raise ValueError(f"unknown split site kind {self.kind!r}; expected embed, preln or block:k")
        if self.kind == "block" and not 0 < self.k < 256:
            raise ValueError(f"block:k needs 0 < k < 256, got k={self.k}")
        if self.kind != "block" and self.k != 0:
            raise ValueError(f"site {self.kind!r} takes no block count, got k={self.k}")

    @classmethod
    def parse(cls, text: str) -> SplitSite:
        """Parse ``"preln"``, ``"embed"`` or ``"block:3"``."""
        if text.startswith("block:"):
            try:
                return cls("block", int(text.split(":", 1)[1]))
            except ValueError as exc:
                raise ValueError(f"bad split site {text!r}: expected block:<int>") from exc
        return cls(text)  # type: ignore[arg-type]

    @property
    def edge_blocks(self) -> int:
        """How many vision encoder blocks the edge runs."""
        return self.k if self.kind == "block" else 0

    @property
    def needs_stats(self) -> bool:
        """Only mid-encoder sites carry per-token statistics: embed/preln streams are sent as is."""
        return self.kind == "block"

    def __str__(self) -> str:
        return f"block:{self.k}" if self.kind == "block" else self.kind


@dataclass(frozen=True)
class QuantizerConfig:
    """AlignedVQ geometry.

    A token vector of ``dim`` is projected to ``groups * code_dim`` (edge), each group is quantized by
    ``stages`` residual codebooks of ``codebook_size`` entries, and projected back (cloud).
    ``stat_bits`` > 0 standardizes each token first and sends its mean and log-std, ``stat_bits``
    bits each (needed at ``block:k`` sites).

    Variable rate: with ``refine_threshold`` > 0, code 0 of every stage after the first is a fixed
    zero vector, and the edge sends it whenever the residual entering that stage has a squared norm
    of at most the threshold; only the few tokens the first stage gets badly wrong (the edges of a
    small shape, say) pay for refinement once entropy-coded. ``rank_tokens`` > 0 entropy-codes each
    index as its rank around a neighbouring token's codeword (``edge_client.ranking``) for images of
    that many tokens, instead of by its own frequency. ``rate_lambda`` > 0 (ranked only) makes the
    edge choose each index for squared error + ``rate_lambda`` x its coded bits (``edge_client.rdo``).

    Background suppression: with ``background_norm`` > 0, code 0 of the first stage is a fixed zero
    vector too, and the edge quantizes every token (per group) whose projected feature has a squared
    norm of at most ``background_norm`` as the zero vector. On a textured background that is most
    tokens: the cloud reads them as "nothing here" (zero is the per-position mean) and an
    index-frequency table sends each for a fraction of a bit, so the bits go to the objects (not a
    neighbour-ranked one: there the zero code's rank changes next to every object). The decoder is
    unchanged: it sums whatever codes arrive.
    """

    dim: int
    split_site: str = "preln"  # where the features it quantizes come from (see SplitSite)
    groups: int = 1
    stages: int = 1
    codebook_size: int = 4096
    code_dim: int = 32
    stat_bits: int = 0
    tokens: int = 0  # > 0: subtract a per-position mean (known to both halves) before projecting
    commitment: float = 0.25
    ema_decay: float = 0.0  # 0 = codebooks learn by gradient; (0, 1) = EMA updates
    refine_threshold: float = 0.0  # > 0: later stages send zero code 0 below this squared residual
    rank_tokens: int = 0  # > 0: entropy-code neighbour ranks for images of this many tokens
    rate_lambda: float = 0.0  # > 0: rate-distortion optimised indices (squared error per bit)
    background_norm: float = 0.0  # > 0: tokens of at most this squared projected norm are sent as zero

    def __post_init__(self) -> None:
        if self.site.needs_stats != bool(self.stat_bits):
            raise ValueError(
                f"site {self.split_site} needs stat_bits {'> 0' if self.site.needs_stats else '= 0'}, "
                f"got {self.stat_bits}"
            )
        for name in ("dim", "groups", "stages", "code_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in 2..65536, got {self.codebook_size}")
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if not 0 <= self.stat_bits <= 16:
            raise ValueError(f"stat_bits must be in 0..16, got {self.stat_bits}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.refine_threshold < 0 or (self.refine_threshold and self.stages < 2):
            raise ValueError(
                f"refine_threshold must be 0, or > 0 with at least 2 stages; got {self.refine_threshold} "
                f"with {self.stages} stage(s)"
            )
        if self.rank_tokens < 0:
            raise ValueError(f"rank_tokens must be >= 0, got {self.rank_tokens}")
        if not 0.0 <= self.rate_lambda < math.inf or (self.rate_lambda and not self.rank_tokens):
            raise ValueError(
                f"rate_lambda must be 0, or finite and > 0 with rank_tokens; got {self.rate_lambda} "
                f"with rank_tokens {self.rank_tokens}"
            )

        if not 0.0 <= self.background_norm < math.inf:
            raise ValueError(f"background_norm must be 0, or finite and > 0; got {self.background_norm}")

    @property
    def site(self) -> SplitSite:
        return SplitSite.parse(self.split_site)

    @property
    def name(self) -> str:
        """File stem: ``preln-4096`` (one codebook), ``preln-2x64`` (grouped), ``preln-r3x16`` (residual).

        Variable-rate, rate-controlled, background-suppressing and neighbour-ranked quantizers add
        ``-t<threshold>``, ``-l<rate_lambda>``, ``-b<background_norm>`` and ``-ranked``:
        ``preln-r2x4096-t12-l1-ranked``, ``preln-r3x4096-t40-b100``.
        """
        body = f"r{self.stages}x{self.codebook_size}" if self.stages > 1 else str(self.codebook_size)
        if self.groups > 1:
            body = f"{self.groups}x{body}"
        if self.refine_threshold:
            body += f"-t{self.refine_threshold:g}"
        if self.rate_lambda:
            body += f"-l{self.rate_lambda:g}"
        if self.background_norm:
            body += f"-b{self.background_norm:g}"
        if self.rank_tokens:
            body += "-ranked"
        return f"{self.split_site.replace(':', '')}-{body}"

    @property
    def bits_per_index(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    @property
    def bits_per_token(self) -> int:
        """Nominal bits per token before entropy coding, statistics included."""
        return self.groups * self.stages * self.bits_per_index + 2 * self.stat_bits

    def to_json(self) -> str:
        """Canonical JSON (part of the content hash). The variable-rate and ranking fields appear only
        when set, so quantizer files written before they existed keep their hashes."""
        fields = asdict(self)
        for key in _LATER_FIELDS:
            if fields[key] == _LATER_FIELDS[key]:
                del fields[key]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizerConfig:
        return cls(**data)
