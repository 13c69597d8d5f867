"""Lean greedy decoding for short answers: what the worker runs instead of ``generate()``.

VQA answers are a few tokens long, so serving cost is one prefill over ~600 positions plus a
couple of one-token steps. Hugging Face ``generate`` spends that budget on machinery we do not
need (logits processors, stopping criteria, full-sequence logits on some paths). This loop keeps
only what greedy decoding means: prefill once with the logits of the last position alone, then
feed back the argmax with the KV cache, left padding handled by explicit position ids exactly as
``generate`` derives them. A test checks it returns the same tokens as ``generate``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _cache_argument(model: nn.Module) -> str:
    """``cache`` from transformers 5.2x on, ``past_key_values`` before (the worker runs on both)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (``generate``'s rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class HFEngine:
    """``prefill`` / ``step`` through the Hugging Face model itself (its KV cache, its kernels)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache_arg = _cache_argument(model)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        return self._forward(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)

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
) -> torch.Tensor:
    """New tokens ``(batch, <= max_new_tokens)``; rows past EOS are filled with ``pad_token_id``.

    ``engine`` is :class:`HFEngine` or :class:`models.fused.FusedLlama` (same two methods). Stops
    early once every row has produced EOS (one host sync per step, which a few-token answer can
    afford); with ``eos_token_id=None`` it always runs ``max_new_tokens`` steps.
    """
    positions = left_padded_positions(attention_mask)
    logits, cache = engine.prefill(inputs_embeds, attention_mask, positions)
    token = logits[:, -1].argmax(-1)
    tokens = [token]
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=token.device).flatten()
    finished = torch.isin(token, eos)
    position = positions[:, -1:]
    for _ in range(1, max_new_tokens):
        if eos.numel() and bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position = position + 1
        logits, cache = engine.step(token[:, None], attention_mask, position, cache)
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
    return torch.stack(tokens, 1)
