"""A VQA split as device tensors, so training and evaluation batches cost one gather each.

Images stay uint8 on the device and are normalized per batch with the same arithmetic as
:func:`edge_client.preprocess.normalize`; images must already be at the model's input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from edge_client.preprocess import ImageSpec

from .data import VQASplit
from .prompt import PromptFormat, encode_prompts, encode_training


def pixel_values(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """``(batch, H, W, 3)`` uint8 -> ``(batch, 3, H, W)`` float32 ``pixel_values``."""
    if images.shape[1:3] != (spec.size, spec.size):
        raise ValueError(f"expected {spec.size}x{spec.size} images, got {tuple(images.shape[1:3])}")
    mean = torch.tensor(spec.mean, device=images.device)
    std = torch.tensor(spec.std, device=images.device)
    x = images.float() / 255.0
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


@dataclass
class TensorSplit:
    images: torch.Tensor  # (num_images, H, W, 3) uint8
    image_index: torch.Tensor  # (questions,)
    input_ids: torch.Tensor  # (questions, seq)
    attention_mask: torch.Tensor
    labels: torch.Tensor | None  # training only
    spec: ImageSpec
    patch_targets: torch.Tensor | None = None  # (num_images, patches, FIELDS): models.patch_loss

    @classmethod
    def for_training(
        cls,
        split: VQASplit,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        spec: ImageSpec,
        device: str,
        patch: int | None = None,
    ) -> TensorSplit:
        """``patch``: with a split that has object records, also per-patch targets for that patch size."""
        ids, mask, labels = encode_training(tokenizer, fmt, split.questions, [a[0] for a in split.answers])
        made = cls._make(split, ids, mask, labels, spec, device)
        if patch is not None and split.objects is not None:
            from .patch_loss import patch_targets

            made.patch_targets = torch.from_numpy(patch_targets(split.objects, spec.size, patch)).to(device)
        return made

    @classmethod
    def for_generation(
        cls,
        split: VQASplit,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        spec: ImageSpec,
        device: str,
    ) -> TensorSplit:
        ids, mask = encode_prompts(tokenizer, fmt, split.questions)
        return cls._make(split, ids, mask, None, spec, device)

    @classmethod
    def _make(cls, split, ids, mask, labels, spec, device) -> TensorSplit:
        return cls(
            images=torch.from_numpy(split.images).to(device),
            image_index=torch.from_numpy(split.image_index).to(device),
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            labels=None if labels is None else labels.to(device),
            spec=spec,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors for questions ``rows``, trimmed to the longest real sequence in the batch."""
        mask = self.attention_mask[rows]
        keep = mask.any(0)  # drop columns that are padding in every row
        out = {
            "pixel_values": pixel_values(self.images[self.image_index[rows]], self.spec),
            "input_ids": self.input_ids[rows][:, keep],
            "attention_mask": mask[:, keep],
        }
        if self.labels is not None:
            out["labels"] = self.labels[rows][:, keep]
        if self.patch_targets is not None:
            out["patch_targets"] = self.patch_targets[self.image_index[rows]]
        return out
