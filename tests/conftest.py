"""Shared fixtures: a tiny random LLaVA saved as a real model directory, with a fitted quantizer.

Tiny configs (2-3 layers, hidden 32) run in seconds on CPU, as transformers' own tests do; every
code path is the one the bundled and 7B models take.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_QUANTIZER = "preln-16"
# Whole folders and files of slow tests (real processes end to end, benchmark smokes, long fuzzing);
# single slow tests elsewhere carry @pytest.mark.slow themselves. `make test-fast` skips them all.
SLOW = ("tests/e2e/", "tests/benchmarks/", "tests/gateway/api/test_fuzz.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        if Path(str(item.path)).relative_to(root).as_posix().startswith(SLOW):
            item.add_marker(pytest.mark.slow)


def build_tiny_model_dir(
    directory: Path, *, site: str = "preln", codebook_size: int = 16, seed: int = 0
) -> Path:
    """A tiny LLaVA (mini tokenizer, 32 px images) plus one k-means AlignedVQ in ``quantizers/``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from edge_client.preprocess import ImageSpec
    from models.architectures import tiny_llava_config
    from models.config import QuantizerConfig, SplitSite
    from models.mini import SHAPES
    from models.prompt import IMAGE_PLACEHOLDER, PromptFormat
    from models.quantizer import AlignedVQ
    from models.split import split_llava
    from models.store import save_model_dir, write_manifest

    torch.manual_seed(seed)
    tokenizer = SHAPES.build_tokenizer()
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlavaForConditionalGeneration(config).eval()
    spec = ImageSpec(size=config.vision_config.image_size)
    prompt = PromptFormat(template="<image> {question} answer :", image_tokens=(spec.size // 8) ** 2)
    save_model_dir(model, tokenizer, prompt, spec, directory, dtype=torch.float32)
    split_site = SplitSite.parse(site)
    edge, _ = split_llava(model, split_site)
    with torch.no_grad():
        feats = edge(torch.randn(64, 3, spec.size, spec.size))
    vq = AlignedVQ(
        QuantizerConfig(
            dim=config.vision_config.hidden_size,
            split_site=str(split_site),
            tokens=feats.shape[1],
            codebook_size=codebook_size,
            code_dim=8,
            stat_bits=8 if split_site.needs_stats else 0,
        )
    )
    vq.init_from_features(feats, iters=5, seed=seed)
    vq.calibrate(feats)
    (directory / "quantizers").mkdir(exist_ok=True)
    vq.save(directory / "quantizers" / f"{vq.config.name}.safetensors")
    write_manifest(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide tiny model directory (``llava-tiny``) with quantizer ``preln-16``."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "llava-tiny")
