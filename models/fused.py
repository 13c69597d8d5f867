"""A fused prefill/decode path for the Llama language model of a LLaVA, for GPU serving.

Profiling the cloud half of LLaVA-1.5-7B on an H200 (benchmarks/results/raw/, the fused v1 and v2
runs) showed the GEMMs taking only half to two thirds of a batch's time: the rest went to eager
elementwise kernels, to attention over a padding mask (no flash kernel applies), to ``torch.cat``
growing the KV cache at every step, and at batch 1 to Python launching ~10 kernels per layer and
step. Here (benchmarks/results/gpu_worker.json: GEMMs now ~80 % of a batch-64 call):

- Three pure functions run the parts of a decoder layer around attention on tensors passed in
  (the layer's weights included), so one compiled graph of each serves all layers; q/k/v and
  gate/up are single GEMMs. Activations stay ``(batch, tokens, heads, head_dim)``, the layout the
  attention kernels read and write, so no transpose is ever materialised.
- The weights are not duplicated: each layer's q/k/v (and gate/up) weights are concatenated once
  and the Hugging Face ``nn.Linear`` modules get row views of that one tensor as their parameters,
  so the model itself still runs (the benchmark's baseline, :class:`models.generation.HFEngine`) on
  the same memory. Such a model should not be saved afterwards (safetensors refuses shared
  storage); it is a serving-only change.
- Prefill moves each left-padded row's real tokens to the front (positions ``0..len-1`` on every
  row, so padding trails and causal attention never reaches it) and runs causal attention with
  no mask, so flash-type kernels apply. The logits come from each row's last real token; the last
  layer's output projection and MLP run on those rows alone.
- A static KV cache, ``(batch, capacity, kv_heads, head_dim)`` per layer for K and for V, written
  in place: prefill fills slots ``0..n-1``, each step scatters a row's new K/V at that row's own
  position and attends to slots ``<= position`` (slots a shorter row left to padding are masked,
  then overwritten). ``capacity`` is the prompt width plus the steps to come (at least
  ``reserve``) rounded up to 64 slots, so prompts of similar length share buffers and a decode
  never has to grow it (growing drops every CUDA graph).
- After a prompt prefix whose keys and values were kept (:class:`models.generation.PrefixKV`, the
  worker's prefix cache), they are copied into the first slots and the rest of the prompt is
  prefilled over them with a bottom-right causal mask.
- Attention kernels are chosen by measurement (:func:`_attention`).
- On CUDA each decode step is a CUDA graph, captured per ``(batch, capacity)`` on first use and
  replayed afterwards, and so is the prefill of small batches (padded to a multiple of 16 tokens),
  where Python, not the GPU, set the pace. All graphs and caches share one set of buffers (one
  batch runs at a time), sized for the largest batch seen; :meth:`FusedLlama.release` gives them
  back. On CPU the same code runs eagerly.

The math is Hugging Face's, in the same order and dtypes; tests check that greedy decoding
returns ``generate``'s tokens exactly (fp32, CPU) for padded batches and for batch 1. Vision
tower, projector and embeddings stay Hugging Face modules; :class:`CudaGraphed` can replay the
vision tower too. ``FusedLlama(model, fp8=True)`` (off by default, lossy) runs the linears as
row-wise scaled FP8 GEMMs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .generation import PrefixKV, left_padded_positions

SLOT_ROUNDING = 64  # cache capacity is a multiple of this: similar prompt lengths share a graph
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
PREFILL_ROUNDING = 16  # a graphed prefill pads prompts to a multiple of this (more left padding)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _linear(x: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``F.linear``, or for an ``(e4m3 weight, (1, out) scale)`` pair a row-wise scaled FP8 GEMM:
    each token is scaled by its own absolute maximum (as vLLM's dynamic per-token FP8 does)."""
    if not isinstance(weight, tuple):
        return F.linear(x, weight)
    quantized, weight_scale = weight
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    out = torch._scaled_mm(
        (rows / scale).to(torch.float8_e4m3fn),
        quantized.t(),
        scale_a=scale,
        scale_b=weight_scale,
        out_dtype=x.dtype,
    )
    return out.view(*x.shape[:-1], -1)


@torch.no_grad()  # else autograd keeps the fp32 copies of every weight alive
def _fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` weight -> e4m3 weight and its per-output-row scale ``(1, out)`` (fp32)."""
    scale = weight.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale.t().contiguous()


def _concatenated(linears: list[nn.Linear]) -> torch.Tensor:
    """One ``(sum of out_features, in_features)`` weight for linears that share their input.

    Each linear's parameter becomes a row view of it, so the weights exist once. A second call on
    the same linears finds them already adjacent in one storage and returns that tensor again.
    """
    first = linears[0].weight
    rows = sum(m.weight.shape[0] for m in linears)
    offsets = [m.weight.storage_offset() for m in linears]
    expected = [
        first.storage_offset() + sum(m.weight.numel() for m in linears[:i]) for i in range(len(linears))
    ]
    shared = all(m.weight.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for m in linears)
    if shared and offsets == expected and all(m.weight.is_contiguous() for m in linears):
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[start : start + n], requires_grad=m.weight.requires_grad)
            start += n
    return weight


@dataclass
class StaticCache:
    """Per-layer K/V buffers ``(batch, capacity, kv_heads, head_dim)``, written in place.

    ``length``: slots that may hold data (the prompt width plus the steps taken), host-side, so
    checking the capacity costs no device sync. Valid until the engine's next ``prefill``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class _Graph:
    """A captured call: copy new inputs into ``inputs``, replay ``graph``, read ``output``."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class FusedLlama:
    """``prefill`` / ``step`` over a LLaVA's language model (see :class:`models.generation.HFEngine`).

    ``compile``: ``torch.compile`` the per-layer functions (a few compiles per process: the first
    shapes, then batch and length as symbols). ``cuda_graphs``: replay decode steps as
    CUDA graphs (default: when the model is on CUDA), and prefills of up to ``prefill_graph_batch``
    rows too (there Python, not the GPU, sets the pace). ``reserve``: the fewest decode slots
    allocated beyond the prompt (more are added if a decode runs longer). ``fp8``: the language model's
    linears as row-wise scaled e4m3 GEMMs (Hopper/Ada; off by default: not exact, and it keeps an
    FP8 copy of those weights beside the bf16 ones).
    """

    def __init__(
        self,
        model: nn.Module,
        compile: bool = True,
        cuda_graphs: bool | None = None,
        reserve: int = 16,
        prefill_graph_batch: int = 8,
        fp8: bool = False,
    ) -> None:
        inner = getattr(model, "model", model)
        lm = inner.language_model
        config = model.config.text_config
        self.embed, self.norm, self.lm_head, self.rotary = (
            model.get_input_embeddings(),
            lm.norm,
            model.lm_head,
            lm.rotary_emb,
        )
        heads, kv_heads, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
        self.gqa = heads != kv_heads
        self.weights = [
            (
                layer.input_layernorm.weight,
                _concatenated([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                _concatenated([layer.mlp.gate_proj, layer.mlp.up_proj]),
                layer.mlp.down_proj.weight,
            )
            for layer in lm.layers
        ]
        first = self.weights[0][1]
        if fp8:
            if first.device.type != "cuda" or torch.cuda.get_device_capability(first.device) < (8, 9):
                raise ValueError(
                    f"fp8=True needs a CUDA GPU of compute capability >= 8.9, got {first.device}"
                )
            # An e4m3 copy beside the bf16 weights, which the HF modules (and norms) still use.
            self.weights = [
                (ln1, _fp8(qkv), _fp8(wo), ln2, _fp8(gate_up), _fp8(down))
                for ln1, qkv, wo, ln2, gate_up, down in self.weights
            ]
        self.kv_heads, self.head_dim = kv_heads, first.shape[0] // (heads + 2 * kv_heads)
        self.device, self.dtype = first.device, first.dtype
        self.reserve, self.prefill_graph_batch = reserve, prefill_graph_batch
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs

        # Closures: heads and eps are constants to dynamo, not symbolic ints.
        def attention_inputs(h, cos, sin, ln1, qkv):
            """RMSNorm, one q/k/v GEMM, rotary: ``(batch, new, heads, head_dim)`` each."""
            batch, new, _ = h.shape
            q, k, v = (
                _linear(_rms_norm(h, ln1, eps), qkv)
                .view(batch, new, heads + 2 * kv_heads, -1)
                .split([heads, kv_heads, kv_heads], dim=2)
            )
            return _rotate(q, cos, sin), _rotate(k, cos, sin), v

        def prefill_inputs(h, cos, sin, ln1, qkv, keys, values):
            """:func:`attention_inputs` writing K/V straight into cache slots ``0..new-1``."""
            q, k, v = attention_inputs(h, cos, sin, ln1, qkv)
            new = h.shape[1]
            keys[:, :new] = k
            values[:, :new] = v
            return q

        def after_attention(h, attn, wo, ln2, gate_up, down):
            """Output projection and residual, RMSNorm, one gate/up GEMM, SiLU-gated MLP, residual."""
            batch, new = h.shape[:2]
            h = h + _linear(attn.reshape(batch, new, -1), wo)
            gate, up = _linear(_rms_norm(h, ln2, eps), gate_up).chunk(2, dim=-1)
            return h + _linear(F.silu(gate) * up, down)

        # Automatic dynamic shapes: a dimension that changes (batch, tokens, cache capacity) turns
        # symbolic at its first recompile; head counts and weight shapes stay constants (with
        # dynamic=True they were symbolic too, and every index held a division by them).
        wrap = torch.compile if compile else (lambda fn: fn)
        self.attention_inputs = wrap(attention_inputs)
        self.prefill_inputs = wrap(prefill_inputs)
        self.after_attention = wrap(after_attention)
        # One buffer per layer for keys and one for values, sized for the largest batch seen: a
        # graph reads fixed addresses, and two mutated inputs of a compiled function that were
        # views of one buffer would alias (dynamo's slow path).
        self._buffers: list[torch.Tensor] = []
        self._graphs: dict[tuple[str | int, ...], _Graph] = {}
        self._graph_pool = None

    # ---------------------------------------------------------------- cache and graphs

    def _cache(self, batch: int, width: int, new_tokens: int = 0) -> StaticCache:
        """Room for ``width`` prompt slots plus ``new_tokens`` (at least ``reserve``), rounded up to
        ``SLOT_ROUNDING``."""
        capacity = -(-(width + max(self.reserve, new_tokens)) // SLOT_ROUNDING) * SLOT_ROUNDING
        shape = (batch, capacity, self.kv_heads, self.head_dim)
        numel, count = torch.Size(shape).numel(), 2 * len(self.weights)
        # Zeros, not empty: masked slots still meet the values in P @ V, and 0 * NaN is NaN.
        if not self.cuda_graphs:
            flats = [torch.zeros(numel, dtype=self.dtype, device=self.device) for _ in range(count)]
        else:
            if not self._buffers or self._buffers[0].numel() < numel:
                self.release()  # graphs point into the old buffers
                self._buffers = [
                    torch.zeros(numel, dtype=self.dtype, device=self.device) for _ in range(count)
                ]
            flats = [buffer[:numel] for buffer in self._buffers]
        views = [flat.view(shape) for flat in flats]
        return StaticCache(views[0::2], views[1::2], 0)

    def release(self) -> None:
        """Drop the captured graphs and the cache buffers (the next call rebuilds them)."""
        self._graphs.clear()
        self._graph_pool = None  # a pool whose graphs are all gone cannot take a capture again
        self._buffers = []

    def _grow(self, cache: StaticCache, length: int) -> None:
        """Move ``cache`` into a larger one (a decode ran past what its prefill reserved; rare)."""
        old = (*cache.keys, *cache.values)
        if self.cuda_graphs:  # the old views keep the old buffers alive until copied
            self.release()
        bigger = self._cache(old[0].shape[0], length)
        for new, previous in zip((*bigger.keys, *bigger.values), old, strict=True):
            new[:, : previous.shape[1]] = previous
        cache.keys, cache.values = bigger.keys, bigger.values

    def _capture(self, fn, inputs: tuple[torch.Tensor, ...]) -> _Graph:
        """Record ``fn(*inputs)`` into this engine's graph pool (shared: one graph runs at a time).

        The warm-ups write the cache as the replay will (decode: the same K/V at the same slots;
        prefill: what the first real replay overwrites).
        """
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return _record(fn, inputs, self._graph_pool)

    # ---------------------------------------------------------------- engine API

    @torch.no_grad()
    def prefix(self, embeds: torch.Tensor) -> PrefixKV:
        """Prefill ``embeds`` ``(batch, tokens, dim)`` (no padding) and keep its keys and values (a
        copy: the next prefill reuses the cache buffers)."""
        batch, n, _ = embeds.shape
        mask = torch.ones(batch, n, dtype=torch.long, device=embeds.device)
        _, cache = self.prefill(embeds, mask, left_padded_positions(mask))
        states = embeds.new_empty(len(self.weights), 2, batch, n, self.kv_heads, self.head_dim)
        for i, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
            states[i, 0].copy_(keys[:, :n])
            states[i, 1].copy_(values[:, :n])
        return PrefixKV(states)

    @torch.no_grad()
    def prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        prefix: PrefixKV | None = None,
        new_tokens: int = 0,
    ):
        """Last real token's logits ``(batch, 1, vocab)`` and a :class:`StaticCache` with room for
        ``new_tokens`` decode steps.

        ``embeds`` ``(batch, n, dim)`` is left-padded as ``attention_mask`` says (``generate``'s
        convention; ``positions`` are then ``0..len-1`` on each row's real tokens, which is what
        this computes after moving the padding to the end, so it is not read). After a ``prefix``
        (its keys and values copied into the first slots, ``attention_mask`` covering them too),
        the tokens take the slots and positions that follow it.
        """
        start = 0 if prefix is None else prefix.tokens
        batch, n, dim = embeds.shape
        lengths = attention_mask[:, start:].sum(1)
        graphed = self.cuda_graphs and batch <= self.prefill_graph_batch
        width = -(-n // PREFILL_ROUNDING) * PREFILL_ROUNDING if graphed else n
        cache = self._cache(batch, start + width, new_tokens)
        cache.length = start + n
        if prefix is not None:
            for i, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
                prefix_keys, prefix_values = prefix.layer(i)
                keys[:, :start].copy_(prefix_keys)
                values[:, :start].copy_(prefix_values)
        if not graphed:
            return self._prefill(cache, embeds, lengths, start), cache
        key = ("prefill", batch, width, start, cache.capacity)  # the graph holds views of this shape
        if key not in self._graphs:
            static = (embeds.new_zeros(batch, width, dim), lengths.clone())
            self._graphs[key] = self._capture(lambda e, lens: self._prefill(cache, e, lens, start), static)
        entry = self._graphs[key]
        entry.inputs[0][:, width - n :].copy_(embeds)  # the extra width is more left padding
        entry.inputs[1].copy_(lengths)
        entry.graph.replay()
        return entry.output.clone(), cache

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: StaticCache
    ):
        """One new token per row ``(batch, 1)`` at ``positions`` ``(batch, 1)`` (each row's slot);
        logits ``(batch, 1, vocab)``. ``attention_mask`` is implied by ``positions`` (not read)."""
        cache.length += 1
        if cache.length > cache.capacity:
            self._grow(cache, cache.length)
        if not self.cuda_graphs:
            return self._decode(cache, tokens, positions), cache
        key = ("step", tokens.shape[0], cache.capacity)
        if key not in self._graphs:
            static = (tokens.clone(), positions.clone())
            self._graphs[key] = self._capture(lambda t, p: self._decode(cache, t, p), static)
        entry = self._graphs[key]
        entry.inputs[0].copy_(tokens)
        entry.inputs[1].copy_(positions)
        entry.graph.replay()
        return entry.output.clone(), cache

    def _prefill(
        self, cache: StaticCache, embeds: torch.Tensor, lengths: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """Prefill proper (what a CUDA graph records): logits ``(batch, 1, vocab)``; ``start``: the
        prefix length already in the cache."""
        batch, n, dim = embeds.shape
        arange = torch.arange(n, device=embeds.device)
        order = (arange[None] + (n - lengths)[:, None]) % n  # real tokens first, padding last
        h = embeds.gather(1, order[..., None].expand(batch, n, dim))
        cos, sin = (t.unsqueeze(2) for t in self.rotary(h, (start + arange)[None]))  # (1, n, 1, head_dim)
        rows, last = torch.arange(batch, device=embeds.device), lengths - 1
        # After a prefix, token j sees slots <= start + j: causal from the bottom right, as a mask
        # over the whole (64-slot aligned) capacity, the layout the decode steps' kernels read.
        slots = torch.arange(cache.capacity, device=embeds.device)
        mask = None if not start else (slots[None] <= (start + arange)[:, None])[None, None]
        for i, (ln1, qkv, wo, ln2, gate_up, down) in enumerate(self.weights):
            if not start:
                q = self.prefill_inputs(h, cos, sin, ln1, qkv, cache.keys[i], cache.values[i])
                k, v = cache.keys[i][:, :n], cache.values[i][:, :n]
            else:
                q, k, v = self.attention_inputs(h, cos, sin, ln1, qkv)
                cache.keys[i][:, start : start + n] = k
                cache.values[i][:, start : start + n] = v
                k, v = cache.keys[i], cache.values[i]
            attn = _attention(q, k, v, mask, self.gqa)
            if i == len(self.weights) - 1:  # only the last real token of each row goes on
                h, attn = h[rows, last][:, None], attn[rows, last][:, None]
            h = self.after_attention(h, attn, wo, ln2, gate_up, down)
        return self.lm_head(self.norm(h))

    def _decode(self, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A decode step proper (what a CUDA graph records): logits ``(batch, 1, vocab)``."""
        h = self.embed(tokens)
        batch = h.shape[0]
        cos, sin = (t.unsqueeze(2) for t in self.rotary(h, positions))  # (batch, 1, 1, head_dim)
        slots = torch.arange(cache.capacity, device=h.device)
        visible = (slots[None] <= positions)[:, None, None, :]  # (batch, 1, 1, capacity)
        where = positions.view(batch, 1, 1, 1).expand(batch, 1, self.kv_heads, self.head_dim)
        for i, (ln1, qkv, wo, ln2, gate_up, down) in enumerate(self.weights):
            q, k, v = self.attention_inputs(h, cos, sin, ln1, qkv)
            keys, values = cache.keys[i], cache.values[i]
            keys.scatter_(1, where, k)
            values.scatter_(1, where, v)
            attn = _attention(q, keys, values, visible, self.gqa)
            h = self.after_attention(h, attn, wo, ln2, gate_up, down)
        return self.lm_head(self.norm(h))


def _record(fn, inputs: tuple[torch.Tensor, ...], pool) -> _Graph:
    """Warm ``fn(*inputs)`` up on a side stream (compiles, library handles), then record it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(*inputs)
    return _Graph(graph, inputs, output)


class CudaGraphed:
    """``fn(*tensors) -> tensor`` replayed as a CUDA graph per input shape, up to ``max_batch`` rows.

    For stages that Python, not the GPU, paces at small batch: the cloud half's vision tower (23
    eager CLIP blocks) spent most of its batch-1 wall time launching kernels, not computing.
    Larger batches, and CPU tensors, call ``fn`` itself. ``fn`` must be a pure function of its
    tensor arguments (the weights it reads must not be replaced). Returns a copy of the output,
    so a later call cannot overwrite what an earlier one returned.
    """

    def __init__(self, fn, max_batch: int = 8) -> None:
        self.fn, self.max_batch = fn, max_batch
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if inputs[0].device.type != "cuda" or inputs[0].shape[0] > self.max_batch:
            return self.fn(*inputs)
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = _record(self.fn, tuple(t.clone() for t in inputs), self._pool)
        entry = self._graphs[key]
        for static, new in zip(entry.inputs, inputs, strict=True):
            static.copy_(new)
        entry.graph.replay()
        return entry.output.clone()

    def release(self) -> None:
        """Drop the captured graphs (the next call records again)."""
        self._graphs.clear()
        self._pool = None


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, gqa: bool
) -> torch.Tensor:
    """SDPA over ``(batch, tokens, heads, head_dim)`` tensors: causal without a mask (prefill, padding
    moved to the end), else over the cache slots ``mask`` allows (decode). The kernels were chosen by
    timing each on an H200 with Llama-2-7B heads: cuDNN for causal prefill and batched masked decode,
    memory-efficient for batch-1 decode. CPU: PyTorch's own choice."""
    if q.device.type != "cuda":
        backends = nullcontext()
    else:
        if mask is None:
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        elif q.shape[0] >= 8:
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        else:
            order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        backends = sdpa_kernel([*order, SDPBackend.MATH], set_priority=True)
    with backends:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=gqa,
        ).transpose(1, 2)
