"""A conversation's GPU work as the worker does it, shared by the follow-up benchmarks: the shared
image prefix, question tails, and a server that computes first questions and follow-ups from its
prefix cache (``Runner.prefixes_of`` + ``Runner.run`` on tensors, without the per-request CPU work)."""

from __future__ import annotations

import numpy as np
import torch

from gateway.worker.prefix_cache import PrefixCache
from models.generation import PrefixKV
from models.quantizer import AlignedVQ
from models.split import CloudHalf, vision_tokens

__all__ = ["NEW_TOKENS", "TEMPLATE_TOKENS", "Server", "prefix_entry_bytes", "prompt_ids"]

NEW_TOKENS = 3
TEMPLATE_TOKENS = 5  # "USER:" before the image in the LLaVA-1.5 template


class Server:
    """The worker's compute for one batch (``Runner.prefixes_of`` + ``Runner.run``), on tensors."""

    def __init__(self, cloud: CloudHalf, quantizer: AlignedVQ, prefix_ids: torch.Tensor, budget: int) -> None:
        self.cloud, self.quantizer, self.prefix_ids = cloud, quantizer, prefix_ids
        self.cache: PrefixCache[PrefixKV] = PrefixCache(budget)

    def first(self, keys: list[bytes], indices: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, **kw):
        """New images: their prefixes computed, each row copied into the cache."""
        prefix = self.cloud.prefix(self.quantizer.decode(indices), self.prefix_ids)
        for key, row in zip(keys, prefix.rows(), strict=True):
            self.cache.put(key, row)
        return self.cloud.generate_after(prefix, ids, mask, **kw)

    def followup(self, keys: list[bytes], ids: torch.Tensor, mask: torch.Tensor, **kw):
        """Known images: their prefixes from the cache."""
        rows = [self.cache.get(key) for key in keys]
        if any(row is None for row in rows):
            raise LookupError("a follow-up's image is not in the prefix cache (budget too small)")
        prefix = PrefixKV.stack([row for row in rows if row is not None])
        return self.cloud.generate_after(prefix, ids, mask, **kw)


def prompt_ids(
    config, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared prefix ``(prefix,)``, and left-padded tails ``(batch, n)`` with their mask."""
    text = config.text_config
    words = lambda n: rng.integers(3, min(text.vocab_size, config.image_token_id), size=n).tolist()  # noqa: E731
    image = [config.image_token_id] * (vision_tokens(config.vision_config) - 1)
    prefix = torch.tensor([text.bos_token_id, *words(TEMPLATE_TOKENS), *image])
    tails = [words(int(rng.integers(6, 15)) + 5) for _ in range(batch)]
    width = max(map(len, tails))
    ids = torch.tensor([[text.pad_token_id] * (width - len(t)) + t for t in tails])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails])
    return prefix, ids, mask


def prefix_entry_bytes(model: torch.nn.Module, prefix: torch.Tensor) -> int:
    """Bytes of one image's prefix-cache entry: the keys and values of every layer over ``prefix``."""
    text = model.config.text_config
    entry = 2 * text.num_hidden_layers * len(prefix) * text.num_key_value_heads * text.head_dim
    return entry * next(model.parameters()).element_size()
