"""Prompts: render a conversation with the model's template, tokenize, split at the image, pad.

This is what ``LlavaProcessor`` and a chat template do for text, done once here for every model we
serve, so training, evaluation and the worker build identical token sequences.

A prompt is one image and a conversation: earlier question/answer turns (``history``, oldest
first) and the question to answer. The image comes first, so every prompt about one image starts
with the same tokens, the *prefix* (BOS, the template text before ``<image>``, the image tokens);
:func:`split_prompt` cuts there, and the worker keeps the prefix's KV cache per image
(docs/conversations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptFormat:
    """A model's chat template reduced to format strings.

    - ``template``: the first turn, with one ``<image>`` and a ``{question}``;
    - ``answer``: what follows a turn's prompt in the history, with ``{answer}`` (the default
      closes each earlier answer with ``</s>``, as the scenes model was trained:
      ``models/scenes.py``, ``TURN_SEPARATOR``);
    - ``turn``: a later turn, with ``{question}``; by default ``template`` without ``<image>`` and
      the whitespace after it (``"USER: <image>\\n{question} ASSISTANT:"`` ->
      ``"USER: {question} ASSISTANT:"``).

    Model folders written before these fields existed load with the defaults.
    """

    template: str
    image_tokens: int  # features per image the projector emits (e.g. 576 for LLaVA-1.5, 64 for mini)
    answer: str = " {answer} </s> "
    turn: str | None = None

    def __post_init__(self) -> None:
        if self.template.count(IMAGE_PLACEHOLDER) != 1 or "{question}" not in self.template:
            raise ValueError(
                f"prompt template needs one {IMAGE_PLACEHOLDER} and a {{question}}: {self.template!r}"
            )
        if "{answer}" not in self.answer:
            raise ValueError(f"the answer format needs an {{answer}}: {self.answer!r}")
        if self.turn is not None and (IMAGE_PLACEHOLDER in self.turn or "{question}" not in self.turn):
            raise ValueError(f"a later turn needs a {{question}} and no {IMAGE_PLACEHOLDER}: {self.turn!r}")

    @property
    def later_turn(self) -> str:
        if self.turn is not None:
            return self.turn
        before, after = self.template.split(IMAGE_PLACEHOLDER)
        return before + after.lstrip()

    def render(self, question: str, history: Sequence[str] = ()) -> str:
        """The prompt text, ``<image>`` expanded to ``image_tokens`` placeholders.

        ``history``: earlier questions and answers, alternating, oldest first.
        """
        if len(history) % 2:
            raise ValueError(f"history alternates questions and answers, got {len(history)} entries")
        questions = [*history[0::2], question]
        parts = []
        for i, q in enumerate(questions):
            parts.append((self.template if i == 0 else self.later_turn).replace("{question}", q))
            if i < len(questions) - 1:
                parts.append(self.answer.replace("{answer}", history[2 * i + 1]))
        return "".join(parts).replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * self.image_tokens)

    def to_dict(self) -> dict[str, str | int]:
        """The ``alignedvq.json`` keys; fields at their defaults are left out."""
        out: dict[str, str | int] = {"prompt": self.template, "image_tokens": self.image_tokens}
        if self.answer != PromptFormat.answer:
            out["answer"] = self.answer
        if self.turn is not None:
            out["turn"] = self.turn
        return out

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> PromptFormat:
        return cls(meta["prompt"], meta["image_tokens"], meta.get("answer", cls.answer), meta.get("turn"))


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """BOS + tokens of each text; one batched call (the fast tokenizers encode lists in Rust)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``(batch, longest row)``."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, questions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``(batch, seq)`` for generation."""
    return left_pad(_ids(tokenizer, [fmt.render(q) for q in questions]), tokenizer.pad_token_id)


@dataclass(frozen=True)
class PromptIds:
    """One prompt's token ids cut after its last image token.

    ``prefix``: BOS, the template text before the image and the image tokens (the same for every
    prompt of a model); ``rest``: the conversation after the image.
    """

    prefix: tuple[int, ...]
    rest: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prefix) + len(self.rest)


def split_prompt(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, question: str, history: Sequence[str] = ()
) -> PromptIds:
    """Tokenize the whole prompt, then cut it after the image tokens.

    The whole text is tokenized at once, not the two parts apart, so the ids are exactly those of
    :func:`encode_prompts` (a BPE tokenizer may read a part's first word differently on its own).
    """
    ids = _ids(tokenizer, [fmt.render(question, history)])[0]
    image = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    end = len(ids) - ids[::-1].index(image)
    return PromptIds(tuple(ids[:end]), tuple(ids[end:]))


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[str], bool]:
    """The pieces of ``text`` the tokenizer reads as its unknown token (in order, each once), and
    whether it reads nothing else. Byte-level BPE tokenizers (LLaVA-1.5) read everything: ``[]``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    unknown = [
        (start, end)
        for token, (start, end) in zip(ids, offsets, strict=True)
        if token == tokenizer.unk_token_id
    ]
    words = list(dict.fromkeys(text[start:end] for start, end in unknown))
    return words, len(unknown) == len(ids)


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
