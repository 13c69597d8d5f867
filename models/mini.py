"""The two bundled models, built from scratch: ``llava-mini-shapes`` and ``llava-mini-scenes``.

Both are plain HF LLaVA: a CLIP vision tower (64 patches + CLS), a two-layer projector and a Llama
language model with a word-level tokenizer over its data set's vocabulary.

- ``llava-mini-shapes``: CLIP 6 x 256 on 64 px easy-VQA images (patch 8), Llama 4 x 256.
- ``llava-mini-scenes``: CLIP 6 x 256 on 128 px scenes (patch 16), Llama 6 x 256 (the relational
  families need the depth), room for multi-turn prompts and the ``describe`` sentences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlavaConfig, PreTrainedTokenizerFast

from edge_client.preprocess import ImageSpec

from . import data, scenes
from .architectures import llava_config
from .prompt import IMAGE_PLACEHOLDER, PromptFormat

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_PLACEHOLDER)


@dataclass(frozen=True)
class MiniSpec:
    """Everything that defines one bundled model before training."""

    name: str
    image_size: int
    patch_size: int
    text_layers: int
    max_positions: int
    vocabulary: Callable[[], list[str]]

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(size=self.image_size)

    @property
    def prompt(self) -> PromptFormat:
        return PromptFormat(
            template="<image> {question} answer :", image_tokens=(self.image_size // self.patch_size) ** 2
        )

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """Word-level tokenizer; ids 0..4 are the special tokens, in :data:`SPECIALS` order."""
        vocab = {tok: i for i, tok in enumerate((*SPECIALS, *self.vocabulary()))}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # NFKC + lowercase, as the data was generated: "WHAT COLOR..." reads as "what color...".
        core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
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

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
        return llava_config(
            vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_hidden=256,
            vision_layers=6,
            vision_heads=8,
            vision_intermediate=1024,
            text_hidden=256,
            text_layers=self.text_layers,
            text_heads=8,
            text_intermediate=1024,
            max_positions=self.max_positions,
            vision_feature_layer=-1,
        )


SHAPES = MiniSpec(
    name="llava-mini-shapes",
    image_size=64,
    patch_size=8,
    text_layers=4,
    max_positions=128,
    vocabulary=data.vocabulary,
)
SCENES = MiniSpec(
    name="llava-mini-scenes",
    image_size=scenes.SIZE,
    patch_size=16,
    text_layers=6,
    max_positions=256,
    vocabulary=scenes.vocabulary,
)
SPECS = {spec.name: spec for spec in (SHAPES, SCENES)}
