"""Prompts: expand ``<image>`` to one token per image feature, tokenize, pad, and label answers.

This is what ``LlavaProcessor`` does for text, done once here for every model we serve, so training,
evaluation and the worker build identical token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptFormat:
    """A model's chat template reduced to one format string with ``{question}`` and one ``<image>``."""

    template: str
    image_tokens: int  # features per image the projector emits (e.g. 576 for LLaVA-1.5, 64 for mini)

    def __post_init__(self) -> None:
        if self.template.count(IMAGE_PLACEHOLDER) != 1 or "{question}" not in self.template:
            raise ValueError(
                f"prompt template needs one {IMAGE_PLACEHOLDER} and a {{question}}: {self.template!r}"
            )

    def render(self, question: str) -> str:
        body = self.template.replace("{question}", question)
        return body.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * self.image_tokens)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """BOS + tokens of each text; one batched call (the fast tokenizers encode lists in Rust)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, questions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``(batch, seq)`` for generation."""
    rows = _ids(tokenizer, [fmt.render(q) for q in questions])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, mask


def encode_training(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, questions: list[str], answers: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer + EOS only; -100 elsewhere)."""
    rows, labels = [], []
    prompts = _ids(tokenizer, [fmt.render(q) for q in questions])
    targets = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    for prompt, target in zip(prompts, targets, strict=True):
        target = target + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels], dtype=torch.long)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()
    return input_ids, mask, label_ids
