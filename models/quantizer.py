"""AlignedVQ: grouped + residual vector quantization with a linear down/up projection.

Shapes: a feature ``x`` is ``(batch, tokens, dim)``; it is (optionally) standardized per token,
projected down to ``(batch, tokens, groups, code_dim)`` on the edge, quantized by ``stages``
residual codebooks per group into ``indices`` of shape ``(batch, tokens, groups, stages)``, and on the
cloud the summed code vectors are projected back up to ``(batch, tokens, dim)``.

Training follows VQ-VAE (van den Oord et al. 2017): straight-through gradients, a codebook loss and a
commitment loss (or EMA codebook updates), with dead codes restarted from live residuals. k-means on
PCA-projected features initialises everything; on the bundled models that init did most of the work.

Variable rate (``refine_threshold``): code 0 of every later stage is pinned to zero and sent when the
residual is already small, so refinement costs bits only where the first stage failed. Ranking
(``rank_tokens``): an int16 copy of the codebooks and per-position offsets, computed at calibration,
let the edge and cloud rank each index around its neighbour's codeword (``edge_client.ranking``).
Rate control (``rate_lambda``): the edge trades squared error for ranked-stream bits per index
(``edge_client.rdo``); the tables are recounted on the indices it then sends.

Files are safetensors with the config and a content hash in the metadata; loading checks every
tensor name, shape and the hash, and never silently re-initialises.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edge_client.entropy import normalize_freqs
from edge_client.ranking import NeighbourRanks, max_book, neighbours, twice_base
from edge_client.rdo import code_lengths, rdo_search

from .config import QuantizerConfig
from .rate_search import RankGeometry, rdo_search_torch

FORMAT = "alignedvq-quantizer"
FORMAT_VERSION = 1
_EPS = 1e-6


class QuantizerFileError(ValueError):
    """A quantizer file is missing, malformed, or does not match its hash or config."""


@dataclass
class QuantizerOutput:
    """What a training forward pass returns."""

    hidden_states: torch.Tensor  # (batch, tokens, dim), reconstructed, straight-through
    indices: torch.Tensor  # (batch, tokens, groups, stages) int64
    loss: torch.Tensor  # codebook + commitment loss (scalar)
    stats: torch.Tensor | None  # (batch, tokens, 2) quantized mean / log-std levels


def kmeans(
    x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Lloyd's k-means on ``x`` of shape ``(n, d)``; returns ``(k, d)`` centroids.

    Seeds from distinct random points; an emptied cluster is reseeded from a random point so every
    code stays in use. Distances are computed in chunks to bound memory at large ``k``.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} vectors, got {n}")
    perm = torch.randperm(n, generator=generator, device="cpu")[:k].to(x.device)
    centroids = x[perm].clone()
    for _ in range(iters):
        assign = nearest_code(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1).unsqueeze(1)
        if empty.any():
            refill = torch.randint(0, n, (int(empty.sum()),), generator=generator, device="cpu")
            centroids[empty] = x[refill.to(x.device)]
    return centroids


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest codeword (squared L2) for each row of ``x`` ``(n, d)``; ``(n,)`` int64."""
    norms = (codebook * codebook).sum(1)
    out = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        # ||x||^2 is constant per row, so argmin(||c||^2 - 2 x.c) is the nearest code.
        out.append((norms - 2 * part @ codebook.T).argmin(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


class AlignedVQ(nn.Module):
    """Grouped/residual VQ between a down-projection (edge) and an up-projection (cloud)."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        c = config
        if c.groups * c.code_dim > c.dim:
            raise ValueError(f"groups * code_dim = {c.groups * c.code_dim} exceeds the feature dim {c.dim}")
        self.config = c
        self._rate_cache: tuple | None = None  # see _rate_tables
        self.down = nn.Linear(c.dim, c.groups * c.code_dim)
        self.up = nn.Linear(c.groups * c.code_dim, c.dim)
        self.codebooks = nn.Parameter(
            torch.randn(c.groups, c.stages, c.codebook_size, c.code_dim) * 0.02,
            # A rate-controlled quantizer keeps its codebooks: its ranking geometry and rank table,
            # the rate model its training prices codes with, stay exactly what the edge will use.
            requires_grad=c.ema_decay == 0.0 and not c.rate_lambda,
        )
        # Uniform quantizer range for per-token [mean, log-std]: rows (mean, log_std), cols (lo, hi).
        self.register_buffer("stats_range", torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))
        # Per-position centre (tokens, dim); all zeros when config.tokens == 0.
        self.register_buffer("token_mean", torch.zeros(max(c.tokens, 1), c.dim))
        # Entropy-coder tables: code (or rank) counts on a calibration set (zeros = not calibrated).
        self.register_buffer("freqs", torch.zeros(c.groups, c.stages, c.codebook_size, dtype=torch.int64))
        if c.rank_tokens:
            shape = (c.groups, c.stages, c.codebook_size, c.code_dim)
            self.register_buffer("rank_books", torch.zeros(shape, dtype=torch.int16))
            self.register_buffer(
                "rank_offsets", torch.zeros(c.rank_tokens, c.groups, c.stages, c.code_dim, dtype=torch.int16)
            )
        # 0 where a codeword is pinned to zero: code 0 of later stages when refinement is gated, of
        # the first stage when the background is suppressed.
        keep = torch.ones(c.groups, c.stages, c.codebook_size, 1)
        if c.refine_threshold:
            keep[:, 1:, 0] = 0
        if c.background_norm:
            keep[:, 0, 0] = 0
        self.register_buffer("keep", keep, persistent=False)
        # Training-only state; not saved (see _SAVED).
        self.register_buffer("usage", torch.zeros(c.groups, c.stages, c.codebook_size), persistent=False)
        if c.ema_decay:
            self.register_buffer(
                "ema_count", torch.ones(c.groups, c.stages, c.codebook_size), persistent=False
            )
            self.register_buffer("ema_sum", self.codebooks.detach().clone(), persistent=False)

    # ---- per-token statistics (block:k sites) -------------------------------------------------

    def standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split ``x`` into a unit-scale stream and quantized ``(batch, tokens, 2)`` stat levels."""
        if not self.config.stat_bits:
            return x, None
        mean = x.mean(-1, keepdim=True)
        std = (x - mean).pow(2).mean(-1, keepdim=True).add(_EPS).sqrt()
        levels = self._quantize_stats(torch.cat([mean, std.log()], -1))
        return (x - mean) / std, levels

    def _quantize_stats(self, stats: torch.Tensor) -> torch.Tensor:
        lo, hi = self.stats_range[:, 0], self.stats_range[:, 1]
        top = 2**self.config.stat_bits - 1
        return ((stats - lo) / (hi - lo) * top).round().clamp(0, top).long()

    def dequantize_stats(self, levels: torch.Tensor) -> torch.Tensor:
        """Levels ``(..., 2)`` -> float ``[mean, log_std]``."""
        lo, hi = self.stats_range[:, 0], self.stats_range[:, 1]
        return lo + levels.to(lo.dtype) / (2**self.config.stat_bits - 1) * (hi - lo)

    def _restore(self, x: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        if levels is None:
            return x
        stats = self.dequantize_stats(levels).to(x.dtype)
        return x * stats[..., 1:].exp() + stats[..., :1]

    # ---- codes -------------------------------------------------------------------------------

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.tokens:
            return self.token_mean[0].to(x.dtype)
        if x.shape[-2] != self.config.tokens:
            raise ValueError(f"expected {self.config.tokens} tokens per image, got {x.shape[-2]}")
        return self.token_mean.to(x.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Edge side: ``(batch, tokens, dim)`` -> ``(batch, tokens, groups, code_dim)``."""
        return self.down(x - self._centre(x)).unflatten(-1, (self.config.groups, self.config.code_dim))

    def _up(self, zq: torch.Tensor) -> torch.Tensor:
        """Cloud side: ``(batch, tokens, G * code_dim)`` -> ``(batch, tokens, dim)``."""
        out = self.up(zq)
        return out + self._centre(out)

    def _search(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual nearest-code search; returns indices ``(..., G, S)`` and per-stage residuals."""
        c = self.config
        flat = z.reshape(-1, c.groups, c.code_dim)
        books = self.books().detach().to(z.dtype)
        indices = torch.empty(flat.shape[0], c.groups, c.stages, dtype=torch.long, device=z.device)
        residuals = []
        residual = flat.detach()
        for s in range(c.stages):
            residuals.append(residual)
            nxt = torch.empty_like(residual)
            for g in range(c.groups):
                idx = self._gate(nearest_code(residual[:, g], books[g, s]), residual[:, g], s)
                indices[:, g, s] = idx
                nxt[:, g] = residual[:, g] - books[g, s, idx]
            residual = nxt
        return indices.reshape(*z.shape[:-2], c.groups, c.stages), residuals

    def _gate(self, idx: torch.Tensor, residual: torch.Tensor, stage: int) -> torch.Tensor:
        """The refinement gate: code 0 (zero) where a later stage's incoming residual ``(n, d)`` is
        already within ``refine_threshold``; ``idx`` unchanged otherwise."""
        if not (stage and self.config.refine_threshold):
            return idx
        return idx.masked_fill((residual * residual).sum(-1) <= self.config.refine_threshold, 0)

    def suppress(self, z: torch.Tensor) -> torch.Tensor:
        """What the edge quantizes of projected features ``z`` ``(..., G, d)``: the zero vector in
        place of every (token, group) within ``background_norm``, ``z`` itself otherwise."""
        if not self.config.background_norm:
            return z
        return z.masked_fill((z * z).sum(-1, keepdim=True) <= self.config.background_norm, 0.0)

    def books(self) -> torch.Tensor:
        """The codebooks ``(G, S, K, d)`` with pinned codewords zeroed (no gradient reaches them)."""
        pinned = self.config.refine_threshold or self.config.background_norm
        return self.codebooks * self.keep if pinned else self.codebooks

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Cloud side: indices ``(..., G, S)`` -> summed code vectors ``(..., G, code_dim)``."""
        g = torch.arange(self.config.groups, device=indices.device).view(-1, 1)
        s = torch.arange(self.config.stages, device=indices.device).view(1, -1)
        return self.books()[g, s, indices].sum(-2)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deterministic edge encode: ``(batch, tokens, dim)`` -> (indices, stat levels or None).

        A calibrated quantizer with a ``rate_lambda`` chooses indices for its ranked stream
        (``edge_client.rdo``, the edge's own numpy code); otherwise the nearest codes.
        """
        z, levels = self.standardize(x)
        z = self.suppress(self.project(z))
        if not self.rate_controlled:
            return self._search(z)[0], levels
        indices = rdo_search(
            z.detach().float().cpu().numpy(),
            self.books().detach().float().cpu().numpy(),
            self.ranking(),
            self._code_lengths(),
            self.config.rate_lambda,
            self.config.refine_threshold,
        )
        return torch.from_numpy(indices.astype(np.int64)).to(z.device), levels

    def decode(self, indices: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Cloud decode: indices ``(batch, tokens, G, S)`` (+ stat levels) -> ``(batch, tokens, dim)``."""
        return self.reconstruct(self.lookup(indices), levels)

    def reconstruct(self, zq: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Cloud side of any projected vectors ``(batch, tokens, G, code_dim)`` (summed codewords, or
        :meth:`project`'s own output for an unquantized reference) -> ``(batch, tokens, dim)``."""
        if self.config.stat_bits and levels is None:
            raise ValueError("this quantizer standardizes tokens: decode needs the per-token stat levels")
        return self._restore(self._up(zq.flatten(-2).to(self.up.weight.dtype)), levels)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Training pass with straight-through gradients; also valid (and deterministic) in eval."""
        c = self.config
        xs, levels = self.standardize(x)
        z = self.project(xs)
        indices, residuals = self._choose(xs, z)
        zq = self.lookup(indices)
        loss = c.commitment * F.mse_loss(z, zq.detach())
        if self.codebooks.requires_grad:
            # Codebook loss per stage: each stage's code should match the residual it was chosen for.
            flat_idx = indices.reshape(-1, c.groups, c.stages)
            groups = torch.arange(c.groups, device=z.device)
            books = self.books()
            for s, residual in enumerate(residuals):
                picked = books[groups, s, flat_idx[..., s]]  # (n, G, code_dim)
                loss = loss + F.mse_loss(picked, residual.to(picked.dtype))
        if self.training:
            self._track(indices, residuals)
        z_st = z + (zq.to(z.dtype) - z).detach()
        x_hat = self.reconstruct(z_st, levels)
        return QuantizerOutput(x_hat, indices, loss, levels)

    @property
    def rate_controlled(self) -> bool:
        """Whether indices are chosen by rate and distortion: a ``rate_lambda`` and its table."""
        return bool(self.config.rate_lambda and self.freqs.any())

    def _code_lengths(self) -> np.ndarray:
        return code_lengths(normalize_freqs(self.freqs.cpu().numpy()))

    def _choose(self, xs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward pass's indices for standardized features ``xs`` projected to ``z`` (and each
        stage's input residual, for the codebook loss): what the edge will send. A rate-controlled
        quantizer chooses them by rate and distortion on the training device
        (:mod:`models.rate_search`), projecting and searching in float32 as the edge does whatever
        the autocast around it, so the model learns to read the codes it will be served and its
        features are pulled towards cheap codewords; its codebooks are fixed, so it has no codebook
        loss and no residuals are returned. Otherwise the nearest codes of ``z``."""
        if not self.rate_controlled:
            return self._search(self.suppress(z))
        geometry, lengths = self._rate_tables(z.device)
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            indices = rdo_search_torch(
                self.suppress(self.project(xs.float())),
                self.books().detach().float(),
                geometry,
                lengths,
                self.config.rate_lambda,
                self.config.refine_threshold,
            )
        return indices, []

    def _rate_tables(self, device: torch.device) -> tuple[RankGeometry, torch.Tensor]:
        """The rank geometry and code lengths the training search prices codes with, rebuilt only
        when a table changes (calibration, loading, a move to another device: each bumps the
        tensors' version or storage), not on every step."""
        tables = (self.rank_books, self.rank_offsets, self.freqs)
        key = (device, *((t.data_ptr(), t._version) for t in tables))
        if self._rate_cache is None or self._rate_cache[0] != key:
            lengths = torch.from_numpy(self._code_lengths()).to(device)
            self._rate_cache = (key, RankGeometry(self.ranking(), device), lengths)
        return self._rate_cache[1], self._rate_cache[2]

    @torch.no_grad()
    def _track(self, indices: torch.Tensor, residuals: list[torch.Tensor]) -> None:
        """Usage counts for dead-code restart, and EMA codebook updates when configured."""
        c = self.config
        flat = indices.reshape(-1, c.groups, c.stages)
        for g in range(c.groups):
            for s in range(c.stages):
                counts = torch.bincount(flat[:, g, s], minlength=c.codebook_size).float()
                self.usage[g, s].mul_(0.99).add_(counts)
                if c.ema_decay and not c.rate_lambda:
                    sums = torch.zeros_like(self.ema_sum[g, s]).index_add_(
                        0, flat[:, g, s], residuals[s][:, g].float()
                    )
                    self.ema_count[g, s].mul_(c.ema_decay).add_(counts, alpha=1 - c.ema_decay)
                    self.ema_sum[g, s].mul_(c.ema_decay).add_(sums, alpha=1 - c.ema_decay)
                    n = self.ema_count[g, s]
                    smoothed = (n + _EPS) / (n.sum() + c.codebook_size * _EPS) * n.sum()
                    self.codebooks.data[g, s] = self.ema_sum[g, s] / smoothed.unsqueeze(1)

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, threshold: float = 1e-3) -> int:
        """Move codes used less than ``threshold`` onto random residuals of ``x`` ``(batch, tokens, dim)``.

        Returns how many codes were restarted. Call every few hundred steps during training. A
        rate-controlled quantizer's codebooks are fixed (rate pressure leaves codes unused on purpose).
        """
        c = self.config
        if c.rate_lambda:
            return 0
        xs, _ = self.standardize(x)
        _, residuals = self._search(self.suppress(self.project(xs)))
        residuals = [r.reshape(-1, c.groups, c.code_dim) for r in residuals]
        restarted = 0
        for g in range(c.groups):
            for s in range(c.stages):
                dead = ((self.usage[g, s] < threshold) & (self.keep[g, s, :, 0] > 0)).nonzero().flatten()
                if dead.numel() == 0:
                    continue
                pool = residuals[s][:, g]
                pick = torch.randint(0, pool.shape[0], (dead.numel(),), device=pool.device)
                self.codebooks.data[g, s, dead] = pool[pick].to(self.codebooks.dtype)
                self.usage[g, s, dead] = 1.0
                restarted += dead.numel()
        return restarted

    # ---- initialisation and calibration -----------------------------------------------------

    @torch.no_grad()
    def init_from_features(
        self, x: torch.Tensor, iters: int = 20, seed: int = 0, max_vectors: int = 200000
    ) -> None:
        """Position centres, PCA projections and per-stage k-means from features ``(images, tokens, dim)``."""
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        x = x.float()
        if c.stat_bits:
            mean = x.mean(-1, keepdim=True)
            logstd = (x - mean).pow(2).mean(-1, keepdim=True).add(_EPS).sqrt().log()
            stats = torch.cat([mean, logstd], -1).flatten(0, 1)[:50000].cpu()
            lo, hi = torch.quantile(stats, 0.001, dim=0), torch.quantile(stats, 0.999, dim=0)
            self.stats_range.copy_(torch.stack([lo, hi + _EPS], 1).to(self.stats_range))
            x, _ = self.standardize(x)
        if c.tokens:
            self.token_mean.copy_(x.mean(0))
        flat = (x - self._centre(x)).flatten(0, 1)
        flat = flat[torch.randperm(flat.shape[0], generator=gen)[:max_vectors].to(flat.device)]
        mu = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mu, full_matrices=False)
        basis = vh[: c.groups * c.code_dim]  # (G*d, dim), orthonormal rows
        self.down.weight.copy_(basis)
        self.down.bias.copy_(-basis @ mu)
        self.up.weight.copy_(basis.T)
        self.up.bias.copy_(mu)
        self._fit_stages(self.down(flat).unflatten(-1, (c.groups, c.code_dim)), 0, iters, gen)

    def _fit_stages(self, residual: torch.Tensor, first: int, iters: int, gen: torch.Generator) -> None:
        """k-means the codebooks of stages ``first..`` on projected vectors ``(n, G, d)``, in place;
        earlier stages are kept and only subtracted."""
        c = self.config
        kept = self.books().detach()
        for s in range(c.stages):
            for g in range(c.groups):
                part = residual[:, g]
                if s >= first:
                    self.codebooks.data[g, s] = self._kmeans_stage(part, s, iters, gen)
                book = self.codebooks.data[g, s] if s >= first else kept[g, s]
                residual[:, g] -= book[self._gate(nearest_code(part, book), part, s)]
        if c.ema_decay:
            self.ema_sum.copy_(self.codebooks.detach())
            self.ema_count.fill_(1.0)

    def _kmeans_stage(self, part: torch.Tensor, stage: int, iters: int, gen: torch.Generator) -> torch.Tensor:
        """One codebook ``(K, d)`` for the vectors ``part`` ``(n, d)`` entering ``stage``. A gated stage
        keeps code 0 at zero and clusters only the residuals it will refine (if there are enough)."""
        c = self.config
        if not (stage and c.refine_threshold):
            return kmeans(part, c.codebook_size, iters=iters, generator=gen)
        needy = part[(part * part).sum(-1) > c.refine_threshold]
        pool = needy if needy.shape[0] >= c.codebook_size else part
        rest = kmeans(pool, c.codebook_size - 1, iters=iters, generator=gen)
        return torch.cat([torch.zeros_like(rest[:1]), rest])

    @classmethod
    @torch.no_grad()
    def refined(
        cls,
        base: AlignedVQ,
        x: torch.Tensor,
        *,
        refine_threshold: float,
        rank_tokens: int = 0,
        stages: int = 2,
        iters: int = 20,
        seed: int = 0,
        max_vectors: int = 200000,
    ) -> AlignedVQ:
        """A variable-rate quantizer of ``stages`` whose first stages are ``base``'s, kept exactly.

        Each added stage is k-means on the residuals of features ``x`` ``(images, tokens, dim)``
        that the stages before it leave above ``refine_threshold``; everything else (projections,
        centres, statistics range) is ``base``'s. A gated ``base`` keeps its threshold (one gate
        rule serves every later stage); a third stage helps where the second leaves object tokens
        imprecise (llava-mini-scenes). Uncalibrated: call :meth:`calibrate` next.
        """
        have = base.config.stages
        if stages <= have:
            raise ValueError(f"refined() adds stages to a quantizer, got {have} -> {stages}")
        if have > 1 and refine_threshold != base.config.refine_threshold:
            raise ValueError(
                f"a gated {have}-stage quantizer keeps its threshold {base.config.refine_threshold},"
                f" got {refine_threshold}"
            )
        config = replace(
            base.config, stages=stages, refine_threshold=refine_threshold, rank_tokens=rank_tokens
        )
        module = cls(config).to(base.codebooks.device)
        state = {
            k: v
            for k, v in base.state_dict().items()
            if k not in ("codebooks", "freqs", "rank_books", "rank_offsets")
        }
        module.load_state_dict(state, strict=False)
        module.codebooks.data[:, :have] = base.codebooks.data
        gen = torch.Generator().manual_seed(seed)
        xs, _ = module.standardize(x.float())
        z = module.project(xs).flatten(0, 1)
        z = z[torch.randperm(z.shape[0], generator=gen)[:max_vectors].to(z.device)]
        module._fit_stages(z.clone(), have, iters, gen)
        return module.eval()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, passes: int = 2) -> None:
        """Entropy-coder tables (and ranking geometry) from calibration features ``(images, tokens,
        dim)``: :meth:`calibrate_freqs` on the nearest codes. A ``rate_lambda`` quantizer's choices
        follow its own table, so it then re-encodes ``passes`` times and recounts the ranks it
        would send (geometry kept)."""
        self.freqs.zero_()
        self.calibrate_freqs(self.encode(x)[0])
        for _ in range(passes if self.config.rate_lambda else 0):
            self._count(self._rank_symbols(self.encode(x)[0]))

    @torch.no_grad()
    def calibrate_freqs(self, indices: torch.Tensor) -> None:
        """Entropy-coder tables from calibration indices ``(images, tokens, G, S)``; part of the hash.

        A ranked quantizer first fixes its ranking geometry (each codebook scaled and rounded to the
        largest integers that keep distances exact, ``edge_client.ranking.max_book``, and each
        position's median step from its neighbours' codewords), then counts ranks.
        """
        if self.config.rank_tokens:
            self._calibrate_ranking(indices)
            indices = self._rank_symbols(indices)
        self._count(indices)

    def _count(self, symbols: torch.Tensor) -> None:
        c = self.config
        flat = symbols.reshape(-1, c.groups, c.stages).cpu()
        for g in range(c.groups):
            for s in range(c.stages):
                self.freqs[g, s] = torch.bincount(flat[:, g, s], minlength=c.codebook_size).to(self.freqs)

    def _rank_symbols(self, indices: torch.Tensor) -> torch.Tensor:
        """Neighbour ranks ``(images, T, G, S)`` of calibration indices, under the current geometry."""
        c = self.config
        ranking = self.ranking()
        images = indices.reshape(-1, c.rank_tokens, c.groups, c.stages).long().cpu().numpy()
        return torch.from_numpy(np.stack([ranking.ranks(image) for image in images]))

    def ranking(self) -> NeighbourRanks:
        """The rank transform of a calibrated ranked quantizer (what the edge bundle carries)."""
        return NeighbourRanks(self.rank_books.cpu().numpy(), self.rank_offsets.cpu().numpy())

    def _calibrate_ranking(self, indices: torch.Tensor) -> None:
        """Set ``rank_books``/``rank_offsets`` from calibration indices ``(images, T, G, S)``."""
        c = self.config
        books = self.books().detach().float().cpu()
        # One scale per (group, stage) codebook, to the largest integers that keep float32
        # distances exact: a refinement stage's small codes would collapse under the first's scale.
        bound = max_book(c.code_dim)
        peak = books.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        self.rank_books.copy_(torch.round(books * (bound / peak)).clamp(-bound, bound).to(torch.int16))
        idx = indices.reshape(-1, c.rank_tokens, c.groups, c.stages).long().cpu()
        g = torch.arange(c.groups).view(-1, 1)
        s = torch.arange(c.stages).view(1, -1)
        # (images, G, S, T, d): tokens next to the vector axis, as twice_base expects
        vectors = self.rank_books.long().cpu()[g, s, idx].permute(0, 2, 3, 1, 4).numpy()
        steps = np.median(2 * vectors - twice_base(vectors, neighbours(c.rank_tokens)), axis=0)
        offsets = torch.from_numpy(np.rint(steps)).permute(2, 0, 1, 3)  # (T, G, S, d)
        self.rank_offsets.copy_(offsets.clamp(-2 * bound, 2 * bound).to(torch.int16))

    # ---- persistence ----------------------------------------------------------------------------

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        return {
            k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()
        }

    def content_hash(self) -> str:
        """sha256 over the config and every saved tensor: the ``codebook_hash`` on the wire."""
        return _content_hash(self.config, self._saved_tensors())

    def save(self, path: str | Path) -> str:
        """Write safetensors with config + hash in the metadata; returns the hash."""
        tensors = self._saved_tensors()
        digest = _content_hash(self.config, tensors)
        meta = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "config": self.config.to_json(),
            "hash": digest,
        }
        save_file(tensors, str(path), metadata=meta)
        return digest

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AlignedVQ:
        """Load and verify; raises :class:`QuantizerFileError` on any mismatch."""
        path = Path(path)
        if not path.is_file():
            raise QuantizerFileError(f"quantizer file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
                raise QuantizerFileError(
                    f"{path}: expected format {FORMAT} v{FORMAT_VERSION}, "
                    f"got {meta.get('format')} v{meta.get('version')}"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        config = QuantizerConfig.from_dict(json.loads(meta["config"]))
        module = cls(config)
        expected = module._saved_tensors()
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or unexpected:
            raise QuantizerFileError(
                f"{path}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise QuantizerFileError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"config expects {tuple(expected[name].shape)}"
                )
        digest = _content_hash(config, tensors)
        if digest != meta.get("hash"):
            raise QuantizerFileError(
                f"{path}: content hash {digest[:16]} does not match recorded {meta.get('hash', '')[:16]}"
            )
        module.load_state_dict(tensors, strict=True)
        if config.ema_decay:
            module.ema_sum.copy_(module.codebooks.detach())
        return module.to(map_location).eval()


def _content_hash(config: QuantizerConfig, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(config.to_json().encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
