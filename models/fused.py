"""A fused prefill/decode path for the Llama language model of a LLaVA, for GPU serving.

Profiling the cloud half of LLaVA-1.5-7B on an H200 (benchmarks/results/gpu_worker.json) showed
the GEMMs taking only half of a batch's time: the rest went to Hugging Face's eager elementwise
kernels (fp32 RMSNorm, rotary embedding through ``cat``, SiLU times up-projection, residual adds),
and ``torch.compile`` of HF's decoder layers recompiled per layer index and fell back to eager.
Here two pure functions run the parts of a decoder layer around attention on tensors passed in
(the layer's weights included), so one compiled graph of each serves all layers; q/k/v and
gate/up are single GEMMs over concatenated weights. The math is HF's, in the same order and
dtypes; a test checks it returns ``generate``'s tokens. Vision tower, projector and embeddings
stay Hugging Face modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention_inputs(
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    ln1: torch.Tensor,
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm, one q/k/v GEMM and the rotary embedding: ``(batch, heads, new, head_dim)`` each."""
    batch, new, _ = h.shape
    head_dim = qkv.shape[0] // (heads + 2 * kv_heads)
    q, k, v = F.linear(_rms_norm(h, ln1, eps), qkv).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1
    )
    q = _rotate(q.view(batch, new, heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(batch, new, kv_heads, head_dim).transpose(1, 2), cos, sin)
    return q, k, v.view(batch, new, kv_heads, head_dim).transpose(1, 2)


def _after_attention(
    h: torch.Tensor,
    attn: torch.Tensor,
    wo: torch.Tensor,
    ln2: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Output projection and residual, RMSNorm, one gate/up GEMM, SiLU-gated MLP and residual."""
    batch, heads, new, head_dim = attn.shape
    h = h + F.linear(attn.transpose(1, 2).reshape(batch, new, heads * head_dim), wo)
    gate, up = F.linear(_rms_norm(h, ln2, eps), gate_up).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, down)


class FusedLlama:
    """``prefill`` / ``step`` over a LLaVA's language model (see :class:`models.decode.HFEngine`)."""

    def __init__(self, model: nn.Module, compile: bool = True) -> None:
        inner = getattr(model, "model", model)
        lm = inner.language_model
        config = model.config.text_config
        self.embed, self.norm, self.lm_head, self.rotary = (
            model.get_input_embeddings(),
            lm.norm,
            model.lm_head,
            lm.rotary_emb,
        )
        self.heads, self.kv_heads, self.eps = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.rms_norm_eps,
        )
        self.weights = [
            (
                layer.input_layernorm.weight,
                torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ]
                ),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                layer.mlp.down_proj.weight,
            )
            for layer in lm.layers
        ]
        # Attention itself stays eager: compiled with a padding mask, it fell back to a kernel that
        # materializes the score matrix (measured: more memory, no speed-up at batch 64).
        wrap = (lambda fn: torch.compile(fn, dynamic=True)) if compile else (lambda fn: fn)
        self.attention_inputs, self.after_attention = wrap(_attention_inputs), wrap(_after_attention)

    def _run(self, h, positions, mask, past):
        cos, sin = (t.unsqueeze(1) for t in self.rotary(h, positions))
        cache = []
        for i, (ln1, qkv, wo, ln2, gate_up, down) in enumerate(self.weights):
            q, k, v = self.attention_inputs(h, cos, sin, ln1, qkv, self.heads, self.kv_heads, self.eps)
            if past is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            gqa = self.kv_heads != self.heads
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            h = self.after_attention(h, attn, wo, ln2, gate_up, down, self.eps)
            cache.append((k, v))
        return self.lm_head(self.norm(h[:, -1:])), cache

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """Causal attention over real tokens; a padding query attends to itself (no empty rows)."""
        n = embeds.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        mask = causal & attention_mask.bool()[:, None, None, :]
        mask |= torch.eye(n, dtype=torch.bool, device=embeds.device)
        return self._run(embeds, positions, mask, None)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache):
        """One new token per row against the cache; every real key is visible."""
        return self._run(self.embed(tokens), positions, attention_mask.bool()[:, None, None, :], cache)
