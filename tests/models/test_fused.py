"""The fused engine (static KV cache, padding moved to the end) decodes exactly what ``generate`` does.

Eager and fp32 on CPU; the CUDA-graph and compiled paths run the same functions
(``tests/benchmarks/test_gpu_worker.py`` runs the compiled one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from models.architectures import tiny_llava_config
from models.fused import CudaGraphed, FusedLlama, StaticCache, _fp8, _linear
from models.generation import HFEngine, greedy_decode, left_padded_positions
from models.split import split_llava


def _model() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def _prompts(model, tails: list[list[int]], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``<bos> <image>*16 tail`` and their images."""
    config = model.config
    rows = [[2, *[config.image_token_id] * 16, *tail] for tail in tails]
    width = max(map(len, rows))
    ids = torch.tensor([[config.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (ids != config.pad_token_id).long()
    pixels = torch.randn(len(rows), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


@pytest.mark.parametrize(
    "tails", [[[7, 8, 9, 5, 6], [10], [11, 12, 13]], [[7, 8, 9]]], ids=["padded-batch", "batch-1"]
)
def test_greedy_tokens_equal_generate(tails: list[list[int]]) -> None:
    model = _model()
    ids, mask, pixels = _prompts(model, tails)
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        reference = model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, do_sample=False
        )[:, ids.shape[1] :]
        embeds = cloud.inputs_embeds(ids, cloud.image_features(edge(pixels)))
    engine = FusedLlama(model, compile=False)
    tokens = greedy_decode(engine, embeds, mask, 8, model.generation_config.eos_token_id, 0)
    assert torch.equal(tokens, reference)


def test_static_cache_is_written_in_place_and_grows_only_past_its_capacity() -> None:
    model = _model()
    ids, mask, pixels = _prompts(model, [[7, 8, 9], [10]])
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        embeds = cloud.inputs_embeds(ids, cloud.image_features(edge(pixels)))
    engine = FusedLlama(model, compile=False, reserve=2)
    positions = left_padded_positions(mask)
    logits, cache = engine.prefill(embeds, mask, positions)
    assert isinstance(cache, StaticCache) and cache.capacity == 64 and cache.length == ids.shape[1]
    pointers = [t.data_ptr() for t in (*cache.keys, *cache.values)]
    token, position = logits[:, -1].argmax(-1)[:, None], positions[:, -1:]
    for _ in range(3):
        position = position + 1
        before = cache.keys[0][torch.arange(2), position[:, 0]].clone()
        logits, returned = engine.step(token, None, position, cache)
        assert returned is cache and [t.data_ptr() for t in (*cache.keys, *cache.values)] == pointers
        assert not torch.equal(cache.keys[0][torch.arange(2), position[:, 0]], before)  # each row's own slot
        token = logits[:, -1].argmax(-1)[:, None]
    # Past 64 slots the cache moves to a larger buffer, and decoding stays exact.
    hf = HFEngine(model)
    reference = greedy_decode(hf, embeds, mask, 70, None, 0)
    _, cache = engine.prefill(embeds, mask, positions)
    position = positions[:, -1:]
    for step in range(69):
        position = position + 1
        logits, cache = engine.step(reference[:, step : step + 1], None, position, cache)
        assert torch.equal(logits[:, -1].argmax(-1), reference[:, step + 1])
    assert cache.capacity == 128
    # Greedy decoding reserves the slots of all its steps at prefill: nothing grows.
    assert engine.prefill(embeds, mask, positions, new_tokens=70)[1].capacity == 128
    assert torch.equal(greedy_decode(engine, embeds, mask, 70, None, 0), reference)


def test_slots_past_each_rows_position_are_never_read() -> None:
    """Poisoned padding slots (a shorter row's, and those past the prompt) leave the logits alone."""
    model = _model()
    ids, mask, pixels = _prompts(model, [[7, 8, 9, 5], [10]])
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        embeds = cloud.inputs_embeds(ids, cloud.image_features(edge(pixels)))
    engine, positions = FusedLlama(model, compile=False), left_padded_positions(mask)
    lengths = mask.sum(1)
    token = torch.tensor([[5], [6]])
    clean, cache = engine.prefill(embeds, mask, positions)
    clean, _ = engine.step(token, None, positions[:, -1:] + 1, cache)
    _, cache = engine.prefill(embeds, mask, positions)
    for tensor in (*cache.keys, *cache.values):
        for row, length in enumerate(lengths.tolist()):
            tensor[row, length:] = 1e4  # finite: masked slots still meet P @ V as 0 * value
    poisoned, _ = engine.step(token, None, positions[:, -1:] + 1, cache)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_weights_exist_once_and_the_hf_modules_still_run() -> None:
    model = _model()
    ids, mask, pixels = _prompts(model, [[7, 8, 9], [10]])
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    params = sum(p.numel() for p in model.parameters())
    first, second = FusedLlama(model, compile=False), FusedLlama(model, compile=False)
    layer = model.model.language_model.layers[0]
    qkv = first.weights[0][1]
    assert second.weights[0][1].data_ptr() == qkv.data_ptr()  # a second engine adds nothing
    assert layer.self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert layer.self_attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert (
        layer.mlp.up_proj.weight.untyped_storage().data_ptr()
        == first.weights[0][4].untyped_storage().data_ptr()
    )
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == params * 4  # fp32, every parameter stored once
    with torch.no_grad():
        after = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(after, before)


def test_fp8_is_refused_off_gpu_and_its_linear_is_close() -> None:
    model = _model()
    with pytest.raises(ValueError, match="fp8=True needs a CUDA GPU"):
        FusedLlama(model, fp8=True)
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 32, generator=generator), torch.randn(3, 5, 32, generator=generator)
    try:
        low = _linear(x, _fp8(weight))
    except (RuntimeError, NotImplementedError) as exc:  # some CPU builds have no _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {exc}")
    exact = F.linear(x, weight)
    assert low.shape == exact.shape and float((low - exact).norm() / exact.norm()) < 0.06


def test_cuda_graphed_passes_cpu_calls_through() -> None:
    calls = []
    graphed = CudaGraphed(lambda x: calls.append(x) or x * 2)
    assert torch.equal(graphed(torch.ones(2)), torch.full((2,), 2.0)) and len(calls) == 1
