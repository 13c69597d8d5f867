"""Rate-distortion optimised index choice on the training device, for quantization-aware training.

The edge chooses each index of a ranked stream by ``|z - c|^2 + lambda * bits(rank(c))``
(``edge_client.rdo``, numpy, bit-exact with the cloud's rank decoder). Training a model to read
those choices needs them on every step, for a whole batch, on the GPU: the numpy search takes
~1.5 s per 256 scenes images on two CPU cores, twenty times a QAT step. This is the same rule,
level by level in the rank transform's decode order, over the same candidates (the nearest
codeword, the ``LOW_RANKS`` cheapest and, in a gated stage, code 0), in torch. Rank distances are
taken in float64, so they are the exact integers the edge computes; squared errors are float32 as
on the edge (the caller keeps autocast off: bf16 squared errors move about one choice in 500).
On an exact tie in cost the two may pick different codewords (numpy keeps ``argpartition``'s
order, this the rank order). It serves training only: what is sent and scored
(``AlignedVQ.encode``) stays the edge's own numpy code, so a rounding difference here can cost a
training step a little accuracy but can never desynchronise a stream.
"""

from __future__ import annotations

import torch

from edge_client.ranking import NeighbourRanks, neighbour_weights
from edge_client.rdo import LOW_RANKS

__all__ = ["RankGeometry", "rdo_search_torch"]


class RankGeometry:
    """The rank transform's tables of one quantizer as tensors on the training device (built once
    per table state by the caller: they are fixed while a rate-controlled quantizer trains)."""

    def __init__(self, ranking: NeighbourRanks, device: torch.device) -> None:
        self.books = torch.from_numpy(ranking.books).to(device, torch.float64)  # (G, S, K, d)
        self.offsets = torch.from_numpy(ranking.offsets).to(device, torch.float64)  # (T, G, S, d)
        self.norms = (self.books * self.books).sum(-1)  # (G, S, K)
        self.weights = torch.from_numpy(neighbour_weights(ranking.nbrs)).to(device, torch.float64)
        self.nbrs = torch.from_numpy(ranking.nbrs).to(device).clamp(min=0)  # (T, 2); weight 0: none
        self.levels = [torch.from_numpy(level).to(device) for level in ranking.levels]

    def keys(self, tokens: torch.Tensor, chosen: torch.Tensor, g: int, s: int) -> torch.Tensor:
        """Sort keys ``(N * n, K)`` of the ``tokens`` ``(n,)`` given the indices chosen so far
        ``chosen`` ``(N, T)``: ``NeighbourRanks.keys`` of its distances, unique per row."""
        picked = self.books[g, s][chosen[:, self.nbrs[tokens]]]  # (N, n, 2, d)
        twice = self.offsets[tokens, g, s] + (picked * self.weights[tokens, :, None]).sum(-2)
        dist = self.norms[g, s] - twice.reshape(-1, twice.shape[-1]) @ self.books[g, s].T
        size = dist.shape[-1]
        return dist.long() * size + torch.arange(size, device=dist.device)


@torch.no_grad()
def rdo_search_torch(
    z: torch.Tensor,
    books: torch.Tensor,
    geo: RankGeometry,
    lengths: torch.Tensor,
    rate_lambda: float,
    refine_threshold: float = 0.0,
) -> torch.Tensor:
    """Projected features ``z`` ``(N, T, G, d)`` -> indices ``(N, T, G, S)`` int64, as
    ``edge_client.rdo.rdo_search`` chooses them; ``books`` ``(G, S, K, d)`` as the cloud sums them,
    ``geo`` their rank transform on ``z``'s device, ``lengths`` ``(G, S, K)`` bits per rank."""
    tokens = geo.offsets.shape[0]
    if z.ndim != 4 or z.shape[1] != tokens or z.shape[2:] != (books.shape[0], books.shape[3]):
        raise ValueError(
            f"expected features (N, {tokens}, {books.shape[0]}, {books.shape[3]}), got {tuple(z.shape)}"
        )
    z, books = z.float(), books.float()
    norms = (books * books).sum(-1)
    images, _, groups, dim = z.shape
    stages, size = books.shape[1:3]
    low = min(LOW_RANKS, size)
    chosen = torch.zeros(images, z.shape[1], groups, stages, dtype=torch.long, device=z.device)
    for g in range(groups):
        for tokens in geo.levels:
            residual = z[:, tokens, g].reshape(-1, dim)
            for s in range(stages):
                gated = bool(s and refine_threshold)
                keys = geo.keys(tokens, chosen[..., g, s], g, s)  # (m, K)
                cheapest = keys.topk(low, dim=-1, largest=False).indices  # sorted: rank = position
                dist = norms[g, s] - 2 * residual @ books[g, s].T
                nearest = dist.argmin(-1, keepdim=True)
                zero = [torch.zeros_like(nearest)] if gated else []
                candidates = torch.cat([nearest, cheapest, *zero], -1)
                # The nearest codeword and code 0 may lie outside the cheapest: count their ranks.
                ranks = torch.cat(
                    [
                        (keys < keys.gather(-1, nearest)).sum(-1, keepdim=True),
                        torch.arange(low, device=z.device).expand_as(cheapest),
                        *[(keys < keys.gather(-1, c)).sum(-1, keepdim=True) for c in zero],
                    ],
                    -1,
                )
                cost = dist.gather(-1, candidates) + rate_lambda * lengths[g, s][ranks]
                pick = candidates.gather(-1, cost.argmin(-1, keepdim=True))[:, 0]
                if gated:  # within the threshold a gated stage sends code 0 outright
                    pick = pick.masked_fill((residual * residual).sum(-1) <= refine_threshold, 0)
                chosen[:, tokens, g, s] = pick.view(images, -1)
                residual = residual - books[g, s][pick]
    return chosen
