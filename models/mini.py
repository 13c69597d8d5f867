"""``llava-mini-shapes``: the bundled default model, built from scratch (DESIGN.md's 8.4 M recipe).

CLIP 6 x 256 vision tower on 64 px images (patch 8: 64 patches + CLS), a two-layer projector and a
Llama 4 x 256 language model with a word-level tokenizer over easy-VQA's vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaConfig, PreTrainedTokenizerFast

from edge_client.preprocess import ImageSpec

from .architectures import llava_config
from .data import vocabulary
from .prompt import IMAGE_PLACEHOLDER, PromptFormat

NAME = "llava-mini-shapes"
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_PLACEHOLDER)
IMAGE_SPEC = ImageSpec(size=64)
PROMPT = PromptFormat(template="<image> {question} answer :", image_tokens=64)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer; ids 0..4 are the special tokens, in :data:`SPECIALS` order."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tokenizer


def mini_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    return llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_size=IMAGE_SPEC.size,
        patch_size=8,
        vision_hidden=256,
        vision_layers=6,
        vision_heads=8,
        vision_intermediate=1024,
        text_hidden=256,
        text_layers=4,
        text_heads=8,
        text_intermediate=1024,
        max_positions=128,
        vision_feature_layer=-1,
    )
