"""LLaVA configurations we build from scratch: tiny (tests), mini (the bundled model), 7B geometry.

All are plain Hugging Face ``LlavaConfig`` objects (CLIP vision tower + Llama language model), so
every code path is the one real checkpoints take.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig


def llava_config(
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    image_size: int,
    patch_size: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    vision_intermediate: int,
    text_hidden: int,
    text_layers: int,
    text_heads: int,
    text_intermediate: int,
    max_positions: int,
    vision_feature_layer: int | list[int] = -1,
    select_strategy: str = "default",
) -> LlavaConfig:
    """A LLaVA-1.5-style config (quick-GELU CLIP, two-layer GELU projector, Llama LM)."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config.pad_token_id = pad_token_id
    return config


def tiny_llava_config(vocab_size: int = 64, **overrides: object) -> LlavaConfig:
    """Two-layer, hidden-32 model for unit tests (seconds on CPU)."""
    args: dict = dict(
        vocab_size=vocab_size,
        image_token_id=4,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate=64,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        max_positions=128,
        vision_feature_layer=-2,
    )
    args.update(overrides)
    return llava_config(**args)


def llava15_geometry_config(
    vocab_size: int = 32064, *, vision_layers: int = 24, text_layers: int = 32
) -> LlavaConfig:
    """LLaVA-1.5-7B shapes: 336 px, patch 14 (577 tokens x 1024), Llama-2-7B text model.

    Layer counts can be cut for size-only tests; the edge geometry does not depend on them.
    """
    return llava_config(
        vocab_size=vocab_size,
        image_token_id=32000,
        pad_token_id=32001,
        bos_token_id=1,
        eos_token_id=2,
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=vision_layers,
        vision_heads=16,
        vision_intermediate=4096,
        text_hidden=4096,
        text_layers=text_layers,
        text_heads=32,
        text_intermediate=11008,
        max_positions=4096,
        vision_feature_layer=-2,
    )
