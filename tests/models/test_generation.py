"""The worker's greedy loop, in one prefill or two (prefix, then the rest), returns exactly what
Hugging Face ``generate`` returns for the whole prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from models.architectures import tiny_llava_config
from models.fused import FusedLlama
from models.generation import HFEngine, PrefixKV, greedy_decode, left_padded_positions
from models.split import split_llava


def _model() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def _left_padded(model: LlavaForConditionalGeneration) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, left-padded, each with the 16 image tokens."""
    config = model.config
    image = [config.image_token_id] * 16
    rows = [[2, *image, 7, 8, 9], [2, *image, 10], [2, *image, 11, 12]]
    width = max(map(len, rows))
    ids = torch.tensor([[config.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    pixels = torch.randn(len(rows), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels


def test_positions_restart_after_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]


def test_matches_generate_on_left_padded_batches() -> None:
    model = _model()
    ids, mask, pixels = _left_padded(model)
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        reference = model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6, do_sample=False
        )[:, ids.shape[1] :]
        new = cloud.generate(edge(pixels), ids, mask, max_new_tokens=6)
    assert torch.equal(new, reference)


def test_rows_past_eos_are_padded_and_decoding_stops_when_all_are_done() -> None:
    model = _model()
    ids, mask, pixels = _left_padded(model)
    edge, cloud = split_llava(model, "preln")
    embeds = cloud.inputs_embeds(ids, cloud.image_features(edge(pixels)))
    engine = HFEngine(model)
    free = greedy_decode(engine, embeds, mask, 5, eos_token_id=None, pad_token_id=0)
    assert free.shape == (3, 5)
    # Declare row 0's second token to be EOS: row 0 is padded after it; a shared first token ends all.
    eos = int(free[0, 1])
    stopped = greedy_decode(engine, embeds, mask, 5, eos_token_id=eos, pad_token_id=0)
    row = stopped[0].tolist()
    assert row[:2] == free[0, :2].tolist() and set(row[2:]) <= {0}
    first = int(free[1, 0])
    ended = greedy_decode(engine, embeds, mask, 5, eos_token_id=[first, eos], pad_token_id=0)
    assert ended.shape[1] <= 5 and ended[1, 0] == first
    with torch.no_grad():
        reference = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    assert torch.equal(stopped, reference)


def test_fused_engine_matches_the_hf_modules() -> None:
    """Same logits at prefill and at each step (fp32, eager), so the same tokens as ``generate``."""
    model = _model()
    ids, mask, pixels = _left_padded(model)
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        embeds = cloud.inputs_embeds(ids, cloud.image_features(edge(pixels)))
        fused, hf = FusedLlama(model, compile=False), HFEngine(model)
        positions = left_padded_positions(mask)
        (a, cache_a), (b, cache_b) = (
            fused.prefill(embeds, mask, positions),
            hf.prefill(embeds, mask, positions),
        )
        torch.testing.assert_close(a[:, -1], b[:, -1], rtol=1e-4, atol=1e-5)
        token = b[:, -1].argmax(-1)[:, None]
        longer = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        a, _ = fused.step(token, longer, positions[:, -1:] + 1, cache_a)
        b, _ = hf.step(token, longer, positions[:, -1:] + 1, cache_b)
        torch.testing.assert_close(a[:, -1], b[:, -1], rtol=1e-4, atol=1e-5)
        reference = model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6, do_sample=False
        )[:, ids.shape[1] :]
        tokens = greedy_decode(fused, embeds, mask, 6, model.generation_config.eos_token_id, 0)
    assert torch.equal(tokens, reference)


def _split(ids: torch.Tensor, mask: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded tails after each row's first ``prefix`` real tokens, re-padded to the left."""
    tails = [row[m.bool()][prefix:].tolist() for row, m in zip(ids, mask, strict=True)]
    width = max(map(len, tails))
    tail_ids = torch.tensor([[0] * (width - len(t)) + t for t in tails])
    return tail_ids, (
        torch.arange(width)[None] >= torch.tensor([width - len(t) for t in tails])[:, None]
    ).long()


@pytest.mark.parametrize("fused", [False, True], ids=["hf-modules", "fused"])
def test_two_prefills_return_what_generate_returns_for_the_whole_prompt(fused: bool) -> None:
    model = _model()
    ids, mask, pixels = _left_padded(model)
    edge, cloud = split_llava(model, "preln", fused=fused)
    prefix_ids = torch.tensor([2, *[model.config.image_token_id] * 16])  # every row's prompt starts so
    tail_ids, tail_mask = _split(ids, mask, len(prefix_ids))
    with torch.no_grad():
        reference = model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6, do_sample=False
        )[:, ids.shape[1] :]
        prefix = cloud.prefix(edge(pixels), prefix_ids)
        assert prefix.states.shape == (2, 2, 3, 17, 4, 8)  # layers, K/V, batch, tokens, heads, head_dim
        assert torch.equal(cloud.generate_after(prefix, tail_ids, tail_mask, max_new_tokens=6), reference)
        # Rows cached one at a time, restacked in another order, answer the same.
        alone = [cloud.prefix(edge(pixels[i : i + 1]), prefix_ids) for i in (2, 0, 1)]
        assert alone[0].nbytes == prefix.nbytes // 3
        restacked = PrefixKV.stack([alone[1], *prefix.rows()[1:2], alone[0]])
        assert torch.equal(cloud.generate_after(restacked, tail_ids, tail_mask, max_new_tokens=6), reference)


def test_on_token_sees_each_step_as_it_is_made() -> None:
    model = _model()
    ids, mask, pixels = _left_padded(model)
    edge, cloud = split_llava(model, "preln")
    prefix_ids = torch.tensor([2, *[model.config.image_token_id] * 16])
    tail_ids, tail_mask = _split(ids, mask, len(prefix_ids))
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        prefix = cloud.prefix(edge(pixels), prefix_ids)
        tokens = cloud.generate_after(prefix, tail_ids, tail_mask, 5, stop_at_eos=False, on_token=seen.append)
    assert torch.equal(torch.stack(seen, 1), tokens) and tokens.shape == (3, 5)
