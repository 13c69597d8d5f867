"""Split equivalence: cloud(edge(x)) reproduces the unsplit model for every site (fp32, tight)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from models.architectures import tiny_llava_config
from models.config import SplitSite
from models.split import feature_layer_indices, split_llava


def _model(**overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config(**overrides)).eval()


def _inputs(model, batch: int = 2):
    size = model.config.vision_config.image_size
    n_image = (size // model.config.vision_config.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full":
        n_image += 1
    ids = torch.tensor(
        [[2] + [model.config.image_token_id] * n_image + [10 + i, 11, 12] for i in range(batch)]
    )
    return torch.randn(batch, 3, size, size), ids


@pytest.mark.parametrize("site", ["embed", "preln", "block:1", "block:2"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"vision_feature_layer": -1}, {"vision_feature_layer": [-2, -1]}, {"select_strategy": "full"}],
)
def test_cloud_of_edge_equals_unsplit_logits(site: str, overrides: dict) -> None:
    model = _model(**overrides)
    pixels, ids = _inputs(model)
    edge, cloud = split_llava(model, site)
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits
        logits = cloud(edge(pixels), ids)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_generate_matches_unsplit_greedy() -> None:
    model = _model()
    pixels, ids = _inputs(model)
    mask = torch.ones_like(ids)
    edge, cloud = split_llava(model, "preln")
    with torch.no_grad():
        reference = model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4, do_sample=False
        )[:, ids.shape[1] :]
        new = cloud.generate(edge(pixels), ids, mask, max_new_tokens=4)
    assert torch.equal(new, reference)


def test_cloud_skips_blocks_past_the_feature_layer() -> None:
    model = _model()  # 3 vision layers, feature layer -2 -> hidden_states[2]
    assert feature_layer_indices(model) == [2]
    _, cloud = split_llava(model, "preln")
    assert len(cloud.blocks) == 2


def test_site_past_the_feature_layer_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="past the vision feature layer"):
        split_llava(model, "block:3")


def test_wrong_image_token_count_is_a_clear_error() -> None:
    model = _model()
    pixels, ids = _inputs(model)
    edge, cloud = split_llava(model, "preln")
    with pytest.raises(ValueError, match="expected 16 <image> tokens per prompt, got"):
        cloud(edge(pixels), torch.cat([ids[:, :1], ids[:, 2:]], dim=1))


@pytest.mark.parametrize(
    ("text", "kind", "k"), [("preln", "preln", 0), ("embed", "embed", 0), ("block:3", "block", 3)]
)
def test_split_site_parse_round_trip(text: str, kind: str, k: int) -> None:
    site = SplitSite.parse(text)
    assert (site.kind, site.k, str(site)) == (kind, k, text)


@pytest.mark.parametrize("bad", ["block:0", "block:x", "middle", "block:300"])
def test_split_site_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ValueError):
        SplitSite.parse(bad)
