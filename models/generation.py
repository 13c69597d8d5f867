"""Lean greedy generation in two prefills: what the worker runs instead of ``generate()``.

Every prompt starts with the same prefix for one image (BOS, template text, the image tokens;
:mod:`models.prompt`), so the worker prefills in two parts: the prefix alone (:meth:`prefix`,
whose keys and values it may keep per image, :class:`PrefixKV`), then the rest of the prompt
over those keys and values, then one token per step with the KV cache. A follow-up about a cached
image runs only the last two. Cached or not, the computation is the same, so are the answers.

Hugging Face ``generate`` spends a short answer's budget on machinery we do not need (logits
processors, stopping criteria, full-sequence logits on some paths). This loop keeps only what
greedy decoding means: the logits of each row's last position alone, the argmax fed back with the
KV cache, left padding handled by explicit position ids exactly as ``generate`` derives them.
Tests check it returns the same tokens as ``generate`` on the whole prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

__all__ = ["HFEngine", "PrefixKV", "greedy_decode", "left_padded_positions"]


def _cache_argument(model: nn.Module) -> str:
    """``cache`` from transformers 5.2x on, ``past_key_values`` before (the worker runs on both)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (``generate``'s rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of prompt prefixes: ``states`` ``(layers, 2, batch, tokens, kv_heads, head_dim)``.

    One tensor, so one request's row is one block of memory in the worker's cache and a batch is
    stacked with one copy.
    """

    states: torch.Tensor

    @property
    def batch(self) -> int:
        return self.states.shape[2]

    @property
    def tokens(self) -> int:
        return self.states.shape[3]

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def rows(self) -> list[PrefixKV]:
        """One batch-1 copy per row (a view would keep the whole batch's memory alive)."""
        return [PrefixKV(self.states[:, :, i : i + 1].clone()) for i in range(self.batch)]

    @classmethod
    def stack(cls, parts: list[PrefixKV]) -> PrefixKV:
        return parts[0] if len(parts) == 1 else cls(torch.cat([p.states for p in parts], dim=2))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values, ``(batch, tokens, kv_heads, head_dim)`` each."""
        return self.states[index, 0], self.states[index, 1]


class HFEngine:
    """``prefix`` / ``prefill`` / ``step`` through the Hugging Face model itself (its KV cache, its
    kernels). :class:`models.fused.FusedLlama` has the same methods."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache_arg = _cache_argument(model)

    def prefix(self, embeds: torch.Tensor) -> PrefixKV:
        """Prefill ``embeds`` ``(batch, tokens, dim)`` (no padding) and keep its keys and values."""
        _, cache = self._forward(inputs_embeds=embeds)
        pairs = [(layer.keys, layer.values) for layer in cache.layers]  # (batch, kv_heads, tokens, head_dim)
        return PrefixKV(torch.stack([torch.stack(pair) for pair in pairs]).transpose(-3, -2).contiguous())

    def prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        prefix: PrefixKV | None = None,
        new_tokens: int = 0,
    ):
        """Last-position logits and the cache for ``embeds`` ``(batch, n, dim)`` after ``prefix``;
        ``attention_mask`` covers the prefix too, ``positions`` only ``embeds``. ``new_tokens``
        (the steps to come) matters to engines that allocate their cache up front, not to this one."""
        cache = None
        if prefix is not None:
            cache = DynamicCache()
            for i in range(prefix.states.shape[0]):
                keys, values = prefix.layer(i)
                cache.update(keys.transpose(1, 2), values.transpose(1, 2), i)
        return self._forward(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            **{self.cache_arg: cache},
        )

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache):
        return self._forward(
            input_ids=tokens, attention_mask=attention_mask, position_ids=positions, **{self.cache_arg: cache}
        )

    def _forward(self, **inputs):
        """Last-position logits and the updated cache."""
        out = self.model(use_cache=True, logits_to_keep=1, **inputs)
        return out.logits, getattr(out, self.cache_arg)


@torch.no_grad()
def greedy_decode(
    engine: HFEngine,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    prefix: PrefixKV | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """New tokens ``(batch, <= max_new_tokens)``; rows past EOS are filled with ``pad_token_id``.

    ``inputs_embeds`` and ``attention_mask`` ``(batch, n)`` are left-padded and follow ``prefix``
    (whose rows have no padding) when one is given. ``on_token`` sees each step's tokens
    ``(batch,)`` as they come (the worker streams text with it). ``engine`` is :class:`HFEngine`
    or :class:`models.fused.FusedLlama`. Stops early once every row has produced EOS (one host
    sync per step, which a short answer can afford); with ``eos_token_id=None`` it always runs
    ``max_new_tokens`` steps.
    """
    if prefix is not None:
        attention_mask = torch.cat([attention_mask.new_ones(prefix.batch, prefix.tokens), attention_mask], 1)
    # Positions count real tokens from each row's first one, the prefix's included.
    positions = left_padded_positions(attention_mask)[:, attention_mask.shape[1] - inputs_embeds.shape[1] :]
    logits, cache = engine.prefill(inputs_embeds, attention_mask, positions, prefix, max_new_tokens)
    token = logits[:, -1].argmax(-1)
    tokens = [token]
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=token.device).flatten()
    finished = torch.isin(token, eos)
    position = positions[:, -1:]
    if on_token is not None:
        on_token(token)
    for _ in range(1, max_new_tokens):
        if eos.numel() and bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position = position + 1
        logits, cache = engine.step(token[:, None], attention_mask, position, cache)
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if on_token is not None:
            on_token(token)
    return torch.stack(tokens, 1)
